"""The static types of the transformers objects prunekit handles.

transformers builds a model's modules at run time from its config: a decoder layer's attention, its ``q_proj``,
a causal LM's ``get_decoder()`` or ``config`` are looked up by name (``nn.Module.__getattr__``), which no static
type describes. These aliases name what a value is for the reader; the checker treats them as dynamic.
"""

from __future__ import annotations

from typing import Any, TypeAlias

# A transformers causal LM (``*ForCausalLM``, stock or pruned), or a peft model wrapping one.
CausalLM: TypeAlias = Any
# A module inside one, named by its family (a decoder layer, its attention or MLP).
Submodule: TypeAlias = Any
