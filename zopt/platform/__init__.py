"""The platform layer: hardware detection, backend requirements and selection, simulated machines.

It knows nothing about formats: a format's registry entry declares its backends as data
(:class:`~zopt.platform.backends.Backend`), and :func:`~zopt.platform.backends.select` picks one.
"""
