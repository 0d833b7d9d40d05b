"""``prune.allocation: search``: how much each layer and each unit type loses, chosen by Bayesian optimisation.

The fixed rules (``uniform``, ``global``, ``global_weighted``) decide each layer's share from the scores alone.
The search evaluates candidate allocations on the model itself (Týr-the-Pruner, EvoPress, DarwinLM search in the
same space) and keeps the one whose pruned model is closest to the unpruned one on the calibration windows.

Search space: for every per-layer unit type ``u`` in ``prune.units`` a depth profile of ``prune.search.knots``
values ``v_u,k`` in [0.05, 1], placed evenly over the pruned layers and interpolated linearly in between, and, when
there are several unit types, a log2 share ``s_u`` in [-2, 2] for every type after the first (the first is 0).
Layer ``l``'s candidate ratio of type ``u`` is

    r_u(l) = min(max_ratio, c * 2^s_u * v_u(pos(l)))

A model-wide type (``hidden_channel``: the residual stream has one width) has no profile: its ratio is
``min(max_ratio, c * 2^s_u)``, traded against the per-layer types by its share. Its removals overlap theirs (a
hidden channel shrinks every projection), which the parameter count multiplies out
(:func:`prunekit.pruning.plan.removed_params`), so every candidate still lies on the target.

with ``c`` bisected so the removed parameters come closest to ``prune.target`` (so every candidate lies on the
target, whatever the optimiser proposes: no penalties, no wasted candidates), kept counts rounded to
``prune.round_to`` as for the other allocations. Whole layers (``layer``) go where ``r(l) >= 0.5``. The first
candidate is the flat profile (every layer and type at the same ratio: LLM-Pruner's uniform rule), so the search
never ends worse than it on the objective.

Held out: ``prune.search.holdout`` of the calibration windows (:mod:`prunekit.pruning.holdout`) take no part in the
objective. At the end the best candidate and the flat profile are scored on each of them, and the best one is kept
only if it beats the flat profile there by more than chance: its mean advantage over the held-out windows must
exceed ``prune.search.standard_errors`` (2) standard errors of that mean (the spread of the per-window differences
over the square root of their number; with one held-out window there is no spread, and the plain comparison
decides). An allocation fitted to the search's windows does not replace the uniform cut unless it does clearly
better on windows it was not chosen on: a few held-out windows that favour it by a hair are noise, and on other
text the uniform cut may then be the better. Two standard errors is the usual bar (with many windows, chance alone
clears it about one time in forty; with few, more often); one standard error let through leads that were lost on
the evaluation text (docs/results.md).

Objective of a candidate: its plan (the highest-scored units of each layer) is applied to a copy of the model,
refit first when ``prune.reconstruct`` asks, and sliced (so the search optimises the model the cut produces), and
scored on the calibration windows: ``kl`` is the mean KL divergence from the unpruned model's next-token
distribution to the candidate's, ``loss`` the candidate's LM loss.

Optimiser: scikit-optimize's ``Optimizer`` (a Gaussian process with ``gp_hedge`` acquisition, seeded), asked and
told one candidate at a time; ``prune.search.random_starts`` random candidates follow the flat one. Every candidate
is recorded; with a state folder, after each one, so a killed search replays the recorded candidates (asking the
seeded optimiser again and checking it proposes the same point) and evaluates only the rest.

Cost: ``candidates`` x (a copy of the model, a forward pass of the pruned candidate over the calibration windows,
and the reconstruction when asked); the unpruned model's last hidden states are computed once. Memory: the model
twice and one batch (with reconstruction, four times: its masked copy, and the unrefit copy it is judged against);
the unpruned model's hidden states stay in memory up to ``model.offload_activations_mib`` and go to disk beyond
it, so the calibration windows can be many. With
reconstruction inside the objective, a candidate is refit on the windows the search is scored on, never on its
held-out ones (unless ``prune.reconstruct_samples`` refits on training text, which the held-out windows are not).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.types import CausalLM
from prunekit.pipeline.params import AllocationSearchParams
from prunekit.pruning.allocations.base import ALLOCATIONS, Allocation, Counts
from prunekit.pruning.holdout import beats, held_out_gain, too_few
from prunekit.pruning.plan import Plan, PlanRequest, UnitLayout, finest_unit, plan_of_counts, removed_params

log = logging.getLogger(__name__)

KNOT_RANGE = (0.05, 1.0)
SHARE_RANGE = (-2.0, 2.0)


@dataclass(frozen=True)
class Space:
    """The candidate allocations of one cut: a point (knots per unit type, shares) -> kept counts."""

    req: PlanRequest
    max_ratio: float
    knots: int

    @property
    def units(self) -> list[str]:
        return list(dict.fromkeys(lay.unit for lay in self.req.layouts))

    @property
    def profiled(self) -> list[str]:
        """The unit types with a depth profile: all but the model-wide ones (one width for the whole model)."""
        wide = {lay.unit for lay in self.req.layouts if lay.model_wide}
        return [u for u in self.units if u not in wide]

    @property
    def names(self) -> list[str]:
        knots = [f"knot{k}.{u}" for u in self.profiled for k in range(self.knots)]
        return knots + [f"share.{u}" for u in self.units[1:]]

    def dimensions(self) -> list[Any]:
        from skopt.space import Real

        if not self.names:
            raise PrunekitError(
                f"prune.allocation 'search' has nothing to choose with prune.units {self.units}: one model-wide "
                "width and no per-layer one; add a per-layer unit type (attn_kv_group, mlp_channel, ...) or use "
                "prune.allocation: uniform"
            )
        return [Real(*(SHARE_RANGE if n.startswith("share.") else KNOT_RANGE), name=n) for n in self.names]

    def flat(self) -> list[float]:
        return [1.0] * (len(self.profiled) * self.knots) + [0.0] * (len(self.units) - 1)

    def weights(self, point: list[float]) -> dict[tuple[str, int], float]:
        """Each layout's relative ratio ``2^s_u * v_u(pos(l))`` at ``point`` (a model-wide type: ``2^s_u``)."""
        layers = sorted({lay.layer for lay in self.req.layouts if not lay.model_wide}) or [0]
        span = max(layers[-1] - layers[0], 1)
        grid = np.linspace(0.0, 1.0, self.knots) if self.knots > 1 else np.array([0.0])
        profiled = self.profiled
        out = {}
        for i, unit in enumerate(self.units):
            share = 0.0 if i == 0 else point[len(profiled) * self.knots + i - 1]
            if unit not in profiled:
                out[(unit, 0)] = 2.0**share
                continue
            j = profiled.index(unit)
            values = np.asarray(point[j * self.knots : (j + 1) * self.knots], dtype=float)
            for lay in self.req.layouts:
                if lay.unit == unit:
                    pos = (lay.layer - layers[0]) / span
                    profile = float(np.interp(pos, grid, values)) if self.knots > 1 else float(values[0])
                    out[(unit, lay.layer)] = 2.0**share * profile
        return out

    def counts_at(self, weights: dict[tuple[str, int], float], c: float) -> Counts:
        counts = {}
        for lay in self.req.layouts:
            ratio = min(self.max_ratio, c * weights[(lay.unit, lay.layer)])
            counts[(lay.unit, lay.layer)] = _kept(lay, ratio, self.req.round_to.get(lay.unit, 1))
        return counts

    def counts(self, point: list[float]) -> Counts:
        """Kept counts at ``point``, with the scale ``c`` that brings the removed parameters closest to the target.

        A coarse step of one type (hidden channels: every channel is a slice of the whole model) can leave every
        ``c`` outside the tolerance; then the finest per-layer type alone is scaled to close the gap, the others
        kept where ``c`` put them."""
        want = self.req.target * self.req.total_params
        weights = self.weights(point)

        def removed(c: float) -> int:
            return removed_params(self.counts_at(weights, c), self.req.layouts)

        hi = self.max_ratio / min(weights.values())  # every layout at max_ratio
        if removed(hi) < want:
            raise PrunekitError(
                f"prune.target={self.req.target} is out of reach with prune.search.max_ratio={self.max_ratio}: "
                f"every pruned layer at that ratio removes {removed(hi) / self.req.total_params:.4f} of all "
                "parameters; raise prune.search.max_ratio or prune fewer parameters"
            )
        best = _closest(removed, want, hi)
        miss = abs(removed(best) - want)
        per_layer = [lay for lay in self.req.layouts if not (lay.whole_layer or lay.model_wide)]
        fine = finest_unit(per_layer, self.req.round_to)
        if miss <= self.req.tolerance * self.req.total_params or fine is None:
            return self.counts_at(weights, best)

        def scaled(f: float) -> dict[tuple[str, int], float]:
            return weights | {k: w * f for k, w in weights.items() if k[0] == fine}

        def removed_fine(f: float) -> int:
            return removed_params(self.counts_at(scaled(f), best), self.req.layouts)

        f_hi = self.max_ratio / (best * min(w for k, w in weights.items() if k[0] == fine)) if best > 0 else 1.0
        f = _closest(removed_fine, want, max(f_hi, 1.0))
        return self.counts_at(scaled(f) if abs(removed_fine(f) - want) < miss else weights, best)


def _closest(removed: Callable[[float], int], want: float, hi: float) -> float:
    """The scale in [0, hi] whose removal comes closest to ``want`` (``removed`` grows with it; removed(hi) >=
    want), by bisection."""
    lo = 0.0
    for _ in range(60):  # lo removes less than want, hi at least want
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if removed(mid) >= want else (mid, hi)
    return lo if want - removed(lo) <= removed(hi) - want else hi


def _kept(lay: UnitLayout, ratio: float, multiple: int) -> int:
    if lay.whole_layer:
        return 0 if ratio >= 0.5 else lay.count
    return lay.kept(ratio, multiple)


@dataclass
class Candidate:
    index: int
    source: str  # flat | random | gp
    point: list[float]
    objective: float
    achieved: float
    held_out: float | None = None  # the objective on the held-out windows (the best and the flat candidate)
    held_out_gain_se: float | None = None  # the best's: the standard error of its mean gain there over the flat one
    kept: bool = False  # the candidate whose allocation the search returns

    def row(self, names: list[str], label: str) -> dict[str, Any]:
        """The candidate as the trials file records it (no time: the same search writes the same file)."""
        row: dict[str, Any] = {"search": label} if label else {}
        row |= {"candidate": self.index, "source": self.source, "objective": float(f"{self.objective:.8g}"),
                "achieved": round(self.achieved, 6)}  # fmt: skip
        if self.held_out is not None:
            row["held_out"] = float(f"{self.held_out:.8g}")
        if self.held_out_gain_se is not None:
            row["held_out_gain_se"] = float(f"{self.held_out_gain_se:.8g}")
        row["kept"] = self.kept
        return row | {name: round(v, 6) for name, v in zip(names, self.point, strict=True)}


@dataclass
class AllocationSearch:
    """One search: its settings, how a candidate plan is scored, where its progress is kept."""

    settings: AllocationSearchParams
    evaluate: Callable[[Plan], float]  # a candidate plan -> objective (lower is better)
    seed: int
    label: str = ""  # names the search in the trials (k-shot: the shot)
    state_file: Path | None = None  # progress, replayed by a resumed run
    state_key: str = ""
    judge: Callable[[Plan], list[float]] | None = None  # the objective on each held-out window (None: none held out)
    candidates: list[Candidate] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        return [c.row(self.names, self.label) for c in self.candidates]

    def run(self, scores: dict[str, torch.Tensor], req: PlanRequest, criterion: str = "") -> Counts:
        """Evaluate ``settings.candidates`` allocations of ``req``; the best one's kept counts."""
        from skopt import Optimizer

        cfg = self.settings
        space = Space(req, cfg.max_ratio, cfg.knots)
        self.names = space.names
        space.counts(space.flat())  # an unreachable target fails here, before any candidate is evaluated
        opt = Optimizer(space.dimensions(), base_estimator="GP", acq_func="gp_hedge",
                        n_initial_points=cfg.random_starts + 1, random_state=self.seed)  # fmt: skip
        recorded = self._recorded()
        self.candidates = []
        for i in range(cfg.candidates):
            point = space.flat() if i == 0 else [float(v) for v in opt.ask()]
            source = "flat" if i == 0 else "random" if i <= cfg.random_starts else "gp"
            if i < len(recorded) and np.allclose(recorded[i]["point"], point, rtol=0, atol=1e-9):
                objective, achieved = recorded[i]["objective"], recorded[i]["achieved"]
            else:
                recorded = recorded[:i]  # the optimiser proposes something else: evaluate from here on
                start = time.perf_counter()
                plan = plan_of_counts(scores, req, space.counts(point), "search", criterion)
                objective, achieved = self.evaluate(plan), plan.achieved
                if not math.isfinite(objective):
                    raise PrunekitError(
                        f"allocation search: candidate {i} gives a non-finite objective ({objective}); the pruned "
                        "model diverges on the calibration windows (lower prune.target or prune.search.max_ratio)"
                    )
                log.info("allocation candidate %d (%s): %s %.5f, removes %.4f (%.1f s)", i, source,
                         cfg.objective, objective, achieved, time.perf_counter() - start)  # fmt: skip
            self.candidates.append(Candidate(i, source, point, objective, achieved))
            self._save()
            opt.tell(point, objective)
        best = min(self.candidates, key=lambda c: (c.objective, c.index))
        flat = self.candidates[0]
        log.info("allocation search: best candidate %d (%s) %.5f; flat profile %.5f", best.index, best.source,
                 best.objective, flat.objective)  # fmt: skip
        if self.judge is not None and best is not flat:
            mine, theirs = (self.judge(plan_of_counts(scores, req, space.counts(c.point), "search", criterion))
                            for c in (best, flat))  # fmt: skip
            best.held_out, flat.held_out = float(np.mean(mine)), float(np.mean(theirs))
            gain, error = held_out_gain(theirs, mine)
            wins, best.held_out_gain_se = beats(gain, error, cfg.standard_errors), error
            log.info("allocation search: on the held-out windows candidate %d %.5f, flat profile %.5f (gain %.5f, "
                     "%g standard errors %.5f): keeping %s", best.index, best.held_out, flat.held_out, gain,
                     cfg.standard_errors, cfg.standard_errors * error,
                     f"candidate {best.index}" if wins else "the flat profile")  # fmt: skip
            best = best if wins else flat
        best.kept = True
        return space.counts(best.point)

    def _recorded(self) -> list[dict[str, Any]]:
        if self.state_file is None or not self.state_file.is_file():
            return []
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return []
        if state.get("fingerprint") != self.state_key or state.get("label") != self.label:
            return []
        log.info("allocation search: replaying %d recorded candidates", len(state["candidates"]))
        return list(state["candidates"])

    def _save(self) -> None:
        if self.state_file is None:
            return
        from prunekit.pipeline.outputs import write_json

        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        done = [{"point": c.point, "objective": c.objective, "achieved": c.achieved} for c in self.candidates]
        write_json(self.state_file, {"fingerprint": self.state_key, "label": self.label, "candidates": done})


class Searched(Allocation):
    """Per-layer, per-unit-type fractions chosen by Bayesian optimisation on the model (prune.search)."""

    name = "search"
    evaluates_candidates = True

    def counts(self, scores: dict[str, torch.Tensor], req: PlanRequest) -> Counts:
        if req.search is None:
            raise PrunekitError(
                "prune.allocation 'search' evaluates candidates on the model: it runs inside a prune schedule "
                "(oneshot or kshot), which gives the plan request a search"
            )
        return req.search.run(scores, req)


ALLOCATIONS.register(Searched.name)(Searched())


def holdout_problem(windows: int, share: float) -> str | None:
    """Why ``windows`` calibration windows cannot be split at ``prune.search.holdout`` ``share`` (None: they can)."""
    return too_few(windows, share, "calibrate.samples", "prune.search.holdout: 0")


def model_objective(
    teacher: nn.Module,
    calibration: torch.Tensor,
    batch_size: int,
    objective: str,
    activations_mib: int = 2048,
    per_window: bool = False,
) -> Callable[[nn.Module], Any]:
    """``model -> objective`` on ``calibration`` (N, T): the model's KL from ``teacher`` (``kl``) or its LM loss
    (``loss``), mean per token (``per_window``: a list of each window's mean, the windows scored one at a time).
    The teacher's last hidden states (``kl``) are computed on the first call and held in memory up to
    ``activations_mib`` MiB, on disk beyond it: every model scored after shares them and streams the windows a
    batch at a time. Teacher and model run without dropout."""
    from prunekit.models.hidden import MIB, HiddenStates
    from prunekit.training.loss import causal_lm, kd_loss_from, lm_loss, teacher_states

    device = next(teacher.parameters()).device
    starts = range(0, calibration.shape[0], batch_size)
    reference = HiddenStates(activations_mib * MIB, device)  # per batch, computed on the first call

    def loss(model: nn.Module, head: nn.Module, b: int, batch: torch.Tensor) -> list[float]:
        """The objective on ``batch`` (batch ``b``): its mean, or each window's."""
        if not per_window:
            if objective == "kl":
                return [float(kd_loss_from(model, reference.get(b), head, batch))]
            return [float(lm_loss(model, batch))]
        if objective == "kl":
            rows = reference.get(b).view(batch.shape[0], batch.shape[1] - 1, -1)
            return [float(kd_loss_from(model, rows[i], head, batch[i : i + 1])) for i in range(batch.shape[0])]
        return [float(lm_loss(model, batch[i : i + 1])) for i in range(batch.shape[0])]

    @torch.no_grad()
    def score(model: nn.Module) -> Any:
        modes = teacher.training, model.training
        teacher.eval()  # the reference runs without dropout, as the model does
        model.eval()
        try:
            if objective == "kl" and not len(reference):
                for b, s in enumerate(starts):
                    reference.put(b, teacher_states(teacher, calibration[s : s + batch_size].to(device)))
            head, total, windows = causal_lm(teacher).get_output_embeddings(), 0.0, []
            for b, s in enumerate(starts):
                batch = calibration[s : s + batch_size].to(device)
                values = loss(model, head, b, batch)
                if per_window:
                    windows += values
                else:
                    total += values[0] * batch.shape[0]
        finally:
            teacher.train(modes[0])
            model.train(modes[1])
        return windows if per_window else total / calibration.shape[0]

    return score


def candidate_objective(
    model: CausalLM,
    adapter: Any,
    calibration: torch.Tensor,
    batch_size: int,
    objective: str,
    refit: Callable[[nn.Module, Plan], Any] | None = None,
    activations_mib: int = 2048,
    per_window: bool = False,
) -> Callable[[Plan], Any]:
    """``plan -> objective`` on ``calibration`` (N, T): a copy of ``model`` with the plan as masks (refit first by
    ``refit(copy, plan)`` when given), sliced, scored by :func:`model_objective` against ``model``."""
    from prunekit.pruning.slicing import apply_plan

    score = model_objective(model, calibration, batch_size, objective, activations_mib, per_window)

    @torch.no_grad()
    def evaluate(plan: Plan) -> Any:
        candidate = copy.deepcopy(model).eval()
        if refit is not None:
            refit(candidate, plan)
        apply_plan(candidate, adapter, plan, mode="slice")  # the model the cut produces
        return score(candidate)

    return evaluate
