"""LLM-BIP: block-wise importance from one forward pass, bounded by a Lipschitz argument (``bip``).

Source: "LLM-BIP: Structured Pruning for Large Language Models with Block-Wise Forward Importance
Propagation". The public record gives the idea (a unit's importance is its influence on the output of its
transformer block, bounded via Lipschitz continuity, from one forward pass, no gradients) but not the bound;
the derivation below is ours.

Notation, per token (the block acts on each token's hidden state separately except inside attention)::

    x1 = N1(h);  a = Attn(x1);  u = h + a;  x2 = N2(u);  z = W_g x2;  v = W_u x2;
    s = act(z);  m = W_d (s * v);  y = u + m            (N = RMSNorm, y = block output)

**MLP channel j** (row j of W_g, W_u, column j of W_d). Removing it leaves h, a, u, x2 and every other
channel unchanged, so ``Δy = -W_d[:, j] s_j v_j`` and ``||Δy|| = ||W_d[:, j]||_2 |s_j v_j|`` *exactly*.

**Attention unit** (a KV group: one k/v head with its n_rep query heads; or one query head). Softmax runs
per head over keys, so heads share nothing before o_proj: removing a set H of heads removes exactly their
terms of o_proj, ``δ = -W_o[:, H] o_H`` (o_H = the heads' softmax·V outputs at this token). δ is formed per
unit and token (all units together cost one o_proj matmul), which gives ``||δ||`` exactly (tighter than
``||W_o[:, H]||_2 ||o_H||``) and ``u·δ``. The change then passes through the MLP branch: with
F = MLP∘N2, ``Δy = δ + F(u + δ) - F(u)``, so ``||Δy|| <= ||δ|| + ||F(u + δ) - F(u)||``, and:

* RMSNorm, ``N2(v) = w ⊙ n(v)`` with ``n(v) = v / r(v)``, ``r(v) = sqrt(||v||²/d + eps)``. The weight w is
  folded into the MLP (``W_g diag(w)``, ``W_u diag(w)``; below W_g, W_u mean the folded matrices: their
  spectral norms are often far below ``||W|| max|w|`` in trained models). RMSNorm is not usefully Lipschitz
  (its Jacobian ``(I - v vᵀ/(d r²)) / r`` has norm up to 1/sqrt(eps) near v = 0), so no Lipschitz constant is
  used for it: n(u + δ) depends on δ only through ``||δ||²`` and ``u·δ`` (``r(u + δ)² = r(u)² +
  (2 u·δ + ||δ||²)/d``), so ``ρ = ||n(u + δ) - n(u)||`` is computed *exactly* from those two scalars
  (:func:`_normalized_change`), at any distance from 0.
* MLP, ``M(x) = W_d (act(W_g x) ⊙ W_u x)``, on the segment from x0 = n(u) to n(u + δ), inside the ball
  B(x0, ρ): ``||M(x1) - M(x0)|| <= sup_ball ||J_M|| ρ`` (mean-value inequality), ``J_M(x) = W_d (D1 W_g +
  D2 W_u)``, ``D1 = diag(act'(z) v)``, ``D2 = diag(act(z))``. On the ball ``|v_i - v_i(x0)| <= ||W_u[i]|| ρ``
  and ``|z_i - z_i(x0)| <= ||W_g[i]|| ρ``, so with L_act = sup|act'|: ``|D1_i| <= L_act (|v_i| +
  ||W_u[i]|| ρ)`` and ``|D2_i| <= |s_i| + L_act ||W_g[i]|| ρ`` (z, v, s at x0). Each of ``||W_d D W||``
  (W = W_g or W_u) is bounded by the smallest of three valid bounds, ``||W_d|| max|D| ||W||``,
  ``||W_d|| ||D W||_F`` and ``||W_d D||_F ||W||`` (spectral norms of the weights; the Frobenius sums over
  channels expanded with Minkowski's inequality), each affine in ρ with per-token coefficients:
  ``L_M(ρ)`` = sum of the two minima, an upper bound on the MLP's Lipschitz constant on the ball.

Hence, per token, the *strict* bound ``||Δy|| <= b = ||δ|| + ρ · L_M(ρ)``. It needs per unit ``||δ||`` and
``u·δ``, per token u, z and v, per layer weight norms: one forward pass with hooks, no backward, no per-unit
re-evaluation of any module. L_act is the largest secant slope of the activation on a 1e-3 grid over
[-60, 60] times 1.001 (SiLU: 1.0998); outside that range the activations of these families have slopes in
[0, 1]. Only float rounding can break it: the model's own arithmetic, in float32 (float64 for float64 models).

``score.bip_bound: local`` uses L_M(0), the MLP's Jacobian bound at x0 only: a first-order bound
(``||Δy|| <= ||δ|| + L_M(0) ρ + O(ρ²)``), not strict. On SmolLM2-135M it is ~2-4x tighter and ranks units
closer to their measured block-output change than ``strict`` (see the tests' module docstring).

Score of a unit = mean over all calibration tokens of its per-token bound (so ``strict`` upper-bounds the
mean per-token change of the block output; for MLP channels it equals it). Attention and MLP scores are
both in units of block-output change, hence comparable across unit types and layers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM, Submodule
from prunekit.pruning.criteria.base import CRITERIA, LayerCriterion, ScoreRequest, Scores, forward_decoder
from prunekit.pruning.units import UNITS
from prunekit.pruning.units.base import DOWN_PROJ, O_PROJ

log = logging.getLogger(__name__)

# The RMSNorm before the MLP: the same name in every supported family (Llama, Mistral, Qwen2).
POST_ATTN_NORM = "post_attention_layernorm"

# Called once per scored layer and batch with (key "<unit>.<layer>", per-token bounds (tokens, count)).
Sink = Callable[[str, torch.Tensor], None]


@torch.no_grad()
def activation_lipschitz(act: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """sup |act'| estimated as the largest secant slope on a 1e-3 grid over [-60, 60], times 1.001.

    Secant slopes never exceed sup |act'| (mean-value theorem) and approach it on a fine grid; the margin
    covers the grid's O(step²) shortfall for smooth activations.
    """
    grid = torch.linspace(-60.0, 60.0, 120_001, dtype=torch.float64)
    y = act(grid)
    return float((y.diff() / grid.diff()).abs().max()) * 1.001


@dataclass
class _LayerConstants:
    """Per-layer weight quantities the bound needs, computed once before the forward pass."""

    dtype: torch.dtype  # float64 for float64 models (exact checks), else float32
    w_o: torch.Tensor  # (hidden, heads * v_head_dim)
    v_head_dim: int
    n_rep: int
    norm_eps: float
    act: Callable[[torch.Tensor], torch.Tensor]
    lip_act: float
    spec_g: float
    spec_u: float
    spec_d: float
    # W_g, W_u below are the folded W_g diag(w), W_u diag(w) (w = the post-attention norm's weight).
    row_g: torch.Tensor  # ||W_g[i]||, (I,)
    row_u: torch.Tensor  # ||W_u[i]||
    col_d: torch.Tensor  # ||W_d[:, i]||
    # Channel-independent slopes of the affine-in-rho bounds (see _mlp_lipschitz).
    max_row_u: float
    max_row_g: float
    frob_ug: float  # sqrt(sum_i ||W_u[i]||² ||W_g[i]||²)
    frob_ud: float  # sqrt(sum_i ||W_u[i]||² ||W_d[:, i]||²)
    frob_gd: float  # sqrt(sum_i ||W_g[i]||² ||W_d[:, i]||²)


def _spectral(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w, ord=2))


def _layer_constants(adapter: ModelAdapter, layer: Submodule, lip_cache: dict[str, float]) -> _LayerConstants:
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    w_g = getattr(mlp, adapter.gate).weight.detach()
    # Half-precision models are bounded in float32; float64 models keep float64.
    dt = torch.float64 if w_g.dtype == torch.float64 else torch.float32
    w_g = w_g.to(dt)
    w_u = getattr(mlp, adapter.up).weight.detach().to(dt)
    w_d = getattr(mlp, adapter.down).weight.detach().to(dt)
    norm = layer.get_submodule(POST_ATTN_NORM)
    norm_w = norm.weight.detach().to(dt)
    # Fold the norm's weight into the MLP input weights: ||W diag(w)|| is often far below ||W|| max|w|
    # (trained norms have a few large weights), and the unit-weight norm's change is computed exactly.
    w_g, w_u = w_g * norm_w, w_u * norm_w
    act = mlp.act_fn
    act_key = f"{type(act).__name__}({act!r})"
    if act_key not in lip_cache:
        lip_cache[act_key] = activation_lipschitz(act)
        log.info("bip: Lipschitz constant of %s = %.5f", act_key, lip_cache[act_key])
    row_g, row_u, col_d = w_g.norm(dim=1), w_u.norm(dim=1), w_d.norm(dim=0)
    return _LayerConstants(
        dtype=dt,
        w_o=getattr(attn, adapter.o).weight.detach().to(dt),
        # o_proj has v_head_dim columns per query head (differs from q/k width once head dims are pruned).
        v_head_dim=adapter.v_head_dim(attn),
        n_rep=getattr(attn, adapter.q).out_features // getattr(attn, adapter.k).out_features,
        norm_eps=float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))),
        act=act,
        lip_act=lip_cache[act_key],
        spec_g=_spectral(w_g),
        spec_u=_spectral(w_u),
        spec_d=_spectral(w_d),
        row_g=row_g,
        row_u=row_u,
        col_d=col_d,
        max_row_u=float(row_u.max()),
        max_row_g=float(row_g.max()),
        frob_ug=float((row_u * row_g).norm()),
        frob_ud=float((row_u * col_d).norm()),
        frob_gd=float((row_g * col_d).norm()),
    )


def _attn_changes(
    o_in: torch.Tensor, u: torch.Tensor, w_o: torch.Tensor, heads_per_unit: int, v_head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each unit k of ``heads_per_unit`` consecutive heads, per token: ||δ_k|| and u·δ_k -> 2 x (tokens, K).

    δ_k = -W_o[:, H_k] o_{H_k} is the change of the attention output (and of u) when unit k is removed.
    """
    width = heads_per_unit * v_head_dim
    norms, dots = [], []
    for k in range(o_in.shape[-1] // width):
        cols = slice(k * width, (k + 1) * width)
        # One matmul per unit (tokens x width x hidden): all units together cost one o_proj.
        delta = -(o_in[:, cols] @ w_o[:, cols].T)  # (tokens, hidden)
        norms.append(delta.norm(dim=-1))
        dots.append((delta * u).sum(dim=-1))
    return torch.stack(norms, dim=-1), torch.stack(dots, dim=-1)


def _normalized_change(dnorm: torch.Tensor, dot: torch.Tensor, u: torch.Tensor, eps: float) -> torch.Tensor:
    """Exact ||n(u + δ) - n(u)||, n(v) = v / sqrt(mean(v²) + eps), from ||δ|| and u·δ (tokens, K).

    n(u + δ) - n(u) = δ / r' + u (1/r' - 1/r); split δ into its component along u and the rest, and write
    1/r' - 1/r without cancellation, so the result is accurate when δ is small.
    """
    d = u.shape[-1]
    unorm2 = u.pow(2).sum(dim=-1, keepdim=True)  # (tokens, 1)
    unorm = unorm2.sqrt()
    r = (unorm2 / d + eps).sqrt()
    grow = (2 * dot + dnorm.pow(2)) / d  # r'² - r²
    r2 = (r.pow(2) + grow).clamp_min(eps).sqrt()
    inv_diff = -grow / (r * r2 * (r + r2))  # 1/r' - 1/r
    along = torch.where(unorm > 0, dot / unorm.clamp_min(torch.finfo(u.dtype).tiny), torch.zeros_like(dot))
    across2 = (dnorm.pow(2) - along.pow(2)).clamp_min(0.0)
    return (across2 / r2.pow(2) + (along / r2 + inv_diff * unorm).pow(2)).sqrt()


def _mlp_lipschitz(
    c: _LayerConstants, z: torch.Tensor, v: torch.Tensor, s: torch.Tensor, rho: torch.Tensor
) -> torch.Tensor:
    """Upper bound of ||J_MLP|| on the ball B(x0, rho), x0 = n(u), per token and unit.

    z, v, s: (tokens, I) at x0; rho: (tokens, K). Each bound is alpha(token) + beta * rho; see module docstring.
    """
    lip = c.lip_act
    vg, vd = (v * c.row_g).norm(dim=-1), (v * c.col_d).norm(dim=-1)
    su, sd = (s * c.row_u).norm(dim=-1), (s * c.col_d).norm(dim=-1)
    vmax, smax = v.abs().amax(dim=-1), s.abs().amax(dim=-1)

    def col(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(-1)

    # ||W_d D1 W_g||, |D1_i| <= L (|v_i| + ||W_u[i]|| rho)
    t1 = torch.minimum(
        torch.minimum(
            c.spec_d * c.spec_g * lip * (col(vmax) + c.max_row_u * rho),
            c.spec_d * lip * (col(vg) + c.frob_ug * rho),
        ),
        c.spec_g * lip * (col(vd) + c.frob_ud * rho),
    )
    # ||W_d D2 W_u||, |D2_i| <= |s_i| + L ||W_g[i]|| rho
    t2 = torch.minimum(
        torch.minimum(
            c.spec_d * c.spec_u * (col(smax) + lip * c.max_row_g * rho),
            c.spec_d * (col(su) + lip * c.frob_ug * rho),
        ),
        c.spec_u * (col(sd) + lip * c.frob_gd * rho),
    )
    return t1 + t2


class _LayerRecorder:
    """Hooks on one decoder layer: capture what the bound needs, emit per-token bounds when the layer ends."""

    def __init__(
        self,
        idx: int,
        layer: Submodule,
        adapter: ModelAdapter,
        consts: _LayerConstants,
        units: list[str],
        bound: str,
        sink: Sink | None = None,
        n_tokens: int = 1,
    ) -> None:
        self.n_tokens = n_tokens
        self.idx, self.c, self.units, self.bound = idx, consts, units, bound
        self.sums: dict[str, torch.Tensor] = {}
        self.sink = sink or self._add
        self.cache: dict[str, torch.Tensor] = {}
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        # A unit is read through the block of o_proj / down_proj input columns it owns (UnitType.input_of).
        self.blocks = {u: (UNITS.get(u).input_of, UNITS.get(u).input_width(adapter, layer)) for u in units}
        need_attn = any(role == O_PROJ for role, _ in self.blocks.values())
        self.handles = [
            getattr(mlp, adapter.gate).register_forward_hook(self._keep_output("z")),
            getattr(mlp, adapter.up).register_forward_hook(self._keep_output("v")),
            layer.register_forward_hook(self._finish),
        ]
        if need_attn:
            self.handles += [
                getattr(attn, adapter.o).register_forward_pre_hook(self._keep_input("o_in")),
                layer.get_submodule(POST_ATTN_NORM).register_forward_pre_hook(self._keep_input("u")),
            ]

    def _keep_input(self, key: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.cache[key] = args[0].detach().to(self.c.dtype).reshape(-1, args[0].shape[-1])

        return hook

    def _keep_output(self, key: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            self.cache[key] = out.detach().to(self.c.dtype).reshape(-1, out.shape[-1])

        return hook

    def _finish(self, module: nn.Module, args: tuple, out: object) -> None:
        c, cache = self.c, self.cache
        z, v = cache.pop("z"), cache.pop("v")
        s = c.act(z)
        for unit in self.units:
            role, width = self.blocks[unit]
            if role == DOWN_PROJ:
                # Exact: ||Δy|| = ||W_d[:, j]|| |s_j v_j| (one channel per unit: run() checks the width).
                self.sink(f"{unit}.{self.idx}", (s * v).abs() * c.col_d)
                continue
            heads = width // c.v_head_dim  # the query heads whose o_proj columns the unit owns
            dnorm, dot = _attn_changes(cache["o_in"], cache["u"], c.w_o, heads, c.v_head_dim)  # (tokens, K) each
            self.sink(f"{unit}.{self.idx}", self._propagate(dnorm, dot, cache["u"], z, v, s))
        cache.clear()

    def _propagate(
        self, dnorm: torch.Tensor, dot: torch.Tensor, u: torch.Tensor, z: torch.Tensor, v: torch.Tensor, s: torch.Tensor
    ) -> torch.Tensor:
        """Bound on ||δ + F(u + δ) - F(u)|| per token and unit from ||δ|| and u·δ (tokens, K)."""
        rho = _normalized_change(dnorm, dot, u, self.c.norm_eps)
        # local: the MLP's Jacobian bound at the measured point only (first order in rho), not over the ball.
        ball = rho if self.bound == "strict" else torch.zeros_like(rho)
        return dnorm + rho * _mlp_lipschitz(self.c, z, v, s, ball)

    def _add(self, key: str, bounds: torch.Tensor) -> None:
        part = bounds.sum(dim=0).double().cpu()
        self.sums[key] = self.sums[key] + part if key in self.sums else part

    def finish(self) -> tuple[Scores, dict[str, torch.Tensor]]:
        """Mean per-token bound of each unit (the sums of the default sink over ``n_tokens``)."""
        return {key: total / self.n_tokens for key, total in self.sums.items()}, {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class BIPCriterion(LayerCriterion):
    """Bound on the change of the block output when the unit is removed, from one forward pass (LLM-BIP)."""

    name = "bip"

    def __init__(self) -> None:
        self.lip_cache: dict[str, float] = {}  # sup |act'| per activation function (deterministic)

    def check(self, model: CausalLM, adapter: ModelAdapter, req: ScoreRequest) -> None:
        layers = adapter.layers(model)
        for unit in req.units:
            ut = UNITS.get(unit)
            mlp_block = ut.input_of == DOWN_PROJ and any(ut.input_width(adapter, layers[i]) != 1 for i in req.layers)
            if not ut.input_of or mlp_block:
                supported = ", ".join(sorted(n for n, u in UNITS.items() if u.input_of))
                raise PrunekitError(f"criterion 'bip' does not support unit type '{unit}'; it scores {supported}.")

    @torch.no_grad()
    def probe(
        self, adapter: ModelAdapter, idx: int, layer: Submodule, req: ScoreRequest, sink: Sink | None = None
    ) -> _LayerRecorder:
        consts = _layer_constants(adapter, layer, self.lip_cache)
        units, bound = list(req.units), req.options.bip_bound
        return _LayerRecorder(idx, layer, adapter, consts, units, bound, sink, int(req.calibration.numel()))

    def token_bounds(self, model: CausalLM, adapter: ModelAdapter, req: ScoreRequest) -> Scores:
        """Per-token bounds, ``"<unit>.<layer>" -> (N * T, count)`` in calibration order (for checks)."""
        parts: dict[str, list[torch.Tensor]] = {}
        self.check(model, adapter, req)
        layers = adapter.layers(model)
        recorders = []
        try:
            for idx in req.layers:
                sink: Sink = lambda key, b: parts.setdefault(key, []).append(b.double().cpu())  # noqa: E731
                recorders.append(self.probe(adapter, idx, layers[idx], req, sink))
            forward_decoder(model, req.calibration, req.batch_size)
        finally:
            for r in recorders:
                r.remove()
        return {key: torch.cat(p) for key, p in parts.items()}


CRITERIA.register(BIPCriterion.name)(BIPCriterion())
