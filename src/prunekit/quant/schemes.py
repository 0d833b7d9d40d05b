"""Quantization schemes: a name, a nominal bit width, and how a weight is realised in that format.

A scheme is small and declarative; its backend (:mod:`prunekit.quant.backend`) does the work. The realised formats:

* ``int8`` - bitsandbytes LLM.int8: one int8 per weight, one float32 absmax per output row; at run time
  input features above ``quantize.int8_threshold`` go through a 16-bit side path (outlier decomposition).
* ``nf4`` / ``fp4`` - bitsandbytes 4-bit NormalFloat / float: two codes per byte, a float32 absmax per
  block of 64 weights, or with ``quantize.double_quant`` an 8-bit absmax plus a float32 per 256 blocks.
* ``rtn2`` / ``rtn3`` / ``rtn4`` / ``rtn8`` - prunekit's pure-torch round-to-nearest, asymmetric, one
  float16 scale and one float16 zero point per group of ``quantize.group_size`` input weights, codes
  bit-packed (bitsandbytes has no 2- or 3-bit format; ``rtn4`` / ``rtn8`` are the reference and the fast
  path for the search on any device).
* ``q4_0`` / ``q4_1`` / ``q5_0`` / ``q5_1`` / ``q8_0`` - llama.cpp's block formats, as a GGUF file stores
  them: 32 weights per block with a float16 scale (and minimum, ``_1``); the export writes them unchanged.
* ``q2_k`` / ``q3_k`` / ``q4_k`` / ``q5_k`` / ``q6_k`` - llama.cpp's K-quants: super-blocks of 256 weights with
  quantized sub-block scales, encoded by llama.cpp's own quantizer (needs llama-cpp-python); input widths must
  be multiples of 256.
* ``fp16`` / ``bf16`` - left unquantized, stored in that 16-bit dtype.
"""

from __future__ import annotations

from prunekit.quant.backend import backend_for
from prunekit.quant.scheme import BNB_BLOCKSIZE, BNB_NESTED_BLOCKSIZE, QuantSettings, Scheme
from prunekit.registry import Registry

__all__ = ["BNB_BLOCKSIZE", "BNB_NESTED_BLOCKSIZE", "SCHEMES", "QuantSettings", "Scheme", "usable_scheme"]

SCHEMES: Registry[Scheme] = Registry("quantization scheme")

for _s in (
    Scheme(
        "int8", 8, "bnb_int8", "bitsandbytes LLM.int8: int8 per weight, absmax per row, outlier features in 16 bits"
    ),
    Scheme(
        "nf4",
        4,
        "bnb_4bit",
        "bitsandbytes 4-bit NormalFloat, absmax per block of 64 (double quantization optional)",
        "nf4",
    ),
    Scheme(
        "fp4", 4, "bnb_4bit", "bitsandbytes 4-bit float, absmax per block of 64 (double quantization optional)", "fp4"
    ),
    Scheme("rtn2", 2, "rtn", "round-to-nearest 2-bit, scale and zero per group (pure torch, bit-packed)"),
    Scheme("rtn3", 3, "rtn", "round-to-nearest 3-bit, scale and zero per group (pure torch, bit-packed)"),
    Scheme("rtn4", 4, "rtn", "round-to-nearest 4-bit, scale and zero per group (pure torch, bit-packed)"),
    Scheme("rtn8", 8, "rtn", "round-to-nearest 8-bit, scale and zero per group (pure torch)"),
    Scheme("q4_0", 4, "ggml", "llama.cpp Q4_0: 4-bit codes, a float16 scale per block of 32 (4.5 bits)", "Q4_0"),
    Scheme("q4_1", 4, "ggml", "llama.cpp Q4_1: 4-bit codes, float16 scale and min per block of 32 (5 bits)", "Q4_1"),
    Scheme("q5_0", 5, "ggml", "llama.cpp Q5_0: 5-bit codes, a float16 scale per block of 32 (5.5 bits)", "Q5_0"),
    Scheme("q5_1", 5, "ggml", "llama.cpp Q5_1: 5-bit codes, float16 scale and min per block of 32 (6 bits)", "Q5_1"),
    Scheme("q8_0", 8, "ggml", "llama.cpp Q8_0: 8-bit codes, a float16 scale per block of 32 (8.5 bits)", "Q8_0"),
    Scheme(
        "q2_k", 2, "ggml", "llama.cpp Q2_K: 2-bit codes, 4-bit scales and mins per 16, per 256 (2.625 bits)", "Q2_K"
    ),
    Scheme("q3_k", 3, "ggml", "llama.cpp Q3_K: 3-bit codes, 6-bit scales per 16, per 256 (3.4375 bits)", "Q3_K"),
    Scheme("q4_k", 4, "ggml", "llama.cpp Q4_K: 4-bit codes, 6-bit scales and mins per 32, per 256 (4.5 bits)", "Q4_K"),
    Scheme("q5_k", 5, "ggml", "llama.cpp Q5_K: 5-bit codes, 6-bit scales and mins per 32, per 256 (5.5 bits)", "Q5_K"),
    Scheme("q6_k", 6, "ggml", "llama.cpp Q6_K: 6-bit codes, 8-bit scales per 16, per 256 (6.5625 bits)", "Q6_K"),
    Scheme("fp16", 16, "float", "left unquantized, stored as float16", "float16"),
    Scheme("bf16", 16, "float", "left unquantized, stored as bfloat16", "bfloat16"),
):
    SCHEMES.register(_s.name)(_s)


def usable_scheme(name: str) -> Scheme:
    """The scheme named ``name``, once its encoder is known to be installed; else the error saying what to do."""
    scheme = SCHEMES.get(name)
    backend_for(scheme).check_available(scheme)
    return scheme
