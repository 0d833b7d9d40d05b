"""LLM-Pruner's channel-wise mode: one channel of the hidden (residual) dimension across the whole model.

Hidden channel ``c`` is entry ``c`` of the residual stream, so it lives in every place that stream is read
or written: column ``c`` of ``embed_tokens``; entry ``c`` of every RMSNorm weight (the family's ``hidden_norms``
in each layer and the final norm); input column ``c`` of q/k/v/gate/up in every layer; output row ``c`` of o_proj
and down_proj (and of their biases, where a family has them) in every layer; column ``c`` of ``lm_head`` (with tied
embeddings that is the embedding's column, counted once). The members are listed through the link
``ModelAdapter.layers`` gives each layer to its model, so the criteria that sum over members (random,
l1/l2, Taylor) score a hidden channel over everything it holds, without knowing it is model-wide.

Fitting the planner. The unit is model-wide: :func:`prunekit.pruning.slicing.layouts` gives it one layout, named by
layer 0, with ``count`` = hidden size, ``params_per_unit`` = all parameters one channel holds, and every tensor it
slices; the allocations treat that layout like any other (uniform: the kept count is ``hidden * (1 - r)`` rounded
to ``prune.round_to["hidden_channel"]``; the search: one ratio for the whole model, traded against the per-layer
types). ``prune.skip_first/skip_last`` do not protect layers from it (the residual stream has one width). Planned
with other unit types, the parameters they remove overlap (a KV group's q_proj rows lose their removed hidden
columns too): :func:`prunekit.pruning.plan.removed_params` multiplies the kept shares of every tensor's axes, so
each parameter is counted once. A plan from ``make_plan`` has one entry; a
hand-written plan with entries at several layer indices keeps their union (a channel goes only if every
entry drops it, since dropping it anywhere drops it everywhere).

RMSNorm is not channel-separable. ``RMSNorm(x)_i = w_i x_i / sqrt(S / d + eps)`` with ``S`` the sum of
``x_j^2``: the mean runs over all ``d`` channels. Removing channels whose residual entries are zero leaves
``S`` unchanged but divides by the kept ``d'`` instead of ``d``, so a sliced model whose norms are copied
as they are (LLM-Pruner) computes norm outputs ``sqrt(d'/d)`` times smaller (about 0.89 at 20%) than the
masked dense model (channels zeroed everywhere, residual zero there): it is a different model. We choose
to keep the masked model's function. At slice time each kept norm weight is multiplied by ``sqrt(d / d')``
and each norm's epsilon (and ``rms_norm_eps`` in the config) by ``d / d'``:

    sqrt(d/d') w x / sqrt(S/d' + eps d/d') = w x / sqrt((d'/d) (S/d' + eps d/d')) = w x / sqrt(S/d + eps),

which is the masked model's norm exactly (weights only: without the epsilon change the relative error
would be about ``eps (d/d' - 1) / (2 (S/d + eps))``). Families whose per-head q/k norms read the same config
epsilon (Qwen3) get it scaled there too, as a reload would; since ``w (c q) / sqrt(mean((c q)²) + c² eps) =
w q / sqrt(mean(q²) + eps)``, the rows of q_proj and k_proj are scaled by ``c = sqrt(d / d')`` with it, so those
norms compute exactly what they did. A sliced model therefore equals the masked one up to
floating-point rounding, also after ``save_pretrained`` / ``from_pretrained`` (the epsilon is a config
value). The config's ``hidden_size`` becomes ``d'``; ``head_dim`` stays explicit. With no other pruning (or
uniform widths) the model saves with its family's stock config.

Saving needs ``d'`` to be a multiple of the config's ``num_attention_heads``: transformers 5 validates
``hidden_size % num_attention_heads == 0`` in ``save_pretrained``, for prunekit's config too (its
``validate_architecture`` override is not among the strict validators the Llama config class collected).
Set ``prune.round_to.hidden_channel`` to a multiple of the number of query heads (LLaMA-7B: 32; SmolLM2:
9, or 72 to also keep multiples of 8). Slicing to another width works in memory and logs a warning.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ROOT_ATTR, ModelAdapter, RootLink, config_head_dim
from prunekit.models.types import CausalLM, Submodule
from prunekit.pruning.units.base import UNITS, Member, UnitType

log = logging.getLogger(__name__)


def model_of(adapter: ModelAdapter, layer: Submodule) -> CausalLM:
    """The model ``layer`` belongs to, through the link ``adapter.layers(model)`` set on it."""
    link = layer.__dict__.get(ROOT_ATTR)
    model = link.target if isinstance(link, RootLink) else None
    # A stale link (e.g. a layer moved to another model) must not resolve to the wrong model's weights.
    if model is None or not any(other is layer for other in adapter.layers(model)):
        raise PrunekitError("hidden_channel needs the decoder layer's model: take layers from adapter.layers(model)")
    return model


def hidden_norms(adapter: ModelAdapter, model: CausalLM) -> list[Submodule]:
    """Every RMSNorm over the hidden dimension: the family's per decoder layer, then the final norm."""
    norms = [layer.get_submodule(n) for layer in adapter.layers(model) for n in adapter.hidden_norms]
    return [*norms, model.get_decoder().norm]


class HiddenChannel(UnitType):
    """One hidden (residual) channel in every module of the model (LLM-Pruner's channel-wise mode)."""

    name = "hidden_channel"
    description = (
        "hidden (residual) channel of the whole model: embedding and lm_head column, every norm entry, "
        "q/k/v/gate/up input column and o/down output row in every layer (LLM-Pruner channel-wise); one width for "
        "the whole model"
    )
    model_wide = True

    def count(self, adapter: ModelAdapter, layer: Submodule) -> int:
        return getattr(adapter.attention(layer), adapter.q).in_features

    def members(self, adapter: ModelAdapter, layer: Submodule) -> list[Member]:
        model = model_of(adapter, layer)
        # Model-relative names; a tied lm_head shares the embedding's parameter and is listed once.
        names = {id(p): n for n, p in model.named_parameters()}

        def member(p: torch.Tensor, dim: int) -> Member:
            return Member(f"{ROOT_ATTR}.{names[id(p)]}", dim, 1)

        out = [member(model.get_input_embeddings().weight, 1)]
        for lay in adapter.layers(model):
            attn, mlp = adapter.attention(lay), adapter.mlp(lay)
            norms: list[Submodule] = [lay.get_submodule(n) for n in adapter.hidden_norms]
            out += [member(norm.weight, 0) for norm in norms]
            out += [member(getattr(attn, p).weight, 1) for p in (adapter.q, adapter.k, adapter.v)]
            out += [member(getattr(mlp, p).weight, 1) for p in (adapter.gate, adapter.up)]
            for proj in (getattr(attn, adapter.o), getattr(mlp, adapter.down)):
                out.append(member(proj.weight, 0))
                if proj.bias is not None:
                    out.append(member(proj.bias, 0))
        out.append(member(model.get_decoder().norm.weight, 0))
        head = model.get_output_embeddings()
        if head.weight is not model.get_input_embeddings().weight:
            out.append(member(head.weight, 1))
        return out

    def apply_model(self, model: CausalLM, adapter: ModelAdapter, keep: dict[int, list[int]], mode: str) -> None:
        layers = adapter.layers(model)
        d = self.count(adapter, layers[0])
        kept = sorted(set().union(*keep.values())) if keep else list(range(d))
        if len({tuple(sorted(k)) for k in keep.values()}) > 1:
            log.warning("hidden_channel plan has %d different entries; keeping their union", len(keep))
        if not kept:
            raise PrunekitError("the plan removes every hidden channel; keep at least one")
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = head.weight is emb.weight
        self.apply(adapter, layers[0], torch.tensor(kept, dtype=torch.long), mode)
        if mode != "slice" or len(kept) == d:
            return
        emb.embedding_dim = len(kept)
        if tied:
            head.weight = emb.weight  # slicing gave the embedding a new Parameter: tie it again
            head.in_features = len(kept)
        rescale_norms(model, adapter, d, len(kept))
        log.info("kept %d of %d hidden channels", len(kept), d)
        heads = int(model.config.num_attention_heads)
        if len(kept) % heads:
            log.warning(
                "kept %d hidden channels, not a multiple of num_attention_heads=%d: transformers will refuse to "
                "save this model; set prune.round_to.hidden_channel to a multiple of %d",
                len(kept),
                heads,
                heads,
            )


def rescale_norms(model: CausalLM, adapter: ModelAdapter, d: int, d_kept: int) -> None:
    """Make RMSNorms over ``d_kept`` channels compute what they computed over ``d`` channels, of which
    ``d - d_kept`` were zero: weights times sqrt(d / d_kept), epsilon times d / d_kept (module docstring)."""
    ratio = d / d_kept
    for norm in hidden_norms(adapter, model):
        norm.weight.data.mul_(math.sqrt(ratio))
        norm.variance_epsilon = norm.variance_epsilon * ratio
    # Per-head q/k norms (Qwen3) take their epsilon from the same config value, which a reload reads. A norm's
    # output does not change when its input is scaled by c and its epsilon by c² (module docstring), so their
    # projections' rows are scaled by sqrt(d / d_kept) as their epsilon becomes eps * d / d_kept: the same outputs.
    for layer in adapter.layers(model):
        attn = adapter.attention(layer)
        for proj, name in ((adapter.q, "q_norm"), (adapter.k, "k_norm")):
            qk_norm = getattr(attn, name, None)
            if qk_norm is None:
                continue
            qk_norm.variance_epsilon = qk_norm.variance_epsilon * ratio
            linear = getattr(attn, proj)
            linear.weight.data.mul_(math.sqrt(ratio))
            if linear.bias is not None:
                linear.bias.data.mul_(math.sqrt(ratio))
    configs: dict[int, Any] = {id(c): c for c in (model.config, model.get_decoder().config)}
    for config in configs.values():
        # Families without a ``head_dim`` field (Qwen2) derive it from hidden_size: pin it before that changes.
        config.head_dim = config_head_dim(config)
        config.hidden_size = d_kept
        config.rms_norm_eps = config.rms_norm_eps * ratio


UNITS.register(HiddenChannel.name)(HiddenChannel())
