"""Export: renorm's own packed file (`packed`) and a deployable ONNX graph (`onnx`).

`packed` writes and reads renorm files (codes packed, the architecture by spec);
`onnx` writes an INT8 QDQ graph that ONNX Runtime runs with integer kernels, and
runs such a file as an nn.Module for evaluation. Both write through
renorm.files.write_atomic.
"""
from __future__ import annotations

from renorm.export.packed import (FORMAT, load_compressed, pack_codes, pack_mask, save_compressed,  # noqa: F401
                                  unpack_codes, unpack_mask)
