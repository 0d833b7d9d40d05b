"""Load a model directory written by prunekit (or any Hugging Face directory of a supported family)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter, adapter_for

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_config(path: str | Path) -> Any:
    """The config of a model directory, or an error saying what is missing or broken."""
    from transformers import AutoConfig

    p = Path(path)
    if not (p / "config.json").is_file():
        raise PrunekitError(f"no model at '{p}' (config.json missing); run the stage that writes it (dvc repro)")
    try:
        return AutoConfig.from_pretrained(p)
    except (ValueError, OSError, KeyError) as e:
        raise PrunekitError(f"config.json at '{p}' cannot be read: {e}") from e


def load_model(
    path: str | Path,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: str | None = None,
) -> tuple[torch.nn.Module, Any, ModelAdapter]:
    """(model in eval mode, tokenizer, adapter) from a Hugging Face directory.

    ``device_map="auto"`` lets accelerate spread a model larger than one device over all of them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import prunekit  # noqa: F401  (registers the pruned Auto classes)

    config = load_config(path)
    adapter = adapter_for(config)
    if dtype not in DTYPES:
        raise PrunekitError(f"model.dtype '{dtype}' is not supported; choose one of {', '.join(DTYPES)}")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, RuntimeError) as e:
        raise PrunekitError(f"model at '{path}' cannot be loaded (corrupt or incomplete checkpoint?): {e}") from e
    if not device_map:
        model = model.to(device)
    log.info("loaded %s (%s) from %s", type(model).__name__, dtype, path)
    return model.eval(), tokenizer, adapter
