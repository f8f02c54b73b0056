"""The platform layer: hardware detection, the backend registry and selection, simulated machines.

It knows nothing about formats: formats register their backends here as data.
"""
