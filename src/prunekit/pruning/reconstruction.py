"""Least-squares reconstruction: refit o_proj and down_proj over their kept input channels after a cut.

After a plan is chosen, every pruned layer's ``o_proj`` (over the kept heads' value channels) and ``down_proj``
(over the kept MLP channels; also where only the attention was cut, to make up for it) are refit in closed form so
that, on the calibration tokens, the pruned layer's projection output stays as close as possible to the dense
layer's (SlimGPT, Olica, OSSCAR; FLAP's bias compensation is the special case that fits the bias alone).

Layer by layer, in order, on one pass of the calibration windows: the input ``h`` of layer i is what the
already pruned and refit layers before it produce. On ``h`` the dense layer gives the projection input ``X_d``
(all channels) and the pruned layer (the plan applied as masks) gives ``X_p``, whose removed channels are zero.
With W (out x n) the dense weight, b its bias (if the family has one), K the kept input channels and
T = X_d W^T + b the target, the refit weight W' (out x |K|) and bias b' solve

    min  || X_p[:, K] W'^T + 1 b'^T - T ||^2  +  lam * ||W' - W[:, K]||^2,   lam = ridge * mean(diag(X_pK^T X_pK))

in closed form from the Gram matrices G = X_p^T X_p, C = X_p^T X_d (and the column sums when there is a bias),
accumulated over the windows: W'^T = (G_KK + lam I)^-1 (C_K: W^T + lam W[:, K]^T). The ridge pulls towards the
plainly sliced weights, not towards zero: a few hundred calibration tokens for a thousand channels leave the
problem underdetermined, and the dense weights are the prior that generalises.

What a refit gains on the tokens it was fitted on says little about other text: with fewer tokens than channels it
fits them exactly. So a share of the windows (``prune.reconstruct_holdout``, spread evenly) is held out: every
ridge of ``prune.reconstruct_ridge`` is fitted on the other windows and its error measured on the held-out ones,
the best one wins, and a projection whose best refit does not beat the plainly sliced weights W[:, K] on the
held-out windows keeps them; a winning ridge is then refit on all the windows. The errors recorded are the
held-out ones (with no holdout: those on all windows, where the smallest ridge always wins). With
``prune.reconstruct_standard_errors`` set, the prune step also sets aside the same share of its windows before
calling this, and judges the refit model as a whole on them against the sliced one
(:meth:`prunekit.pruning.schedules.base.Cut.refit`). The o_proj refit
comes first; the MLP inputs are then taken with the refit attention. The weights are written into the model
before slicing, in the kept columns (the removed ones go with the slice).

Works for every unit type that removes input channels of o_proj or down_proj (KV groups, query heads, v/o head
dims, MLP channels) and leaves the others (q/k head dims, whole layers) to change X_p; ``hidden_channel``
changes the residual stream itself and is refused. Memory: a masked copy of the model, per projection two n x n
and two n x out float64 matrices (G and X_p^T T of the fitting and of the held-out windows), the calibration
hidden states of one layer (in memory up to ``activations_mib``, on disk beyond: :mod:`prunekit.models.hidden`).
Time: one Cholesky solve per ridge, and one more for the winner.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.hidden import MIB, HiddenStates
from prunekit.models.types import CausalLM, Submodule
from prunekit.pruning.holdout import held_out, too_few
from prunekit.pruning.plan import Plan
from prunekit.pruning.units import UNITS
from prunekit.pruning.units.base import CONSUMERS, consumer_path

log = logging.getLogger(__name__)

METHODS = ("none", "least_squares")


@dataclass(frozen=True)
class RefitChoice:
    """How a projection's refit is chosen and judged: the ridges tried, and the share of the windows held out to
    choose among them and against the sliced weights (0: all windows fit and judge)."""

    ridges: tuple[float, ...] = (0.01, 0.1, 0.3, 1.0)
    holdout: float = 0.25

    def held_out(self, window: int) -> bool:
        """Whether refit window ``window`` is held out (:func:`prunekit.pruning.holdout.held_out`)."""
        return held_out(window, self.holdout)

    def window_problem(self, windows: int) -> str | None:
        """Why ``windows`` refit windows cannot be split as asked (None: they can)."""
        return too_few(windows, self.holdout, MORE_WINDOWS, "prune.reconstruct_holdout: 0")

    def judged_window_problem(self, windows: int) -> str | None:
        """Why ``windows`` windows cannot give both held-out sets (None: they can): the share that judges the refit
        model, and the same share of the rest that chooses each projection's ridge."""
        judge = sum(self.held_out(w) for w in range(windows))
        if self.holdout > 0 and (judge == 0 or math.floor((windows - judge) * self.holdout) == 0):
            return (f"{self.holdout} of the {windows} windows, then of the rest, leaves one of the two held-out "
                    f"sets empty; give more windows ({MORE_WINDOWS}) or set prune.reconstruct_holdout: 0")  # fmt: skip
        return None

    def problem(self, windows: int, judged: bool) -> str | None:
        """Why ``windows`` windows cannot be split as the refit asks (None: they can); ``judged``: the refit model
        is judged as a whole too (``prune.reconstruct_standard_errors`` set), which needs a second held-out set."""
        return self.judged_window_problem(windows) if judged else self.window_problem(windows)


MORE_WINDOWS = "prune.reconstruct_samples, or calibrate.samples"


@dataclass(frozen=True)
class ProjectionFit:
    """One refit projection: its squared errors on the calibration tokens, plainly sliced and refit."""

    layer: int
    projection: str
    kept: int
    error_sliced: float
    error_reconstructed: float  # the refit's (the sliced weights' where they were kept)
    target_norm: float  # || T ||^2: the errors relative to it are comparable across layers
    ridge: float | None = None  # the ridge chosen; None: the sliced weights kept


def summary(fits: list[ProjectionFit]) -> dict[str, float]:
    """Squared errors on the held-out windows summed over the fits, relative to the dense outputs' (metrics), and
    how many projections took their refit (the others kept the sliced weights)."""
    norm = sum(f.target_norm for f in fits) or 1.0
    return {
        "projections": len(fits),
        "refit": sum(f.ridge is not None for f in fits),
        "error_sliced": round(sum(f.error_sliced for f in fits) / norm, 6),
        "error_reconstructed": round(sum(f.error_reconstructed for f in fits) / norm, 6),
    }


class _Gram:
    """One projection's running statistics (float64): G = X_p^T X_p, R = X_p^T T with the target
    T = X_d W^T + 1 b^T of the dense projection, the column sums of X_p and T, ||T||^2 and the token count."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        self.w, self.b = w, b  # float64, on the device the projection's inputs come from
        self.g = self.r = self.sp = self.st = torch.zeros(0)
        self.t_norm, self.n = 0.0, 0

    def add(self, xp: torch.Tensor, xd: torch.Tensor) -> None:
        xp, xd = xp.reshape(-1, xp.shape[-1]).double(), xd.reshape(-1, xd.shape[-1]).double()
        t = xd @ self.w.T
        if self.b is not None:
            t = t + self.b
        stats = (xp.T @ xp, xp.T @ t, xp.sum(0), t.sum(0))
        if self.n == 0:
            self.g, self.r, self.sp, self.st = stats
        else:
            for acc, new in zip((self.g, self.r, self.sp, self.st), stats, strict=True):
                acc += new
        self.t_norm += float(torch.einsum("ij,ij->", t, t))
        self.n += xp.shape[0]


def removed_inputs(adapter: ModelAdapter, layer: Submodule, plan: Plan, idx: int, role: str) -> torch.Tensor:
    """Input columns of ``role`` in dense layer ``idx`` that the plan removes (sorted), from the unit members."""
    path, cols = consumer_path(adapter, role), set()
    for unit, per_layer in plan.keep.items():
        ut = UNITS.get(unit)
        if ut.whole_layer or idx not in per_layer:
            continue
        n = ut.count(adapter, layer)
        gone = torch.tensor(sorted(set(range(n)) - set(per_layer[idx])), dtype=torch.long)
        for m in ut.members(adapter, layer):
            if m.path == path and m.dim == 1 and gone.numel():
                cols.update(m.entries(gone).tolist())
    return torch.tensor(sorted(cols), dtype=torch.long)


def check_plan(plan: Plan) -> None:
    """Refuse unit types reconstruction cannot follow (those that change the residual stream's width)."""
    for unit in plan.keep:
        if UNITS.get(unit).model_wide:
            raise PrunekitError(
                f"prune.reconstruct: least_squares cannot follow unit type '{unit}' (it changes the hidden size of "
                "every layer); use prune.reconstruct: none with it"
            )


@torch.no_grad()
def reconstruct(
    model: CausalLM,
    adapter: ModelAdapter,
    plan: Plan,
    calibration: torch.Tensor,
    batch_size: int,
    choice: RefitChoice,
    reference: nn.Module | None = None,
    activations_mib: int = 2048,
) -> list[ProjectionFit]:
    """Refit o_proj and down_proj of every layer the plan prunes, in place, before slicing (module docstring).

    ``reference``: the dense model whose layer outputs the refit follows, when it is not ``model`` itself (a model
    trained while its units were masked is refit towards the model it started from); the ridge and the
    keep-if-better test still start from ``model``'s own weights. The calibration hidden states of the current
    layer stay in memory up to ``activations_mib`` MiB and go to disk beyond it."""
    check_plan(plan)
    from prunekit.pruning.slicing import apply_plan

    was_training = model.training
    model.eval()
    masked = apply_plan(copy.deepcopy(model), adapter, plan, mode="mask")
    dense_layers, masked_layers = adapter.layers(model), adapter.layers(masked)
    reference_layers = adapter.layers(reference) if reference is not None else None
    planned = planned_layers(plan)
    fits: list[ProjectionFit] = []
    hidden = HiddenStates(activations_mib * MIB)
    try:
        kwargs = _layer_inputs(model, adapter, calibration, batch_size, hidden)
        for idx in tqdm(range(len(dense_layers)), desc="reconstruction", unit="layer"):
            dense_l, masked_l = dense_layers[idx], masked_layers[idx]
            if idx in planned:
                ref_l = reference_layers[idx] if reference_layers is not None else None
                fits += reconstruct_layer(adapter, dense_l, masked_l, idx, plan, hidden, kwargs[idx], choice, ref_l)
            for b, (h, kw) in enumerate(zip(hidden, kwargs[idx], strict=True)):
                hidden.put(b, layer_output(masked_l(h, **kw)))
    finally:
        hidden.close()
        model.train(was_training)
    return fits


def planned_layers(plan: Plan) -> set[int]:
    """The layers whose projections are refit: every layer the plan prunes (and keeps). down_proj also makes up
    for what the cut attention changed, and a projection with nothing removed is refit over all its inputs."""
    removed = {i for u, per in plan.keep.items() if UNITS.get(u).whole_layer for i, k in per.items() if not k}
    return {i for u, per in plan.keep.items() if not UNITS.get(u).whole_layer for i in per} - removed


def reconstruct_layer(
    adapter: ModelAdapter,
    dense_l: nn.Module,
    masked_l: nn.Module,
    idx: int,
    plan: Plan,
    hidden: Iterable[torch.Tensor],
    kwargs: list[dict[str, Any]],
    choice: RefitChoice,
    reference_l: nn.Module | None = None,
) -> list[ProjectionFit]:
    """Refit o_proj, then down_proj, of decoder layer ``idx`` on its inputs ``hidden`` (one tensor per batch, an
    iterable that can be read twice) with their keyword arguments: into ``masked_l`` (the plan applied as masks,
    whose output feeds the next layer) and into the kept columns of ``dense_l`` (sliced afterwards). The targets
    are ``reference_l``'s outputs (default: ``dense_l``'s before the refit)."""
    # The dense layer's targets, while the model's layer is refit.
    reference = reference_l if reference_l is not None else copy.deepcopy(dense_l)
    fits = []
    for role in CONSUMERS:
        cols = removed_inputs(adapter, dense_l, plan, idx, role)
        fits.append(_refit(adapter, reference, masked_l, idx, role, cols, hidden, kwargs, choice))
        _copy_kept(adapter, masked_l, dense_l, role, cols)
    return fits


def _refit(
    adapter: ModelAdapter,
    dense_l: nn.Module,
    masked_l: nn.Module,
    idx: int,
    role: str,
    removed: torch.Tensor,
    hidden: Iterable[torch.Tensor],
    kwargs: list[dict[str, Any]],
    choice: RefitChoice,
) -> ProjectionFit:
    """Accumulate one projection's Gram matrices on the layer's inputs (``dense_l``: the untouched dense layer,
    whose projection outputs are the targets), the fitting and the held-out windows apart, solve, and write W'
    into the masked layer (whose current weights are the ridge's prior)."""
    path = consumer_path(adapter, role).removesuffix(".weight")
    dense_proj: Submodule = dense_l.get_submodule(path)
    masked_proj: Submodule = masked_l.get_submodule(path)
    b = dense_proj.bias.detach().double() if dense_proj.bias is not None else None
    if (b is None) != (masked_proj.bias is None):
        raise PrunekitError(f"prune.reconstruct: layer {idx} {path} has a bias in one model and not the other")
    w = dense_proj.weight.detach().double()
    fit, held = _Gram(w, b), _Gram(w, b)
    window = 0
    for h, kw in zip(hidden, kwargs, strict=True):
        with _capture(dense_proj) as xd, _capture(masked_proj) as xp:
            dense_l(h, **kw)
            masked_l(h, **kw)
        out = torch.tensor([choice.held_out(window + i) for i in range(h.shape[0])], device=xp[0].device)
        window += h.shape[0]
        for gram, rows in ((fit, ~out), (held, out)):
            if bool(rows.any()):
                gram.add(xp[0][rows], xd[0][rows])
    problem = choice.window_problem(window)
    if problem:
        raise PrunekitError(f"prune.reconstruct_holdout: {problem}")
    keep = torch.ones(dense_proj.weight.shape[1], dtype=torch.bool)
    keep[removed] = False
    prior = masked_proj.weight.detach().to("cpu", torch.float64)
    prior_bias = masked_proj.bias.detach().to("cpu", torch.float64) if b is not None else None
    weight, bias, errors, ridge = solve(fit, held if held.n else None, prior, prior_bias, keep, choice.ridges)
    masked_proj.weight[:, keep] = weight.to(masked_proj.weight.dtype).to(masked_proj.weight.device)
    if bias is not None:
        masked_proj.bias.copy_(bias.to(masked_proj.bias.dtype).to(masked_proj.bias.device))
    return ProjectionFit(idx, role, int(keep.sum()), *errors, ridge)


def refit_parameters(model: CausalLM, adapter: ModelAdapter) -> list[torch.Tensor]:
    """The parameters a refit of ``model`` may write: each decoder layer's consumer projections (o_proj and
    down_proj), weights and biases."""
    found = []
    for layer in adapter.layers(model):
        for role in CONSUMERS:
            proj: Submodule = layer.get_submodule(consumer_path(adapter, role).removesuffix(".weight"))
            found += [proj.weight] + ([proj.bias] if proj.bias is not None else [])
    return found


def _copy_kept(adapter: ModelAdapter, src: Submodule, dst: Submodule, role: str, removed: torch.Tensor) -> None:
    """The refit kept columns (and bias) of ``role`` from the masked layer into the model's layer."""
    path = consumer_path(adapter, role).removesuffix(".weight")
    s: Submodule = src.get_submodule(path)
    d: Submodule = dst.get_submodule(path)
    keep = torch.ones(s.weight.shape[1], dtype=torch.bool)
    keep[removed] = False
    d.weight[:, keep] = s.weight[:, keep]
    if s.bias is not None:
        d.bias.copy_(s.bias)


def _system(gram: _Gram, k: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The normal equations' parts over the kept columns ``k``: X~^T X~, X~^T T and ||T||^2, where X~ is X_pK with,
    when there is a bias, one more input column that is always 1."""
    gkk, xt = gram.g.cpu()[k][:, k], gram.r.cpu()[k]
    if bias:
        s = gram.sp.cpu()[k]
        gkk = torch.cat(
            [torch.cat([gkk, s.unsqueeze(1)], 1), torch.cat([s, torch.tensor([float(gram.n)])]).unsqueeze(0)]
        )
        xt = torch.cat([xt, gram.st.cpu().unsqueeze(0)])
    return gkk, xt, gram.t_norm


def _error(system: tuple[torch.Tensor, torch.Tensor, float], sol: torch.Tensor) -> float:
    """||X~ sol - T||^2 = tr(sol^T G~ sol) - 2 tr(sol^T X~^T T) + ||T||^2 on the windows of ``system``."""
    gkk, xt, t_norm = system
    return float(torch.einsum("ij,ij->", gkk @ sol, sol) - 2 * torch.einsum("ij,ij->", sol, xt) + t_norm)


def _ridge_fit(
    system: tuple[torch.Tensor, torch.Tensor, float], sliced: torch.Tensor, n_k: int, ridge: float
) -> torch.Tensor:
    """The refit with ``ridge`` (relative to the mean diagonal of the kept channels' Gram; the bias undamped),
    pulled towards ``sliced``: few calibration tokens for many channels leave the least-squares problem
    underdetermined, and the dense weights are the better prior."""
    gkk, xt, _ = system
    lam = ridge * float(torch.diagonal(gkk)[:n_k].mean()) if n_k else 0.0
    damp = torch.zeros(gkk.shape[0], dtype=torch.float64)
    damp[:n_k] = lam
    return _solve_normal(gkk + torch.diag(damp), xt + damp.unsqueeze(1) * sliced, lam > 0)  # (|K| (+1), out)


def solve(
    fit: _Gram,
    held: _Gram | None,
    prior: torch.Tensor,
    prior_bias: torch.Tensor | None,
    keep: torch.Tensor,
    ridges: tuple[float, ...],
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[float, float, float], float | None]:
    """(W' over the kept columns, b', (error sliced, error refit, ||T||^2), the ridge chosen or None) from the
    Grams of the fitting windows ``fit`` and the held-out ones ``held`` (None: ``fit`` judges too). ``prior`` and
    ``prior_bias`` are the weights being refit (the ridge's pull, and what "sliced" keeps). Every ridge is fitted
    on ``fit`` and judged on ``held``; the best one, if it beats the sliced weights there, is refit on both."""
    k = keep.nonzero().squeeze(1)
    n_k, bias = k.numel(), prior_bias is not None
    sliced = prior[:, k].T if prior_bias is None else torch.cat([prior[:, k].T, prior_bias.unsqueeze(0)])
    fitting = _system(fit, k, bias)
    judge = _system(held, k, bias) if held is not None else fitting
    best, e_best, chosen = sliced, _error(judge, sliced), None
    e_sliced = e_best
    for ridge in ridges:
        solution = _ridge_fit(fitting, sliced, n_k, ridge)
        e = _error(judge, solution)
        if e < e_best:
            best, e_best, chosen = solution, e, ridge
    if chosen is not None and held is not None:  # the winning ridge on every window
        both = (fitting[0] + judge[0], fitting[1] + judge[1], fitting[2] + judge[2])
        best = _ridge_fit(both, sliced, n_k, chosen)
    weight, bias_out = best[:n_k].T, (best[n_k] if bias else None)
    return weight, bias_out, (max(e_sliced, 0.0), max(e_best, 0.0), float(judge[2])), chosen


def _solve_normal(a: torch.Tensor, rhs: torch.Tensor, damped: bool) -> torch.Tensor:
    """Solve the normal equations ``a x = rhs``. Damped (lam > 0), ``a`` is symmetric positive definite and a
    Cholesky factorisation solves it; undamped it may be singular (fewer tokens than channels), and the
    minimum-norm least-squares solution (an SVD) is the one that reproduces a fully kept layer exactly."""
    if damped:
        factor, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, factor)
        # Round-off made a tiny-ridge system indefinite: the SVD solves what it can.
    return torch.linalg.lstsq(a, rhs, driver="gelsd").solution


@contextmanager
def _capture(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The input of ``module``'s next call, in a list (filled when it runs)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        yield seen
    finally:
        handle.remove()


def layer_output(out: Any) -> torch.Tensor:
    """The hidden states a decoder layer returns (some families return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def _layer_inputs(
    model: CausalLM, adapter: ModelAdapter, calibration: torch.Tensor, batch_size: int, hidden: HiddenStates
) -> list[list[dict[str, Any]]]:
    """Layer 0's input per calibration batch, put into ``hidden``, and the keyword arguments every layer receives
    (masks, rotary embeddings, positions: the same on the pruned path, they do not depend on the hidden states)."""
    layers = adapter.layers(model)
    device = next(model.parameters()).device
    hidden.device = device
    kwargs: list[list[dict[str, Any]]] = [[] for _ in layers]

    def keep(i: int) -> Any:
        def hook(_m: nn.Module, args: tuple, kw: dict[str, Any]) -> None:
            if i == 0:
                hidden.put(len(kwargs[0]), (args[0] if args else kw["hidden_states"]).detach())
            kwargs[i].append({k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values", "cache")})

        return hook

    handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for start in range(0, calibration.shape[0], batch_size):
            model.get_decoder()(input_ids=calibration[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return kwargs
