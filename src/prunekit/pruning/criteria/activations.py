"""Streaming statistics of the inputs of o_proj and down_proj, and the base of criteria built on them.

The inputs of ``o_proj`` (the per-head attention outputs, concatenated: head ``h`` owns columns
``[h * head_dim, (h + 1) * head_dim)``) and of ``down_proj`` (``act(gate(x)) * up(x)``) are the
"transitional activations" of TransAct and the "input features" of FLAP and Wanda-sp. One forward pass
over the calibration windows collects, per input channel j and over all N*T tokens t (float64):

    n = N * T,   S_j = sum_t x_tj,   Q_j = sum_t x_tj^2
    mean_j = S_j / n
    var_j  = (Q_j - S_j^2 / n) / (n - 1)        (sample variance: FLAP's "fluctuation")
    ||X_j||_2 = sqrt(Q_j)                        (L2 norm over tokens and samples)

Memory is O(channels) per projection: activations are reduced in the hook and never stored. The
sum-of-squares form of the variance loses digits only when |mean_j| / std_j approaches 1e8 (float64),
far outside what these activations show.

Criteria on these statistics subclass :class:`ActivationCriterion`: they give a per-channel score for
each projection's input, and :meth:`ActivationCriterion.unit_scores` turns channel scores into the scores of
every unit type that declares the block of input columns it owns (``UnitType.input_of``, ``input_width``): by
default the sum over the block. They also return the channel means (``aux.mean.<proj>.<layer>``) that FLAP's bias
compensation (:mod:`prunekit.pruning.compensation`) folds into the projection's bias at prune time.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM, Submodule
from prunekit.pruning.criteria.base import LayerCriterion, ScoreRequest, Scores
from prunekit.pruning.units import UNITS
from prunekit.pruning.units.base import CONSUMERS, DOWN_PROJ, O_PROJ

log = logging.getLogger(__name__)

# Roles of the two projections whose inputs are observed; also the names used in ``aux.mean.*`` keys.
ROLES = CONSUMERS
AUX_MEAN_PREFIX = "aux.mean."
# Values converted to float64 at a time by ChannelStats.update (128 MiB).
CHUNK_VALUES = 1 << 24


def mean_key(role: str, layer: int) -> str:
    """Key of the channel means of ``role``'s input in layer ``layer`` in a scores file."""
    return f"{AUX_MEAN_PREFIX}{role}.{layer}"


def projection(adapter: ModelAdapter, layer: Submodule, role: str) -> nn.Linear:
    """The ``o_proj`` or ``down_proj`` module of ``layer``."""
    if role == O_PROJ:
        return getattr(adapter.attention(layer), adapter.o)
    if role == DOWN_PROJ:
        return getattr(adapter.mlp(layer), adapter.down)
    raise ValueError(f"unknown projection role {role!r}; expected one of {ROLES}")


@dataclass
class ChannelStats:
    """Running count, sum and sum of squares of each input channel (float64)."""

    count: int = 0
    sum: torch.Tensor | None = None
    sumsq: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (..., channels) to the statistics."""
        x = x.detach().reshape(-1, x.shape[-1])
        if self.sum is None:
            # Allocated lazily on the activation's device: with device_map="auto" layers sit on different GPUs.
            self.sum = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            self.sumsq = torch.zeros_like(self.sum)
        self.count += x.shape[0]
        # Row chunks bound the float64 copy (a 7B model's down_proj input is ~10^8 values per batch).
        for rows in x.split(max(1, CHUNK_VALUES // x.shape[-1])):
            rows = rows.to(torch.float64)
            self.sum += rows.sum(dim=0)
            self.sumsq += rows.square().sum(dim=0)

    def _checked(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sum is None or self.sumsq is None or self.count == 0:
            raise RuntimeError("no activations were recorded; did the forward pass reach this projection?")
        return self.sum, self.sumsq

    @property
    def mean(self) -> torch.Tensor:
        s, _ = self._checked()
        return s / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance (denominator n - 1) over all tokens; 0 for a single token."""
        s, q = self._checked()
        if self.count < 2:
            return torch.zeros_like(s)
        return ((q - s.square() / self.count) / (self.count - 1)).clamp_min(0.0)

    @property
    def l2(self) -> torch.Tensor:
        """L2 norm of each channel over all tokens and samples."""
        _, q = self._checked()
        return q.sqrt()

    def to_cpu(self) -> ChannelStats:
        s, q = self._checked()
        return ChannelStats(self.count, s.cpu(), q.cpu())


@contextmanager
def input_stats_hooks(
    model: CausalLM, adapter: ModelAdapter, layers: list[int]
) -> Iterator[dict[tuple[str, int], ChannelStats]]:
    """Forward pre-hooks that stream the inputs of o_proj / down_proj of ``layers`` into ChannelStats.

    The hooks are removed on exit, also when the body raises.
    """
    decoder_layers = adapter.layers(model)
    stats: dict[tuple[str, int], ChannelStats] = {}
    handles = []

    def hook_for(acc: ChannelStats) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            acc.update(args[0])

        return hook

    try:
        for idx in layers:
            for role in ROLES:
                acc = stats[(role, idx)] = ChannelStats()
                proj = projection(adapter, decoder_layers[idx], role)
                handles.append(proj.register_forward_pre_hook(hook_for(acc)))
        yield stats
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_input_stats(
    model: CausalLM, adapter: ModelAdapter, layers: list[int], calibration: torch.Tensor, batch_size: int
) -> dict[tuple[str, int], ChannelStats]:
    """Statistics of the o_proj / down_proj inputs of ``layers`` over all calibration tokens (on the CPU).

    Runs only the decoder (no LM head: its logits are not needed) in eval mode, without a KV cache.
    """
    decoder = model.get_decoder()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the statistics of the deterministic model
    try:
        with input_stats_hooks(model, adapter, layers) as stats:
            for start in tqdm(range(0, calibration.shape[0], batch_size), desc="activations", unit="batch"):
                decoder(input_ids=calibration[start : start + batch_size].to(device), use_cache=False)
    finally:
        model.train(was_training)
    return {key: s.to_cpu() for key, s in stats.items()}


@dataclass(frozen=True)
class LayerChannels:
    """Per-input-channel scores of one layer's o_proj and down_proj, with the attention geometry."""

    o: torch.Tensor  # (num_heads * head_dim,): column h * head_dim + d is dim d of query head h
    down: torch.Tensor  # (intermediate_size,)
    head_dim: int  # o_proj columns per query head (the value head width)
    num_heads: int
    num_kv_heads: int

    def of(self, role: str) -> torch.Tensor:
        return self.o if role == O_PROJ else self.down


def layer_geometry(adapter: ModelAdapter, layer: Submodule) -> tuple[int, int, int]:
    """(o_proj columns per query head, query heads, k/v heads) of ``layer``, true after slicing too.

    The k/v head count comes from k_proj's rows (per q/k head width) and the query heads per k/v head from
    the attention module (``num_key_value_groups``, kept current by the adapter), so the per-head width
    is read off o_proj: it is the value head width, which may differ from the q/k head width once head
    dims are pruned.
    """
    attn = adapter.attention(layer)
    kv = getattr(attn, adapter.k).out_features // adapter.qk_head_dim(attn)
    heads = kv * int(attn.num_key_value_groups)
    return projection(adapter, layer, O_PROJ).in_features // heads, heads, kv


class ActivationCriterion(LayerCriterion):
    """A criterion computed from one forward pass of o_proj / down_proj input statistics.

    Subclasses define :meth:`channel_scores` (one score per input channel of a projection) and may replace
    :meth:`unit_scores` (channel scores -> unit scores). Any unit type that declares ``input_of`` is scored.
    """

    @abstractmethod
    def channel_scores(self, stats: ChannelStats, weight: torch.Tensor) -> torch.Tensor:
        """Score of each input channel j of a projection with float64 ``weight`` (out, in) -> (in,)."""

    def unit_scores(self, ch: LayerChannels, role: str, width: int) -> torch.Tensor:
        """Scores of the units that own ``width`` contiguous input columns of ``role`` each: their channels' sum."""
        return ch.of(role).reshape(-1, width).sum(dim=1)

    def check_units(self, units: list[str]) -> None:
        """Fail before the forward pass on a unit type that owns no block of o_proj / down_proj inputs."""
        for unit in units:
            if unit not in UNITS or not UNITS.get(unit).input_of:
                supported = sorted(n for n, u in UNITS.items() if u.input_of)
                raise PrunekitError(
                    f"criterion '{self.name}' does not support unit type '{unit}' (supported: {', '.join(supported)})"
                )

    def check(self, model: CausalLM, adapter: ModelAdapter, req: ScoreRequest) -> None:
        self.check_units(req.units)

    def probe(self, adapter: ModelAdapter, idx: int, layer: Submodule, req: ScoreRequest) -> _StatsProbe:
        return _StatsProbe(self, adapter, idx, layer, list(req.units))

    def layer_scores(
        self, adapter: ModelAdapter, idx: int, layer: Submodule, units: list[str], stats: dict[str, ChannelStats]
    ) -> tuple[Scores, dict[str, torch.Tensor]]:
        """(scores, channel means) of layer ``idx`` from its projections' input statistics (``stats[role]``)."""
        hd, heads, kv = layer_geometry(adapter, layer)
        scores: Scores = {}
        aux: dict[str, torch.Tensor] = {}
        per_role = {}
        for role in ROLES:
            w = projection(adapter, layer, role).weight.detach().to("cpu", torch.float64)
            per_role[role] = self.channel_scores(stats[role], w)
            aux[mean_key(role, idx)] = stats[role].mean
        ch = LayerChannels(per_role[O_PROJ], per_role[DOWN_PROJ], hd, heads, kv)
        for unit in units:
            ut = UNITS.get(unit)
            s = self.unit_scores(ch, ut.input_of, ut.input_width(adapter, layer)).to(torch.float64)
            expected = ut.count(adapter, layer)
            if s.shape != (expected,):
                raise RuntimeError(f"{self.name}: {unit} of layer {idx} got {tuple(s.shape)} scores, not {expected}")
            scores[f"{unit}.{idx}"] = s
        return scores, aux


class _StatsProbe:
    """Input statistics of one layer's o_proj and down_proj, turned into its scores at the end."""

    def __init__(
        self, criterion: ActivationCriterion, adapter: ModelAdapter, idx: int, layer: Submodule, units: list[str]
    ) -> None:
        self.criterion, self.adapter, self.idx, self.layer, self.units = criterion, adapter, idx, layer, units
        self.stats = {role: ChannelStats() for role in ROLES}
        self.handles = [
            projection(adapter, layer, role).register_forward_pre_hook(
                lambda _m, args, acc=self.stats[role]: acc.update(args[0])
            )
            for role in ROLES
        ]

    def finish(self) -> tuple[Scores, dict[str, torch.Tensor]]:
        stats = {role: s.to_cpu() for role, s in self.stats.items()}
        return self.criterion.layer_scores(self.adapter, self.idx, self.layer, self.units, stats)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
