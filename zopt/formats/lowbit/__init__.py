"""Low-bit formats (fp8, int8, int8_w8a8, int4, nf4) and what they share.
"""
