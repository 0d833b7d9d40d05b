"""llama.cpp's tensor types: their names, sizes, and how a weight is encoded into them and decoded back.

The types are llama.cpp's: ``F32``, ``F16``, ``BF16``, the block formats ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``,
``Q8_0`` (32 weights per block: a weight's input width must be a multiple of 32), encoded by llama.cpp's ``gguf``
package, and the K-quants ``Q2_K``, ``Q3_K``, ``Q4_K``, ``Q5_K``, ``Q6_K`` (super-blocks of 256 weights: the input
width must be a multiple of 256), encoded by llama.cpp's own quantizer (``ggml_quantize_chunk`` of the libggml
that llama-cpp-python builds, without an importance matrix, as ``llama-quantize`` without ``--imatrix``); the
``gguf`` package has no K-quant encoder. Every type is decoded by the ``gguf`` package. :func:`fake_quantize` is
the rounding a GGUF file stores (the encoder, then the decoder): the ``ggml`` quantization backend holds these
blocks and the search optimises the loss of exactly the file the export writes.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunekit.errors import PrunekitError

FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # encoded by llama.cpp's quantizer (llama-cpp-python)
TYPES = (*FLOAT_TYPES, *BLOCK_TYPES, *K_TYPES)


def qtype(name: str, what: str = "GGUF type") -> Any:
    """The ``gguf.GGMLQuantizationType`` named ``name`` (case-insensitive), or an error listing the valid ones."""
    import gguf

    upper = str(name).upper()
    if upper not in TYPES:
        raise PrunekitError(f"{what} '{name}' is not one prunekit writes; choose one of {', '.join(TYPES)}")
    return gguf.GGMLQuantizationType[upper]


def block_size(name: str) -> int:
    """Weights per block of a type (1 for the float types)."""
    import gguf

    return int(gguf.GGML_QUANT_SIZES[qtype(name)][0])


def type_bytes(name: str, rows: int, cols: int) -> int:
    """Bytes a (rows x cols) weight takes in type ``name`` (``cols`` a multiple of its block)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype(name)]
    return rows * (cols // block) * size


def check_fits(name: str, cols: int, what: str) -> None:
    """Refuse a block type for a weight whose input width is not a multiple of its block."""
    block = block_size(name)
    if cols % block:
        raise PrunekitError(
            f"{what} has {cols} input columns, not a multiple of {name.upper()}'s block of {block}: give it a "
            f"float type, or prune to widths that are multiples of {block} (prune.round_to)"
        )


@functools.cache
def _quantize_chunk() -> Any:
    """``ggml_quantize_chunk`` of llama.cpp's libggml-base, as llama-cpp-python ships it; or the error that says
    how to get it."""
    import ctypes
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    lib = None
    if spec is not None and spec.submodule_search_locations:
        found = sorted(Path(spec.submodule_search_locations[0], "lib").glob("libggml-base.*"))
        lib = found[0] if found else None
    if lib is None:
        raise PrunekitError(
            f"the K-quants ({', '.join(K_TYPES)}) are encoded by llama.cpp's own quantizer, which comes with "
            "llama-cpp-python: install it with pip install -e '.[llamacpp]' (scripts/setup.sh does), or choose "
            f"one of {', '.join(FLOAT_TYPES + BLOCK_TYPES)}"
        )
    ggml = ctypes.CDLL(str(lib))
    fn = ggml.ggml_quantize_chunk
    # size_t ggml_quantize_chunk(enum ggml_type, const float * src, void * dst, int64_t start, int64_t nrows,
    #                            int64_t n_per_row, const float * imatrix)
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    return fn


def check_encoder(name: str, what: str = "GGUF type") -> None:
    """Refuse a type whose encoder is not installed (the K-quants need llama-cpp-python), before any work."""
    qtype(name, what)
    if name.upper() in K_TYPES:
        _quantize_chunk()


def _llama_cpp_encode(data: np.ndarray, name: str) -> np.ndarray:
    """(rows, bytes per row) blocks of a float32 (rows, cols) array from llama.cpp's ``ggml_quantize_chunk``."""
    import ctypes

    rows, cols = data.shape
    check_fits(name, cols, f"a {rows} x {cols} weight")
    src = np.ascontiguousarray(data, dtype=np.float32)
    out = np.zeros((rows, type_bytes(name, 1, cols)), dtype=np.uint8)
    written = _quantize_chunk()(int(qtype(name)), src.ctypes.data_as(ctypes.c_void_p),
                              out.ctypes.data_as(ctypes.c_void_p), 0, rows, cols, None)  # fmt: skip
    if written != out.nbytes:
        raise PrunekitError(
            f"llama.cpp's quantizer wrote {written} bytes for a {rows} x {cols} {name}, not {out.nbytes}"
        )
    return out


def encode(w: torch.Tensor, name: str) -> np.ndarray:
    """The bytes (or float array) of a 2-D weight in type ``name``, as the writer stores them."""
    import gguf

    t = qtype(name)
    data = w.detach().to(torch.float32).cpu().numpy()
    if name.upper() == "F32":
        return data
    if name.upper() == "F16":
        return data.astype(np.float16)
    if name.upper() in K_TYPES:
        return _llama_cpp_encode(data, name.upper())
    return gguf.quants.quantize(data, t)


def decode(blocks: np.ndarray, name: str) -> torch.Tensor:
    """float32 weights (flat) of a block type's stored bytes, decoded by the ``gguf`` package."""
    import gguf

    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(blocks, qtype(name)), dtype=np.float32))


def fake_quantize(w: torch.Tensor, name: str) -> torch.Tensor:
    """``w`` after the writer's rounding to type ``name`` and back (same shape, dtype and device)."""
    if name.upper() == "F32":
        return w.clone()
    if name.upper() == "F16":
        return w.to(torch.float16).to(w.dtype)
    return decode(encode(w, name), name).reshape(w.shape).to(device=w.device, dtype=w.dtype)
