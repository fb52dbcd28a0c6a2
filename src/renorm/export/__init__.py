"""Export: renorm's own packed file and a deployable ONNX graph, side by side.

`packed` writes and reads renorm files (codes packed, the architecture by spec);
`onnx_qdq` writes an INT8 QDQ graph that ONNX Runtime runs with integer kernels, with
BatchNorm folded by `fold`; `onnx_runtime` runs such a file as an nn.Module for
evaluation. Both formats are written through renorm.files.write_atomic.
"""
from __future__ import annotations

from renorm.export.packed import (FORMAT, load_compressed, pack_codes, pack_mask, save_compressed,  # noqa: F401
                                  unpack_codes, unpack_mask)
