"""Which llama.cpp type each weight of a GGUF file gets: one type for all, or a searched plan's."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.types import CausalLM
from prunekit.quant.gguf_types import check_encoder, fake_quantize


@dataclass(frozen=True)
class TensorTypes:
    """Which llama.cpp type each weight gets: ``tensors`` by module name (``model.layers.3.mlp.down_proj``,
    ``model.embed_tokens``, ``lm_head``), every other weight ``default``; ``embedding`` and ``output``, where given,
    override the token embedding's and an untied output head's (an output head the others leave open takes the
    embedding's type); norms and biases are F32. ``labels``: where the user gave ``default``, ``embedding`` and
    ``output`` (an option or a params key), named by a refusal."""

    default: str = "F16"
    embedding: str | None = None
    output: str | None = None
    tensors: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)

    def kind(self, module: str, role: str = "weight") -> str:
        """The type of ``module``'s 2-D weight, upper case; ``role``: ``embedding``, ``output`` or ``weight``."""
        if role == "embedding":
            return (self.embedding or self.tensors.get(module) or self.default).upper()
        if role == "output":
            return (self.output or self.tensors.get(module) or self.embedding or self.default).upper()
        return self.tensors.get(module, self.default).upper()

    def check(self) -> None:
        for what, name in (("default", self.default), ("embedding", self.embedding), ("output", self.output)):
            if name is not None:
                check_encoder(name, self.labels.get(what, f"GGUF type of {what}"))
        for module, name in self.tensors.items():
            check_encoder(name, f"GGUF type of {module}")


def rounded(model: CausalLM, types: TensorTypes) -> nn.Module:
    """A copy of ``model`` whose 2-D weights are rounded as a file of these types stores them: the float model
    that computes what the file computes, up to the runtime's own arithmetic."""
    out = copy.deepcopy(model)
    embedding, output = out.get_input_embeddings().weight, out.get_output_embeddings().weight
    done: set[int] = set()
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.dim() != 2 or id(p) in done:
                continue
            role = "embedding" if p is embedding else "output" if p is output else "weight"
            p.copy_(fake_quantize(p, types.kind(name.rsplit(".", 1)[0], role)))
            done.add(id(p))
    return out


def plan_types(
    plan: Mapping[str, str],
    default: str,
    embedding: str | None,
    output: str | None,
    labels: Mapping[str, str] | None = None,
) -> TensorTypes:
    """The types of a searched quantization plan (module -> scheme): llama.cpp block schemes as they are,
    ``fp16`` / ``bf16`` as F16 / BF16; other schemes have no llama.cpp type (an error names them)."""
    from prunekit.quant.backend import backend_for
    from prunekit.quant.schemes import SCHEMES

    tensors: dict[str, str] = {}
    for module, name in plan.items():
        scheme = SCHEMES.get(name)
        kind = backend_for(scheme).gguf_type(scheme)
        if kind is None:
            raise PrunekitError(
                f"the quantization plan gives {module} the scheme '{name}', which llama.cpp cannot store; search "
                "over llama.cpp's types (search.choices from q4_0, q4_1, q5_0, q5_1, q8_0, q2_k .. q6_k, fp16) or "
                "export one type for every weight (export.types)"
            )
        tensors[module] = kind
    return TensorTypes(default=default, embedding=embedding, output=output, tensors=tensors, labels=labels or {})


def choose_types(
    types: str,
    plan_file: Path | None,
    *,
    unplanned: str = "F16",
    embedding: str | None = None,
    output: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> TensorTypes:
    """``types`` "plan": the types of the quantization plan in ``plan_file`` (a plan JSON or a quantized model
    directory), ``unplanned`` for the weights it does not cover; else the type ``types`` for every weight.
    ``labels``: where the user gave each value (:class:`TensorTypes`)."""
    if types != "plan":
        return TensorTypes(default=types, embedding=embedding, output=output, labels=labels or {})
    if plan_file is None:
        raise PrunekitError(
            "GGUF export with the plan's types needs the plan: give its file (or a type for every weight)"
        )
    from prunekit.quant.plan import read_plan

    if not plan_file.exists():
        raise PrunekitError(f"quantization plan '{plan_file}' does not exist; run the search stage (dvc repro search)")
    plan, _, _ = read_plan(plan_file)
    return plan_types(plan, unplanned, embedding, output, labels)
