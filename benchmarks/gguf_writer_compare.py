"""Re-write a zopt GGUF through gguf-py's ``GGUFWriter`` (header, KV, tensor infos, then each
tensor's data) and compare it byte for byte with zopt's streaming writer's file.

    PYTHONPATH=$PWD python benchmarks/gguf_writer_compare.py [FILE.gguf]

Without FILE the tiny model is converted to gguf:Q4_K_M first. Prints the sizes, the first
differing byte, the KV order of both files, whether every tensor's bytes are equal, and the
largest array ``write_tensor_data`` had to be handed at once.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

FLOAT_NUMPY = {"F32": "float32", "F16": "float16", "BF16": "uint16"}


def rewrite(src: Path, out: Path) -> int:
    """Write ``src``'s KVs and tensors to ``out`` with GGUFWriter; returns the largest tensor (bytes)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(src)
    w = GGUFWriter(out, arch=r.fields["general.architecture"].contents())  # it writes the architecture first
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
            continue
        if f.types[0] == GGUFValueType.ARRAY:
            w.add_array(name, f.contents())
        else:
            w.add_key_value(name, f.contents(), f.types[0])
    largest = 0
    for t in r.tensors:
        shape = [int(x) for x in t.shape[::-1]]
        if t.tensor_type.name in FLOAT_NUMPY:
            dtype = np.dtype(FLOAT_NUMPY[t.tensor_type.name])
        else:  # quantized: GGUFWriter takes the byte shape (rows, bytes per row) as uint8
            block, size = GGML_QUANT_SIZES[t.tensor_type]
            shape[-1] = shape[-1] // block * size
            dtype = np.dtype(np.uint8)
        w.add_tensor_info(t.name, shape, dtype, int(t.n_bytes), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in r.tensors:  # one whole tensor per call: the API has no row-chunk form
        data = np.asarray(t.data)
        largest = max(largest, data.nbytes)
        w.write_tensor_data(data)
    w.close()
    return largest


def main() -> None:
    import numpy as np
    from gguf import GGUFReader

    tmp = Path(tempfile.mkdtemp())
    if len(sys.argv) > 1:
        src = Path(sys.argv[1])
    else:
        from zopt.formats import convert

        src = convert("tiny", "gguf:Q4_K_M", tmp / "tiny-Q4_K_M.gguf", progress=False)
    out = tmp / "gguf-writer.gguf"
    largest = rewrite(src, out)
    a, b = src.read_bytes(), out.read_bytes()
    first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None)
    ra, rb = GGUFReader(src), GGUFReader(out)
    same_data = len(ra.tensors) == len(rb.tensors) and all(
        x.name == y.name and np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8))
        for x, y in zip(ra.tensors, rb.tensors))
    print(f"zopt writer: {len(a)} bytes; GGUFWriter: {len(b)} bytes; identical: {a == b}; first difference at byte {first}")
    print(f"KV order, zopt:       {[k for k in ra.fields if not k.startswith('GGUF.')][:4]}")
    print(f"KV order, GGUFWriter: {[k for k in rb.fields if not k.startswith('GGUF.')][:4]}")
    print(f"every tensor's bytes equal: {same_data}; largest array handed to write_tensor_data: {largest} bytes")


if __name__ == "__main__":
    main()
