"""The KV-cache spelling of the installed transformers: one place that knows both.

transformers 5.24 renamed the cache argument of every model and attention ``forward`` from
``past_key_values`` to ``cache`` (the old name is accepted with a warning until 5.40) and the output field
likewise. prunekit's own attention module and its speed measurement go through these helpers, so head-dim
pruned models work with the releases before and after the rename (CI tests the pinned lock;
``scripts/test-latest.sh`` the newest releases).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def cache_argument() -> str:
    """The name the installed transformers gives a model's KV-cache argument: ``cache`` or ``past_key_values``."""
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def cache_of(output: Any) -> Any:
    """The KV cache a forward returned (``output.cache`` or ``output.past_key_values``)."""
    return getattr(output, cache_argument())


def with_cache(cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand ``cache`` to a model's forward under the installed release's name."""
    return {cache_argument(): cache}
