"""The prune step: a schedule cuts a model down to a target and records what it kept.

A schedule (``prune.schedule``) is one module that subclasses :class:`Schedule` and registers an instance in
:data:`SCHEDULES` in one line. :func:`prune_model` is the library call the prune stage makes: it runs the
named schedule on a :class:`PruneJob` and returns the smaller model with a plan whose indices number the
units of the model it was given, whatever the schedule (one cut, masks raised during training, several cuts).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM
from prunekit.pipeline.params import AllocationSearchParams, PruneParams, ScheduleParams, ScoreParams
from prunekit.pruning.allocations import ALLOCATIONS, make_plan
from prunekit.pruning.plan import Plan, PlanRequest
from prunekit.registry import Registry

log = logging.getLogger(__name__)

# Keys of a scores file that are not scores: side data a criterion records (FLAP's channel means).
SIDE_PREFIX = "aux."


def split_scores(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A scores file's tensors as (scores ``"<unit>.<layer>"``, side data ``"aux.*"``)."""
    scores = {k: v for k, v in tensors.items() if not k.startswith(SIDE_PREFIX)}
    return scores, {k: v for k, v in tensors.items() if k.startswith(SIDE_PREFIX)}


@dataclass(frozen=True)
class Cut:
    """How much to remove and where (``prune.*``), with the criterion whose scores rank the units."""

    target: float
    units: list[str]
    allocation: str
    criterion: str
    skip_first: int = 0
    skip_last: int = 0
    round_to: dict[str, int] = field(default_factory=dict)
    tolerance: float = 0.01
    bias_compensation: bool = False
    reconstruct: str = "none"  # none | least_squares (prunekit.pruning.reconstruction)
    reconstruct_ridge: tuple[float, ...] = (0.01, 0.1, 0.3, 1.0)  # chosen from on the held-out windows
    reconstruct_holdout: float = 0.25  # share of the refit windows held out (0: choose and judge on all of them)
    reconstruct_standard_errors: float | None = 2.0  # the refit model's held-out lead to be kept (None: not judged)
    reconstruct_samples: int | None = None  # training-text windows to refit on (None: the calibration windows)
    reconstruct_seq_len: int = 128
    search: AllocationSearchParams = field(default_factory=AllocationSearchParams)  # allocation: search

    @classmethod
    def of(cls, prune: PruneParams, criterion: str) -> Cut:
        """From the ``prune`` params section and ``score.criterion``."""
        shared = {f.name for f in dataclasses.fields(cls)} & set(type(prune).model_fields)
        values = {name: getattr(prune, name) for name in shared}
        lists = {"units": list(prune.units), "round_to": dict(prune.round_to),
                 "reconstruct_ridge": tuple(prune.reconstruct_ridge)}  # fmt: skip
        return cls(**values | lists | {"criterion": criterion})

    def layers(self, model: CausalLM, adapter: ModelAdapter) -> list[int]:
        """The model's prunable layers (its first ``skip_first`` and last ``skip_last`` left whole)."""
        from prunekit.pruning.slicing import prunable_layers

        return prunable_layers(len(adapter.layers(model)), self.skip_first, self.skip_last)

    def request(
        self,
        model: CausalLM,
        adapter: ModelAdapter,
        fraction: float,
        original: int,
        job: PruneJob | None = None,
        label: str = "",
    ) -> PlanRequest:
        """Cut ``model`` so that ``1 - fraction`` of ``original`` parameters remain (the tolerance is on those too).

        With ``allocation: search`` the request carries the search, which evaluates candidates on ``model`` with
        ``job``'s calibration tokens (``label`` names it in the trials and its resume record)."""
        from prunekit.models.size import count_params
        from prunekit.pruning.slicing import layouts

        lays = layouts(model, adapter, list(self.units), self.layers(model, adapter))
        current = count_params(model)
        if current == original:  # the first cut: the fractions as given
            req = PlanRequest(fraction, current, lays, dict(self.round_to), self.tolerance)
        else:
            req = PlanRequest.of_original(fraction, original, current, lays, dict(self.round_to), self.tolerance)
        if ALLOCATIONS.get(self.allocation).evaluates_candidates:
            req = dataclasses.replace(req, search=self.searcher(model, adapter, job, label))
        return req

    def searcher(self, model: CausalLM, adapter: ModelAdapter, job: PruneJob | None, label: str) -> Any:
        """The allocation search of a cut of ``model``: candidates scored as this cut would produce them."""
        from prunekit.pruning.allocations.search import AllocationSearch, candidate_objective, holdout_problem
        from prunekit.pruning.holdout import held_out_mask

        if job is None:
            raise ValueError("allocation 'search' evaluates candidates on calibration tokens: give the request a job")

        tokens = job.calibration_tokens()
        held = held_out_mask(tokens.shape[0], self.search.holdout)
        problem = holdout_problem(tokens.shape[0], self.search.holdout)
        if problem:
            raise PrunekitError(f"prune.search.holdout: {problem}")
        # A candidate's refit never sees the held-out windows that judge it (training-text refit windows are others).
        refit_tokens = tokens[~held] if self.reconstruct_samples is None else None

        def refit(candidate: nn.Module, plan: Plan) -> None:
            self.refit(candidate, adapter, plan, job, tokens=refit_tokens)

        def objective(windows: torch.Tensor, per_window: bool = False) -> Any:
            return candidate_objective(model, adapter, windows, job.score_batch_size, self.search.objective,
                                       refit if self.reconstruct != "none" else None, job.activations_mib,
                                       per_window)  # fmt: skip

        state = job.state_dir / "allocation_search.json" if job.state_dir is not None else None
        judge = objective(tokens[held], per_window=True) if bool(held.any()) else None
        return AllocationSearch(self.search, objective(tokens[~held]), job.seed, label, state, job.state_key, judge)

    def plan(self, scores: dict[str, torch.Tensor], req: PlanRequest) -> Plan:
        return make_plan(scores, req, self.allocation, criterion=self.criterion)

    @staticmethod
    def trials(req: PlanRequest) -> list[dict[str, Any]]:
        """Every candidate an allocation search of ``req`` evaluated (none for the other allocations)."""
        return req.search.rows() if req.search is not None else []

    def refit(
        self,
        model: CausalLM,
        adapter: ModelAdapter,
        plan: Plan,
        job: PruneJob,
        reference: nn.Module | None = None,
        tokens: torch.Tensor | None = None,
    ) -> list[Any]:
        """Before slicing by ``plan``: the reconstruction ``prune.reconstruct`` asks for (its fits; none: []).
        ``reference``: the dense model of ``model``'s shapes whose layer outputs the refit follows (default:
        ``model`` before the refit); ``tokens``: the windows to refit on (default: the job's reconstruction
        tokens).

        With ``reconstruct_holdout`` > 0 and ``reconstruct_standard_errors`` set, that share of the windows judges
        the refit model as a whole and takes no other part: the refit (which holds out the same share of the other
        windows to choose each projection's ridge) never sees them. Each model's KL from the reference on each of
        them, and the refit is kept only if its mean gain over the plainly sliced model exceeds
        ``reconstruct_standard_errors`` standard errors. Each projection already beat its sliced weights on its own
        outputs, but what one projection gains can be lost through the layers after it; a refit that loses is
        undone (the fits then record the sliced weights as kept)."""
        if self.reconstruct == "none":
            return []
        from prunekit.pruning.allocations.search import model_objective
        from prunekit.pruning.holdout import beats, held_out_gain, held_out_mask
        from prunekit.pruning.reconstruction import reconstruct, refit_parameters
        from prunekit.pruning.slicing import apply_plan

        tokens = job.reconstruction_tokens() if tokens is None else tokens
        choice, margin = self.refit_choice(), self.reconstruct_standard_errors
        problem = choice.problem(tokens.shape[0], judged=margin is not None)
        if problem:
            raise PrunekitError(f"prune.reconstruct_holdout: {problem}")
        held = held_out_mask(tokens.shape[0], self.reconstruct_holdout)
        if margin is None or not bool(held.any()):  # no judgement of the refit model: every window refits
            return reconstruct(model, adapter, plan, tokens, job.score_batch_size, choice, reference,
                               job.activations_mib)  # fmt: skip
        # The teacher's states come from the model before the refit (the dense one) when no reference is given.
        kl = model_objective(reference if reference is not None else model, tokens[held], job.score_batch_size,
                             "kl", job.activations_mib, True)  # fmt: skip

        def judged(candidate: nn.Module) -> list[float]:
            cut = copy.deepcopy(candidate)
            apply_plan(cut, adapter, plan, mode="slice")  # the model the cut produces
            return list(kl(cut))

        before = judged(model)  # the plainly sliced cut, judged before the refit writes into the model
        written = refit_parameters(model, adapter)
        saved = [p.detach().clone() for p in written]  # what an undone refit restores, not a whole model copy
        fits = reconstruct(model, adapter, plan, tokens[~held], job.score_batch_size, choice, reference,
                           job.activations_mib)  # fmt: skip
        if not any(f.ridge is not None for f in fits):
            return fits
        after = judged(model)
        gain, error = held_out_gain(before, after)
        kept = beats(gain, error, margin)
        log.info("reconstruction: held-out KL sliced %.5f, refit %.5f (gain %.5f, %g standard errors %.5f): %s",
                 sum(before) / len(before), sum(after) / len(after), gain, margin, margin * error,
                 "refit kept" if kept else "refit undone")  # fmt: skip
        if kept:
            return fits
        with torch.no_grad():
            for p, value in zip(written, saved, strict=True):
                p.copy_(value)
        return [dataclasses.replace(f, error_reconstructed=f.error_sliced, ridge=None) for f in fits]

    def refit_choice(self) -> Any:
        """How the reconstruction chooses its ridge and judges its refit (``prune.reconstruct_*``)."""
        from prunekit.pruning.reconstruction import RefitChoice

        return RefitChoice(self.reconstruct_ridge, self.reconstruct_holdout)


@dataclass
class PruneJob:
    """Everything a schedule may need. Training data and calibration tokens are only read by schedules
    that train or rescore, so they come as loaders."""

    model: CausalLM
    tokenizer: Any
    adapter: ModelAdapter
    scores: dict[str, torch.Tensor]  # "<unit>.<layer>" -> scores of ``model``'s units (the score stage's)
    cut: Cut
    seed: int = 0
    side: dict[str, torch.Tensor] = field(default_factory=dict)  # "aux.*" side data of the scores
    schedule: ScheduleParams = field(default_factory=ScheduleParams)  # the schedules' settings and LoRA
    training_blocks: Callable[[int], torch.Tensor] | None = None  # seq_len -> (N, seq_len) training tokens
    calibration: Callable[[], torch.Tensor] | None = None  # -> (N, T) tokens for rescoring (kshot)
    score_batch_size: int = 8
    activations_mib: int = 2048  # calibration hidden states held in memory up to this, then on disk
    score_options: ScoreParams = field(default_factory=ScoreParams)  # the criterion's settings (``score.*``)
    state_dir: Path | None = None  # checkpoints of a long schedule (a killed run resumes from them)
    state_key: str = ""  # fingerprint of the params and inputs a checkpoint belongs to
    _dense: nn.Module | None = field(default=None, init=False, repr=False)

    def blocks(self, seq_len: int) -> torch.Tensor:
        if self.training_blocks is None:
            raise ValueError("this schedule trains LoRA: give the job training_blocks")
        return self.training_blocks(seq_len)

    def dense(self) -> nn.Module:
        """A frozen copy of the model as given (the unpruned one), made on the first call, which must come before
        the schedule changes the model; distillation's teacher and the reconstruction's reference share it."""
        if self._dense is None:
            self._dense = copy.deepcopy(self.model).eval().requires_grad_(False)
        return self._dense

    def loss(self) -> Any:
        """The schedules' LoRA loss (``schedule.loss``); distillation's teacher is :meth:`dense`. None: the LM
        loss."""
        if self.schedule.loss == "lm":
            return None
        from prunekit.training.lora import recovery_loss

        return recovery_loss(self.schedule.loss, self.dense(), self.schedule.temperature)

    def calibration_tokens(self) -> torch.Tensor:
        if self.calibration is None:
            raise ValueError("this schedule rescores the model: give the job calibration tokens")
        return self.calibration()

    def reconstruction_tokens(self) -> torch.Tensor:
        """What least-squares reconstruction refits on: ``cut.reconstruct_samples`` windows of the training text
        (non-overlapping blocks of ``cut.reconstruct_seq_len`` tokens, a seeded choice), or the calibration windows."""
        n = self.cut.reconstruct_samples
        if n is None:
            return self.calibration_tokens()
        blocks = self.blocks(self.cut.reconstruct_seq_len)
        if blocks.shape[0] < n:
            raise PrunekitError(
                f"prune.reconstruct_samples={n}: the training text holds only {blocks.shape[0]} windows of "
                f"{self.cut.reconstruct_seq_len} tokens; lower prune.reconstruct_samples or reconstruct_seq_len"
            )
        chosen = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(self.seed))[:n]
        return blocks[chosen.sort().values]


@dataclass
class PruneResult:
    model: CausalLM  # the smaller model (physically sliced)
    plan: Plan  # kept units, numbered as in the job's model; params_after counts the returned model
    log: list[dict[str, Any]] = field(default_factory=list)  # per step or per shot, for the metrics
    fits: list[Any] = field(default_factory=list)  # reconstruction.ProjectionFit of every refit projection
    trials: list[dict[str, Any]] = field(default_factory=list)  # allocation search: every candidate evaluated

    def metrics(self, target: float, schedule: str) -> dict[str, Any]:
        """The prune stage's metrics: parameters before and after, the fraction reached, the schedule's log."""
        out = {
            "params_before": self.plan.params_before,
            "params_after": self.plan.params_after,
            "achieved_fraction": round(self.plan.achieved, 6),
            "target_fraction": target,
            "schedule": schedule,
        }
        if self.fits:
            from prunekit.pruning.reconstruction import summary

            out["reconstruction"] = summary(self.fits)
        if self.trials:
            best = min(self.trials, key=lambda t: (t["objective"], t["candidate"]))
            first = self.trials[0]
            held = {
                f"{name}_held_out": t["held_out"] for name, t in (("best", best), ("flat", first)) if "held_out" in t
            }
            if "held_out_gain_se" in best:  # the standard error of the best one's gain there
                held["held_out_gain_se"] = best["held_out_gain_se"]
            out["allocation_search"] = {
                "candidates": len(self.trials),
                "best_candidate": best["candidate"],
                "best_objective": best["objective"],
                "flat_objective": first["objective"],
                # The candidate the cut took: the best, unless it did not clearly beat the flat profile held out.
                "kept_candidate": next(t["candidate"] for t in self.trials if t["kept"]),
            } | held
        return out | ({"schedule_log": self.log} if self.log else {})


class Schedule(ABC):
    """How a model gets from its scores to the target: once, while LoRA trains, or in several shots."""

    name = ""
    # Whether the schedule trains (LoRA): it then runs on ``model.device``; a one-shot cut slices on the CPU.
    trains: bool = True
    # Whether it cuts one decoder layer at a time, so ``model.offload: layerwise`` can hold the model.
    layer_by_layer: bool = False

    def problems(self, cut: Cut) -> list[str]:
        """What in ``cut`` this schedule cannot do, one sentence each naming the params key (params check)."""
        return []

    @abstractmethod
    def run(self, job: PruneJob) -> PruneResult:
        """Cut ``job.model`` to ``job.cut.target``; the returned plan numbers ``job.model``'s units."""


SCHEDULES: Registry[Schedule] = Registry("schedule")


def prune_model(job: PruneJob, schedule: str) -> PruneResult:
    """Run the schedule named ``schedule`` on ``job``; ``plan.params_after`` counts what the model holds.

    Bias compensation adds biases the plan does not count (o_proj/down_proj, and zeros on q/k/v/gate/up), so the
    reported parameters are those of the returned model.
    """
    from prunekit.models.size import count_params

    dense_names = {name for name, _ in job.model.named_parameters()}
    result = SCHEDULES.get(schedule).run(job)
    added = sum(t.numel() for name, t in result.model.named_parameters() if name not in dense_names)
    if added:
        log.info("bias compensation added %d parameters; the reported fraction counts them", added)
    result.plan.params_after = count_params(result.model)
    return result
