"""Bayesian search for a mixed-precision plan under a memory budget (QPruner).

The search space gives one scheme per group of Linear modules: a decoder layer (``search.granularity:
layer``) or a layer's attention / MLP modules (``layer_module``); with ``search.embeddings`` the token embedding
and an untied output head are a group each (a tied head is the embedding's matrix), so their bytes count in the
budget and the plan gives them a scheme. Each group's choice is an integer index
into ``search.choices`` sorted by width, so the Gaussian process sees an ordered axis (more bits ->
usually lower loss) rather than unrelated categories.

Objective: the mean next-token NLL of held-out windows with every planned weight replaced by its
quantize -> dequantize image (:func:`~prunekit.quant.realise.fake_quantized`), minimised with
scikit-optimize's ``gp_minimize``.

Budget: ``search.budget_bits`` (mean nominal bits per quantized weight, weighted by weight count) or
``search.budget_bytes`` (stored bytes of the quantized weights, statistics included).

Infeasible points are *repaired*, not penalised: a candidate over budget is mapped to a feasible one by
stepping down, one choice at a time, the group whose importance per weight is lowest among those that
can still step down, until the plan fits. The objective is then the loss of the repaired plan, reported
for the point the optimiser proposed, so the function the GP models stays deterministic and no trial is
wasted. Penalties would waste most trials: with the default choices {2, 3, 4, 8} bits and a 4-bit budget,
a uniformly random point averages 4.25 bits and is over budget most of the time, and a penalty plateau
tells the GP nothing about where the feasible optimum lies.

Initial points (QPruner: more important layers get more bits): importance is each group's sensitivity,
the loss increase when that group alone is quantized to the narrowest choice. ``importance:greedy``
starts from the uniform plan and widens groups, most important per weight first, while the budget
allows; for each of ``search.importance_spreads`` s, group g gets the target width
``budget_bits * (1 + s * z_g)`` (z_g the standardised log-sensitivity), rounded to the nearest choice,
then repaired. The uniform plan (the widest single choice that fits) is evaluated too and reported next
to the best plan.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM
from prunekit.pipeline.params import SearchParams
from prunekit.quant.backend import backend_for
from prunekit.quant.plan import QuantTarget, check_embedding_scheme, plan_cost
from prunekit.quant.schemes import SCHEMES, QuantSettings

log = logging.getLogger(__name__)

Plan = dict[str, str]


@dataclass(frozen=True)
class Budget:
    """Exactly one of ``bits`` (mean nominal bits per quantized weight) and ``bytes`` (stored bytes)."""

    bits: float | None = None
    bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.bits is None) == (self.bytes is None):
            raise PrunekitError("set exactly one of search.budget_bits and search.budget_bytes (the other null)")

    def describe(self) -> str:
        return f"{self.bits} bits per weight" if self.bits is not None else f"{self.bytes} bytes"


@dataclass
class SearchSpace:
    """Groups of targets that share a scheme, and the ordered scheme choices."""

    groups: list[list[QuantTarget]]
    labels: list[str]
    choices: list[str]  # sorted by nominal bits, narrowest first
    targets: list[QuantTarget]
    settings: QuantSettings

    def plan(self, index: list[int]) -> Plan:
        return {t.name: self.choices[i] for group, i in zip(self.groups, index, strict=True) for t in group}

    def cost(self, index: list[int]) -> tuple[float, int]:
        c = plan_cost(self.plan(index), self.targets, self.settings)
        return c.avg_bits, c.quantized_bytes

    def fits(self, index: list[int], budget: Budget) -> bool:
        bits, nbytes = self.cost(index)
        if budget.bits is not None:
            return bits <= budget.bits + 1e-9
        assert budget.bytes is not None  # Budget holds exactly one of the two
        return nbytes <= budget.bytes

    def group_weights(self) -> list[int]:
        return [sum(t.numel for t in g) for g in self.groups]


def build_space(
    targets: list[QuantTarget], granularity: str, choices: list[str], settings: QuantSettings
) -> SearchSpace:
    if not choices:
        raise PrunekitError("search.choices is empty; list two or more schemes (see `prunekit list`)")
    for c in choices:
        SCHEMES.get(c)
    if len(set(choices)) != len(choices):
        raise PrunekitError(f"search.choices {choices} repeats a scheme")
    for c in choices:  # every choice must hold every weight it may be given, before any trial
        for t in targets:
            if t.kind == "embedding":
                check_embedding_scheme(SCHEMES.get(c), f"the token embedding (search.choices '{c}')")
            backend_for(SCHEMES.get(c)).check_shape(SCHEMES.get(c), t.rows, t.cols, f"search.choices '{c}': {t.name}")
    ordered = sorted(choices, key=lambda c: (SCHEMES.get(c).bits, choices.index(c)))
    keyed: dict[str, list[QuantTarget]] = {}
    for t in targets:
        if t.kind in ("embedding", "output"):
            label = t.kind
        else:
            label = f"layer{t.layer}" if granularity == "layer" else f"layer{t.layer}.{t.kind}"
        keyed.setdefault(label, []).append(t)
    return SearchSpace(list(keyed.values()), list(keyed), ordered, targets, settings)


def repair(space: SearchSpace, index: list[int], importance: list[float], budget: Budget) -> list[int]:
    """Step down the least important group (per weight) until the plan fits; error if it never does."""
    idx = list(index)
    weights = space.group_weights()
    while not space.fits(idx, budget):
        movable = [g for g in range(len(idx)) if idx[g] > 0]
        if not movable:
            bits, nbytes = space.cost(idx)
            raise PrunekitError(
                f"search budget {budget.describe()} is below the narrowest plan ({bits:.2f} bits, {nbytes} bytes "
                f"with every group at '{space.choices[0]}'); raise the budget or add a narrower scheme"
            )
        g = min(movable, key=lambda k: (importance[k] / weights[k], k))
        idx[g] -= 1
    return idx


def uniform_index(space: SearchSpace, budget: Budget) -> list[int]:
    """The widest single choice for every group that fits the budget."""
    for c in range(len(space.choices) - 1, -1, -1):
        idx = [c] * len(space.groups)
        if space.fits(idx, budget):
            return idx
    bits, nbytes = space.cost([0] * len(space.groups))
    raise PrunekitError(
        f"search budget {budget.describe()} is below the narrowest uniform plan ({bits:.2f} bits, {nbytes} bytes); "
        "raise it or add a narrower scheme to search.choices"
    )


def greedy_index(space: SearchSpace, importance: list[float], budget: Budget) -> list[int]:
    """From the uniform plan, widen groups one choice at a time, most important per weight first, while
    the plan still fits: the budget the uniform plan leaves unused goes to the most sensitive groups."""
    idx = uniform_index(space, budget)
    weights = space.group_weights()
    order = sorted(range(len(idx)), key=lambda g: (-importance[g] / weights[g], g))
    changed = True
    while changed:
        changed = False
        for g in order:
            if idx[g] + 1 < len(space.choices):
                idx[g] += 1
                if space.fits(idx, budget):
                    changed = True
                else:
                    idx[g] -= 1
    return idx


def importance_index(
    space: SearchSpace, importance: list[float], budget_bits: float, spread: float, budget: Budget
) -> list[int]:
    """QPruner-style start: target widths rise with standardised log-importance, rounded, repaired."""
    logs = np.log(np.maximum(np.asarray(importance, dtype=float), 1e-12))
    z = (logs - logs.mean()) / (logs.std() or 1.0)
    widths = np.array([SCHEMES.get(c).bits for c in space.choices], dtype=float)
    idx = [int(np.argmin(np.abs(widths - budget_bits * (1 + spread * zg)))) for zg in z]
    return repair(space, idx, importance, budget)


@dataclass
class Trial:
    trial: int
    source: str  # uniform | importance:<spread> | gp
    index: list[int]
    avg_bits: float
    quantized_bytes: int
    loss: float
    seconds: float

    def row(self, labels: list[str], choices: list[str]) -> dict:
        """The trial as the trials file records it: no time, so the same search gives the same file."""
        return {
            "trial": self.trial,
            "source": self.source,
            "loss": round(self.loss, 6),
            "avg_bits": round(self.avg_bits, 4),
            "quantized_bytes": self.quantized_bytes,
            "plan": {label: choices[i] for label, i in zip(labels, self.index, strict=True)},
        }


@dataclass
class SearchResult:
    space: SearchSpace
    importance: list[float]
    trials: list[Trial] = field(default_factory=list)

    def best(self) -> Trial:
        return min(self.trials, key=lambda t: (t.loss, t.trial))

    def uniform(self) -> Trial:
        return next(t for t in self.trials if t.source == "uniform")


def sensitivities(space: SearchSpace, loss_of: Callable[[Plan], float], base_loss: float) -> list[float]:
    """Per group: loss increase when only that group is quantized to the narrowest choice (>= 1e-9)."""
    out = []
    for group in space.groups:
        plan = {t.name: space.choices[0] for t in group}
        out.append(max(loss_of(plan) - base_loss, 1e-9))
    return out


def search(
    space: SearchSpace,
    loss_of: Callable[[Plan], float],
    budget: Budget,
    trials: int,
    random_starts: int,
    spreads: list[float],
    seed: int,
) -> SearchResult:
    """Sensitivities, the uniform and importance starts, then ``trials`` gp_minimize calls."""
    from skopt import gp_minimize
    from skopt.space import Integer

    uniform = uniform_index(space, budget)  # an unreachable budget fails here, before any loss is computed
    base = loss_of({})
    importance = sensitivities(space, loss_of, base)
    result = SearchResult(space, importance)
    budget_bits = budget.bits if budget.bits is not None else space.cost(uniform)[0]

    def evaluate(index: list[int], source: str) -> float:
        start = time.perf_counter()
        loss = loss_of(space.plan(index))
        bits, nbytes = space.cost(index)
        result.trials.append(
            Trial(len(result.trials), source, list(index), bits, nbytes, loss, time.perf_counter() - start)
        )
        log.info("trial %d (%s): %.3f bits, loss %.5f", len(result.trials) - 1, source, bits, loss)
        return loss

    starts: list[tuple[list[int], str]] = [
        (uniform, "uniform"),
        (greedy_index(space, importance, budget), "importance:greedy"),
    ]
    for s in spreads:
        starts.append((importance_index(space, importance, budget_bits, s, budget), f"importance:{s:g}"))
    x0, y0, seen = [], [], set()
    for idx, source in starts:
        if tuple(idx) in seen:
            continue
        seen.add(tuple(idx))
        x0.append(idx)
        y0.append(evaluate(idx, source))
    if trials > 0:
        dims = [Integer(0, len(space.choices) - 1, name=label) for label in space.labels]
        gp_minimize(
            lambda x: evaluate(repair(space, [int(v) for v in x], importance, budget), "gp"),
            dims,
            x0=x0,
            y0=y0,
            n_calls=trials,
            n_initial_points=min(random_starts, trials),
            random_state=seed,
        )
    if not all(math.isfinite(t.loss) for t in result.trials):
        raise PrunekitError("a search trial produced a non-finite loss; the quantized model diverges (check choices)")
    return result


@dataclass
class SearchOutcome:
    """What the search stage writes: the best plan, every trial, the headline numbers, per-group sensitivity."""

    plan: dict[str, str]
    trials: list[dict[str, object]]
    metrics: dict[str, object]
    sensitivity: list[dict[str, object]]


def search_model(
    model: CausalLM,
    adapter: ModelAdapter,
    held: torch.Tensor,
    cfg: SearchParams,
    settings: QuantSettings,
    seed: int,
) -> SearchOutcome:
    """QPruner's search on a loaded model: the objective is the LM loss of the ``held`` (N, T) windows with every
    planned weight replaced by its quantize -> dequantize image (images cached when ``cfg.cache_mib`` allows)."""
    from prunekit.quant.plan import quant_targets
    from prunekit.quant.realise import fake_quantized
    from prunekit.training.loss import lm_loss

    budget = Budget(bits=cfg.budget_bits, bytes=cfg.budget_bytes)
    device = next(model.parameters()).device
    targets = quant_targets(model, adapter, embeddings=cfg.embeddings)
    dtype_bytes = next(model.parameters()).element_size()
    cache_need = sum(t.numel for t in targets) * len(cfg.choices) * dtype_bytes / 2**20
    cache: dict | None = {} if cache_need <= cfg.cache_mib else None
    log.info("search: image cache %s (needs %.0f MiB, search.cache_mib %d)",
             "on" if cache is not None else "off", cache_need, cfg.cache_mib)  # fmt: skip

    @torch.no_grad()
    def loss_of(plan: Plan) -> float:
        with fake_quantized(model, plan, settings, cache):
            total = 0.0
            for start in range(0, held.shape[0], cfg.batch_size):
                batch = held[start : start + cfg.batch_size].to(device)
                total += lm_loss(model, batch).item() * batch.shape[0]
        return total / held.shape[0]

    space = build_space(targets, cfg.granularity, list(cfg.choices), settings)
    result = search(space, loss_of, budget, cfg.trials, cfg.random_starts, list(cfg.importance_spreads), seed)
    best, uniform = result.best(), result.uniform()
    rows = [t.row(space.labels, space.choices) for t in result.trials]
    metrics = {
        "budget": {"bits": cfg.budget_bits, "bytes": cfg.budget_bytes},
        "best": {
            "loss": round(best.loss, 6),
            "avg_bits": round(best.avg_bits, 4),
            "bytes": best.quantized_bytes,
            "trial": best.trial,
            "source": best.source,
        },
        "uniform": {
            "loss": round(uniform.loss, 6),
            "avg_bits": round(uniform.avg_bits, 4),
            "bytes": uniform.quantized_bytes,
            "scheme": space.choices[uniform.index[0]],
        },
        "trials": len(rows),
    }
    sensitivity = [{"group": label, "loss_increase": round(v, 6)} for label, v in zip(space.labels, result.importance)]
    return SearchOutcome(space.plan(best.index), rows, metrics, sensitivity)
