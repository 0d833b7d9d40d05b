"""Opening a GGUF file in llama.cpp (llama-cpp-python), as prunekit's checks of its exports do."""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

_DEFAULTS = threading.Lock()  # the library's default model parameters are swapped while a file opens


@functools.cache
def amx() -> bool:
    """Whether this llama.cpp multiplies matrices with AMX (built with it, on a CPU that has it)."""
    import llama_cpp

    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode()


def open_gguf(path: str | Path, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(path, **kwargs)``. Where llama.cpp multiplies with AMX, its weight repacking is off (as
    llama.cpp's ``--no-repack``): its AMX matrix multiplication (``ggml_backend_amx_mul_mat``) crashes the process
    on some quantized tensors, those of small pruned models among them (llama.cpp issue 20824). Elsewhere
    repacking stays on, as llama.cpp runs by default."""
    import llama_cpp
    import llama_cpp.llama_cpp as api

    if not amx():
        return llama_cpp.Llama(str(path), **kwargs)
    defaults = api.llama_model_default_params

    def without_repacking() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    with _DEFAULTS:
        api.llama_model_default_params = without_repacking
        try:
            return llama_cpp.Llama(str(path), **kwargs)
        finally:
            api.llama_model_default_params = defaults
