"""Save a model whose layers may differ in width: with its family's stock config when its widths allow, else with
prunekit's per-layer config, as a fresh instance of the class ``from_pretrained`` picks (so the reload is exact)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from accelerate import init_empty_weights
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM

log = logging.getLogger(__name__)


def config_for(model: CausalLM, adapter: ModelAdapter) -> Any:
    """The config describing the model's current widths: stock when uniform and stock accepts it."""
    sizes = adapter.all_layer_sizes(model)
    if len(set(sizes)) == 1:
        try:
            return adapter.stock_config(model.config, sizes[0])
        except (ValueError, TypeError, StrictDataclassClassValidationError) as e:
            # e.g. transformers 5 requires hidden_size % num_attention_heads == 0 in stock Llama.
            log.info("uniform widths, but the stock config rejects them (%s); saving a prunekit config", e)
    return adapter.pruned_config(model.config, sizes)


def rebuild(model: CausalLM, adapter: ModelAdapter) -> CausalLM:
    """A fresh instance of the class that ``from_pretrained`` would pick, holding the model's weights."""
    config = config_for(model, adapter)
    config._attn_implementation = model.config._attn_implementation
    cls: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    with init_empty_weights():
        fresh = cls(config)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False, assign=True)
    tied = {k for k in missing if k == "lm_head.weight" and config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"rebuilt model does not match: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    fresh.generation_config = model.generation_config
    return fresh.to(next(model.parameters()).device).eval()


def save_model(model: CausalLM, adapter: ModelAdapter, tokenizer: Any, out_dir: Path) -> None:
    """Save weights (safetensors), config and tokenizer in ``out_dir``."""
    from prunekit.models.provenance import make_reproducible

    fresh = rebuild(model, adapter)
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    make_reproducible(out_dir)
