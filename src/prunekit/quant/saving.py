"""A quantized model directory: ``config.json``, the tokenizer, ``model.safetensors`` (codes and their statistics
as bitsandbytes and prunekit lay them out), ``quant_plan.json``, and ``adapter/`` when LoRA adapters were trained on
the quantized base; written atomically and read back to the same logits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.types import CausalLM
from prunekit.pipeline.outputs import atomic_dir, write_json
from prunekit.quant.backend import backend_for, lora_custom_modules
from prunekit.quant.embedding import QuantizedEmbedding
from prunekit.quant.plan import PLAN_FILE, _head_name, _is_tied, check_plan, quant_targets, read_plan
from prunekit.quant.realise import _as_linear, _replace
from prunekit.quant.schemes import SCHEMES, QuantSettings

WEIGHTS_FILE = "model.safetensors"
ADAPTER_DIR = "adapter"


def save_quantized(
    model: CausalLM,
    tokenizer: Any,
    plan: Mapping[str, str],
    settings: QuantSettings,
    dtype: str,
    out_dir: Path,
    peft_model: CausalLM | None = None,
) -> None:
    """Write a quantized model directory (atomically): config, tokenizer, weights, plan, adapters."""
    from safetensors.torch import save_file

    from prunekit.models.provenance import make_reproducible

    with atomic_dir(out_dir) as tmp:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = base_state(model) if peft_model is not None else model.state_dict()
        if _is_tied(model):  # the embedding's matrix, tied back at load time
            head = _head_name(model)
            state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / WEIGHTS_FILE))
        write_json(tmp / PLAN_FILE, {"schemes": dict(plan), "settings": asdict(settings), "dtype": dtype})
        if peft_model is not None:
            peft_model.save_pretrained(tmp / ADAPTER_DIR)
        make_reproducible(tmp)


def base_state(model: CausalLM) -> dict[str, torch.Tensor]:
    """The state of a model peft has injected adapters into, as it was before: ``x.base_layer.y`` keys
    back to ``x.y`` and no adapter weights (those are saved by peft, in ``adapter/``)."""
    out = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / PLAN_FILE).is_file()


def load_quantized(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Any, dict[str, str]]:
    """(model in eval mode, tokenizer, plan) from :func:`save_quantized`'s directory, adapters attached."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunekit.models.loading import DTYPES, load_config

    p = Path(path)
    config = load_config(p)
    plan, settings, dtype = read_plan(p)
    if not (p / WEIGHTS_FILE).is_file():
        raise PrunekitError(f"no {WEIGHTS_FILE} in '{p}'; rerun the quantize stage")
    try:
        state = load_file(str(p / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise PrunekitError(f"'{p / WEIGHTS_FILE}' cannot be read (corrupt?): {e}") from e
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype]).to(device)
    from prunekit.models.families import adapter_for

    tied = _is_tied(model)
    check_plan(plan, quant_targets(model, adapter_for(config), embeddings=True))
    planned: dict[str, dict[str, torch.Tensor]] = {name: {} for name in plan}
    for key in list(state):
        owner = key.rsplit(".", 1)[0]
        while owner and owner not in planned:
            owner = owner.rpartition(".")[0]
        if owner:
            planned[owner][key[len(owner) + 1 :]] = state.pop(key)
    # The float part first, on the plain skeleton (bitsandbytes modules must not see a partial state).
    missing, unexpected = model.load_state_dict(state, strict=False)
    prefixes = tuple(n + "." for n in plan)
    missing = [k for k in missing if not k.startswith(prefixes) and k != "lm_head.weight"]
    if missing or unexpected:
        raise PrunekitError(
            f"'{p / WEIGHTS_FILE}' does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if tied:
        model.tie_weights()
    for name, scheme_name in plan.items():
        scheme, skeleton = SCHEMES.get(scheme_name), model.get_submodule(name)
        if isinstance(skeleton, nn.Embedding):
            sub = {k.removeprefix("linear."): v for k, v in planned[name].items()}
            loaded = backend_for(scheme).load(_as_linear(skeleton), scheme, settings, sub, device)
            module: nn.Module = QuantizedEmbedding(loaded, skeleton.weight.dtype)
        else:
            module = backend_for(scheme).load(skeleton, scheme, settings, planned[name], device)
        _replace(model, name, module, tied)
    model.eval()
    if (p / ADAPTER_DIR).is_dir():
        from peft import LoraConfig, PeftModel

        lora_config = LoraConfig.from_pretrained(str(p / ADAPTER_DIR))
        lora_config._register_custom_module(lora_custom_modules())
        model = PeftModel.from_pretrained(model, str(p / ADAPTER_DIR), config=lora_config).eval()
    tokenizer = AutoTokenizer.from_pretrained(p)
    return model, tokenizer, plan
