"""QLoRA adapters as llama.cpp's LoRA adapter file.

:func:`write_lora_gguf` writes peft's LoRA adapters (the ``quantize`` stage's, trained on the base in the plan's
types) as llama.cpp's LoRA adapter file (``general.type`` adapter, ``adapter.lora.alpha``, a ``.lora_a`` /
``.lora_b`` pair per adapted weight, q/k ``B`` rows permuted as their weights are), which llama.cpp applies at run
time beside the model file (``--lora``); nothing is merged, so the base keeps its quantized blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import PrunekitError
from prunekit.export.architecture import PAIR_ROPE_ARCHS, check_exportable, pair_rows
from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM
from prunekit.pipeline.outputs import atomic_file

log = logging.getLogger(__name__)

ADAPTER_GGUF = "adapter.gguf"  # the QLoRA adapters, beside model.gguf


def read_lora(adapter_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """peft's LoRA adapters in ``adapter_dir`` (adapter_config.json, adapter_model.safetensors): module name ->
    (A (rank x in), B (out x rank)), and llama.cpp's alpha (its scale is alpha / rank: peft's alpha, times
    sqrt(rank) for rsLoRA). Adapters llama.cpp cannot apply as a plain LoRA are refused."""
    import json
    import math
    import re

    from safetensors.torch import load_file

    config_file, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for f in (config_file, weights):
        if not f.is_file():
            raise PrunekitError(f"'{adapter_dir}' has no {f.name}: not a LoRA adapter directory (peft's save)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        state = load_file(str(weights))
    except Exception as e:  # json's and safetensors' own error types for truncated or corrupt files
        raise PrunekitError(f"LoRA adapter in '{adapter_dir}' cannot be read (corrupt?): {e}") from e
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "fan_in_fan_out") if config.get(k)]
    if config.get("peft_type") != "LORA" or unsupported:
        raise PrunekitError(
            f"the adapter in '{adapter_dir}' is {config.get('peft_type')} with {unsupported or 'no options'}; "
            "llama.cpp's LoRA files hold plain LoRA (one rank and alpha, no DoRA): merge it into the weights instead"
        )
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    if config.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(rank)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        if m is None:
            raise PrunekitError(f"the adapter in '{adapter_dir}' holds '{key}', not a LoRA A/B weight of a Linear")
        pairs.setdefault(m[1], {})[m[2]] = tensor
    if not pairs or any(len(ab) != 2 for ab in pairs.values()):
        raise PrunekitError(f"the adapter in '{adapter_dir}' holds no complete LoRA A/B pairs")
    return {module: (ab["A"], ab["B"]) for module, ab in sorted(pairs.items())}, alpha


@dataclass(frozen=True)
class LoraTensors:
    """A LoRA adapter checked against its model, in llama.cpp's names and row order: (name, A, B) per weight."""

    arch: str
    alpha: float
    tensors: list[tuple[str, torch.Tensor, torch.Tensor]]


def lora_tensors(
    model: CausalLM, adapter: ModelAdapter, lora: tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]
) -> LoraTensors:
    """:func:`read_lora`'s adapters, trained on ``model``, named and permuted as :func:`write_gguf` names and
    permutes the weights (a PrunekitError if an adapter does not fit its weight)."""
    import gguf

    pairs, alpha = lora
    arch = check_exportable(model, adapter)
    sizes = adapter.all_layer_sizes(model)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], len(sizes))
    tensors = []
    for module, (a, b) in pairs.items():
        gname = names.get_name(module + ".weight", try_suffixes=(".weight",))
        try:
            shape = tuple(model.get_submodule(module).weight.shape)
        except AttributeError:
            shape = None
        if gname is None or shape != (b.shape[0], a.shape[1]) or a.shape[0] != b.shape[1]:
            raise PrunekitError(
                f"the adapter of '{module}' ({b.shape[0]} x {a.shape[1]}, rank {a.shape[0]}) does not fit the model's "
                "weights: was it trained on another model? Rerun the quantize stage"
            )
        if arch in PAIR_ROPE_ARCHS and (".attn_q." in gname or ".attn_k." in gname):
            size = sizes[int(gname.split(".")[1])]
            b = pair_rows(b, size.num_attention_heads if ".attn_q." in gname else size.num_key_value_heads)
        tensors.append((gname, a, b))
    return LoraTensors(arch, alpha, tensors)


def write_lora_gguf(lora: LoraTensors, out: Path) -> dict[str, Any]:
    """llama.cpp's LoRA adapter file of :func:`lora_tensors`' adapters (float32). Returns a summary (adapted
    weights, rank, alpha, bytes). Nothing is left at ``out`` unless the whole file was written."""
    import gguf

    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, lora.arch)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.alpha)
            for gname, a, b in lora.tensors:
                writer.add_tensor(gname + ".lora_a", a.detach().to(torch.float32).contiguous().numpy())
                writer.add_tensor(gname + ".lora_b", b.detach().to(torch.float32).contiguous().numpy())
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    rank = int(lora.tensors[0][1].shape[0])
    log.info("wrote %s: LoRA on %d weights, rank %d, alpha %g", out, len(lora.tensors), rank, lora.alpha)
    return {"adapted_weights": len(lora.tensors), "rank": rank, "alpha": lora.alpha, "bytes": out.stat().st_size}
