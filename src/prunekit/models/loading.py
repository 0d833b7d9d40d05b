"""Load a model directory written by prunekit (or any Hugging Face directory of a supported family)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.families import adapter_for, family_of_model_type
from prunekit.models.types import CausalLM

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(device: str) -> None:
    """Raise unless ``device`` names a device this machine has: ``cpu``, ``cuda`` / ``cuda:N`` with a GPU,
    ``mps`` where torch has it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise PrunekitError(f"'{device}' is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no NVIDIA GPU is visible"
            raise PrunekitError(f"'{device}': {why} (torch {torch.__version__}); use cpu here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PrunekitError(f"'{device}': this machine has {torch.cuda.device_count()} CUDA device(s), 0-based")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise PrunekitError(f"'{device}': torch has no MPS device here; use cpu")
    elif dev.type != "cpu":
        raise PrunekitError(f"'{device}': unsupported device type '{dev.type}'; use cpu, cuda or cuda:N")


def load_config(path: str | Path) -> Any:
    """The config of a model directory (a pruned model's: its family's pruned config class), or an error saying
    what is missing or broken."""
    import json

    from transformers import AutoConfig

    from prunekit.models.modeling import LEGACY_PREFIX, is_pruned_config

    p = Path(path)
    if not (p / "config.json").is_file():
        raise PrunekitError(f"no model at '{p}' (config.json missing); run the stage that writes it (dvc repro)")
    try:
        data = json.loads((p / "config.json").read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not is_pruned_config(data):
            return AutoConfig.from_pretrained(p)
        data["model_type"] = str(data.get("model_type", "")).removeprefix(LEGACY_PREFIX)
        family = family_of_model_type(data["model_type"])
        if family is None:
            raise ValueError(f"no family reads model_type '{data['model_type']}'")
        config_cls: Any = family.pruned.config
        return config_cls.from_dict({k: v for k, v in data.items() if k != "auto_map"})
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise PrunekitError(f"config.json at '{p}' cannot be read: {e}") from e


def load_pretrained(path: str | Path, **kwargs: Any) -> CausalLM:
    """``from_pretrained`` of a model directory with the class its config describes (prunekit's pruned classes for
    a pruned model; safetensors only); ``kwargs`` go to ``from_pretrained`` (``dtype``, ``device_map``)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, config=load_config(path), use_safetensors=True, **kwargs)


def check_weights(path: Path) -> None:
    """Refuse a model directory without safetensors weights (pickled ones are never loaded)."""
    from prunekit.models.checkpoint_files import PICKLE_PATTERNS, matches

    names = sorted(p.name for p in path.iterdir() if p.is_file())
    if not any(n.endswith(".safetensors") for n in names):
        pickles = [n for n in names if matches(n, PICKLE_PATTERNS)]
        found = f"only pickled weights ({', '.join(pickles)})" if pickles else "no weights"
        raise PrunekitError(
            f"model at '{path}' has {found}; prunekit loads safetensors only (pickles can run code when loaded). "
            "Convert it with `save_pretrained(dir, safe_serialization=True)` in a trusted environment."
        )


def model_shapes(path: str | Path) -> tuple[CausalLM, ModelAdapter]:
    """(the model of a directory's config with every parameter on the meta device, its adapter): its shapes for
    checks that must come before reading any weight (milliseconds, no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_config(path)
    adapter = adapter_for(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    return model, adapter


def load_model(
    path: str | Path,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: str | None = None,
) -> tuple[CausalLM, Any, ModelAdapter]:
    """(model in eval mode, tokenizer, adapter) from a Hugging Face directory.

    ``device_map="auto"`` lets accelerate spread a model larger than one device over all of them.
    """
    from transformers import AutoModelForCausalLM

    config = load_config(path)
    adapter = adapter_for(config)
    if dtype not in DTYPES:
        raise PrunekitError(f"model.dtype '{dtype}' is not supported; choose one of {', '.join(DTYPES)}")
    check_weights(Path(path))
    # safetensors only, also where a directory holds pickles as well: those can run code when loaded.
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "use_safetensors": True}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model: CausalLM = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise PrunekitError(
            f"model at '{path}' cannot be loaded, it is corrupt or incomplete ({str(e).splitlines()[0]}); "
            f"restore it with `dvc checkout {path}` or rerun the stage that writes it (`dvc repro --force` on it)"
        ) from e
    tokenizer = load_tokenizer(path)
    if not device_map:
        model = model.to(device)
    log.info("loaded %s (%s) from %s", type(model).__name__, dtype, path)
    return model.eval(), tokenizer, adapter


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a model directory, or an error naming the broken directory."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise PrunekitError(
            f"tokenizer at '{path}' cannot be loaded ({str(e).splitlines()[0]}); restore it with `dvc checkout "
            f"{path}` or rerun the stage that writes it"
        ) from e
