"""``prune.schedule: iterative``: LoRAPrune's pruning while LoRA trains.

LoRA trains on the training text (``schedule.*`` settings) while the pruned units are *masked*: a forward hook
zeroes the outputs of the rows a unit owns (q/k/v/gate/up rows, with their biases) and a pre-hook the inputs of the
columns it owns (o_proj/down_proj columns), which is exactly a mask on the merged weight W + s*B@A. Every
``schedule.prune_freq`` steps (counted from the end of the warm-up) the ``lora`` importance of every unit is
recomputed from the *training* adapters and the gradients of the current batch (``|G_hat * (W + s*B@A)|``,
:mod:`prunekit.pruning.criteria.lora`), L2-normalised per layer and unit type, and smoothed: ``ema = schedule.ema *
ema + (1 - schedule.ema) * new`` (LoRAPrune: 0.9). A unit once masked stays masked (its smoothed score is set to 0,
below every kept unit's). The pruned fraction follows the cubic schedule of :func:`cubic_fraction`: 0 during the
warm-up, ``target * (1 - (1 - p)^3)`` while ramping, ``target`` through the cool-down. At the end the adapters are
merged and the masked units sliced off; the result goes to ``recover`` like a one-shot model. Works with ``lora``
scores only (its point is needing no gradient of the frozen weights); any allocation and every unit type except
``layer`` and ``hidden_channel``.

Resume: a checkpoint every ``schedule.checkpoint_every`` steps (adapters, optimizer, smoothed scores, masks, every
random state) in the state folder (:mod:`prunekit.pruning.schedules.state`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM, Submodule
from prunekit.pruning.allocations import ALLOCATIONS, make_plan
from prunekit.pruning.plan import Plan, PlanRequest
from prunekit.pruning.schedules.base import SCHEDULES, Cut, PruneJob, PruneResult, Schedule
from prunekit.pruning.schedules.state import read_state, write_state
from prunekit.pruning.units import UNITS
from prunekit.rng import seeded
from prunekit.training.lora import LoraTrainer, attach_lora

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# fractions


def cubic_fraction(step: int, total: int, target: float, warmup: float, cooldown: float) -> float:
    """Pruned fraction after optimizer step ``step`` (0-based) of ``total`` (LoRAPrune's cubic schedule).

    With w = round(warmup * total) and c = round(cooldown * total) steps and a ramp of r = total - w - c steps:
    0 for step < w; ``target * (1 - (1 - (step - w + 1) / r) ** 3)`` on the ramp (the last ramp step reaches
    ``target``); ``target`` for the last c steps.
    """
    w, c = round(warmup * total), round(cooldown * total)
    ramp = total - w - c
    if ramp < 1:
        raise PrunekitError(
            f"schedule.warmup={warmup} + schedule.cooldown={cooldown} leave no step of {total} to prune in; "
            "lower them or raise schedule.lora.steps"
        )
    if step < w:
        return 0.0
    if step >= w + ramp:
        return target
    p = (step - w + 1) / ramp
    return target * (1.0 - (1.0 - p) ** 3)


# ---------------------------------------------------------------------------------------------------
# masks on the merged weights


@dataclass(frozen=True)
class _Slot:
    """Where a unit type's member lives, relative to its layer: the module, and whether rows or columns."""

    unit: str
    layer: int
    module: str
    side: str  # "out" (rows: output entries) | "in" (columns: input entries)
    member: Any


class UnitMasks:
    """Forward hooks that remove units from a model without changing its shapes (see the module docstring).

    Built on the dense model (its members number the units a plan names); the hooks are attached to whatever
    module sits at each path when :meth:`attach` runs (a peft LoRA layer wraps base and adapter together).
    """

    def __init__(self, model: CausalLM, adapter: ModelAdapter, units: list[str], layers: list[int]) -> None:
        self.adapter, self.units, self.layers = adapter, list(units), list(layers)
        self.slots: list[_Slot] = []
        self.sizes: dict[tuple[int, str, str], int] = {}
        dense_layers = adapter.layers(model)
        for unit in units:
            ut = UNITS.get(unit)
            if ut.whole_layer or ut.model_wide:
                raise PrunekitError(f"prune.schedule iterative cannot mask unit '{unit}'; prune it one-shot")
            for idx in layers:
                layer = dense_layers[idx]
                for m in ut.members(adapter, layer):
                    module, attr = m.path.rsplit(".", 1)
                    p = layer.get_parameter(m.path)
                    side = "out" if (m.dim == 0) else "in"
                    if attr not in ("weight", "bias") or p.dim() - 1 < m.dim:
                        raise PrunekitError(f"unit '{unit}' owns '{m.path}', which a hook cannot mask")
                    self.slots.append(_Slot(unit, idx, module, side, m))
                    self.sizes[(idx, module, side)] = p.shape[m.dim]
        self.masks: dict[tuple[int, str, str], torch.Tensor] = {}
        self.handles: list[Any] = []

    def set_plan(self, plan: Plan | None) -> None:
        """Keep exactly the plan's units (None: keep all)."""
        masks = {key: torch.ones(n) for key, n in self.sizes.items()}
        if plan is not None:
            for s in self.slots:
                kept = plan.keep.get(s.unit, {}).get(s.layer)
                if kept is None:
                    continue
                keep = torch.zeros(self.sizes[(s.layer, s.module, s.side)], dtype=torch.bool)
                keep[s.member.entries(torch.tensor(sorted(kept), dtype=torch.long))] = True
                masks[(s.layer, s.module, s.side)] *= keep.float()
        self.masks = masks

    def attach(self, model: CausalLM) -> None:
        """Hook every masked module of ``model`` (its current modules: plain or LoRA-wrapped)."""
        self.detach()
        layers = self.adapter.layers(model)
        for (idx, module, side), _ in self.sizes.items():
            mod = layers[idx].get_submodule(module)
            key = (idx, module, side)
            if side == "out":
                self.handles.append(mod.register_forward_hook(self._out_hook(key)))
            else:
                self.handles.append(mod.register_forward_pre_hook(self._in_hook(key)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _mask(self, key: tuple[int, str, str], like: torch.Tensor) -> torch.Tensor:
        return self.masks[key].to(device=like.device, dtype=like.dtype)

    def _out_hook(self, key: tuple[int, str, str]) -> Callable[..., torch.Tensor]:
        def hook(_module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
            return out * self._mask(key, out)

        return hook

    def _in_hook(self, key: tuple[int, str, str]) -> Callable[..., tuple[torch.Tensor, ...]]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return (args[0] * self._mask(key, args[0]), *args[1:])

        return hook


# ---------------------------------------------------------------------------------------------------
# LoRAPrune importance from the training adapters


def training_lora_scores(
    peft_model: CausalLM, adapter: ModelAdapter, units: list[str], layers: list[int], lr: float
) -> dict[str, torch.Tensor]:
    """``"<unit>.<layer>"`` -> lora importance per unit from the adapters being trained and their current grads."""
    from prunekit.pruning.criteria.lora import ADAPTER, LoraFactors, element_importance

    out = {}
    model_layers = adapter.layers(peft_model)
    for unit in units:
        ut = UNITS.get(unit)
        for idx in layers:
            layer = model_layers[idx]
            values = {}
            for m in ut.members(adapter, layer):
                module_path, attr = m.path.rsplit(".", 1)
                mod: Submodule = layer.get_submodule(module_path)
                if ADAPTER not in getattr(mod, "lora_A", {}):
                    raise PrunekitError(f"schedule.lora.target_modules must cover '{module_path}' (unit {unit})")
                base = mod.get_base_layer()
                if attr == "bias":
                    values[m.path] = torch.zeros_like(base.bias, dtype=torch.float32)
                    continue
                a, b = mod.lora_A[ADAPTER].weight, mod.lora_B[ADAPTER].weight
                if a.grad is None or b.grad is None:
                    raise RuntimeError(f"no LoRA gradient on {module_path}: score after backward, before zero_grad")
                f = LoraFactors(a.detach(), b.detach(), a.grad, b.grad, mod.scaling[ADAPTER])
                values[m.path] = element_importance(base.weight, f, lr)
            out[f"{unit}.{idx}"] = ut.reduce(adapter, layer, values)
    return out


def smooth(
    ema: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor], weight: float, plan: Plan | None
) -> dict[str, torch.Tensor]:
    """L2-normalise each score vector, average with ``ema`` (weight on the old), and pin masked units to 0."""
    out = {}
    for key, s in new.items():
        s = s / s.norm().clamp_min(1e-30)
        out[key] = s if ema is None else weight * ema[key] + (1 - weight) * s
        if plan is not None:
            unit, layer = key.rsplit(".", 1)
            kept = plan.keep.get(unit, {}).get(int(layer))
            if kept is not None:
                dropped = torch.ones(out[key].numel(), dtype=torch.bool)
                dropped[kept] = False
                out[key] = out[key].masked_fill(dropped, 0.0)
    return out


# ---------------------------------------------------------------------------------------------------
# iterative (LoRAPrune)


@dataclass(frozen=True)
class IterativeSettings:
    prune_freq: int
    warmup: float
    cooldown: float
    ema: float
    checkpoint_every: int
    lora: Any  # training.lora.LoraSettings: its ``steps`` are the schedule's steps in all
    loss: Any = None  # training.lora.LossFn of the LoRA steps (None: the LM loss)


class _Masking:
    """The schedule's pruning state: smoothed scores, the plan the masks follow, the log per step."""

    def __init__(self, peft_model: CausalLM, adapter: ModelAdapter, masks: UnitMasks, req: PlanRequest,
                 allocation: str, cfg: IterativeSettings) -> None:  # fmt: skip
        self.peft_model, self.adapter, self.masks, self.req = peft_model, adapter, masks, req
        self.allocation, self.cfg = allocation, cfg
        self.ema: dict[str, torch.Tensor] | None = None
        self.plan: Plan | None = None
        self.history: list[dict[str, float]] = []

    def between(self, step: int, loss: float) -> None:
        """After the backward pass of ``step``: raise the masks when due (LoRA gradients still present)."""
        steps, warm = self.cfg.lora.steps, round(self.cfg.warmup * self.cfg.lora.steps)
        current = self.plan.target if self.plan is not None else 0.0
        want = cubic_fraction(step, steps, self.req.target, self.cfg.warmup, self.cfg.cooldown)
        due = step >= warm and ((step - warm) % self.cfg.prune_freq == 0 or want == self.req.target)
        if due and want > current:
            with torch.no_grad():
                new = training_lora_scores(self.peft_model, self.adapter, self.masks.units, self.masks.layers,
                                           self.cfg.lora.learning_rate)  # fmt: skip
            self.ema = smooth(self.ema, new, self.cfg.ema, self.plan)
            r = self.req
            tolerance = r.tolerance if want == r.target else 1.0
            step_req = PlanRequest(want, r.total_params, r.layouts, r.round_to, tolerance)
            self.plan = make_plan(self.ema, step_req, self.allocation, criterion="lora")
            self.masks.set_plan(self.plan)
        self.history.append({"step": step, "loss": loss, "fraction": self.plan.achieved if self.plan else 0.0})

    def save(self, trainer: LoraTrainer, state_dir: Path, state_key: str) -> None:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        tensors, record = trainer.state()
        tensors |= {f"ema.{k}": v for k, v in (self.ema or {}).items()}
        record |= {"plan": self.plan.to_json() if self.plan else None, "history": self.history}
        adapters = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.peft_model).items()}

        def write(tmp: Path) -> None:
            save_file(adapters, str(tmp / "adapter.safetensors"))
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))

        write_state(state_dir, state_key, record, write)

    def load(self, trainer: LoraTrainer, state_dir: Path, state_key: str) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        record = read_state(state_dir, state_key)
        if record is None:
            return
        set_peft_model_state_dict(self.peft_model, load_file(str(state_dir / "adapter.safetensors")))
        tensors = load_file(str(state_dir / "tensors.safetensors"))
        trainer.restore(tensors, record)
        self.ema = {k.removeprefix("ema."): v for k, v in tensors.items() if k.startswith("ema.")} or None
        self.plan = Plan.from_json(record["plan"]) if record["plan"] else None
        self.history = record["history"]
        log.info("iterative schedule: resuming after step %d", trainer.step - 1)


def iterative_prune(
    model: CausalLM,
    adapter: ModelAdapter,
    blocks: torch.Tensor,
    req: PlanRequest,
    units: list[str],
    layers: list[int],
    allocation: str,
    cfg: IterativeSettings,
    state_dir: Path | None = None,
    state_key: str = "",
    stop_after: int | None = None,
    refit: Callable[[nn.Module, Plan], Any] | None = None,
) -> tuple[nn.Module, Plan, list[dict[str, float]]]:
    """LoRAPrune's schedule (module docstring); returns (sliced merged model, final plan, log per step).

    The LoRA run is :class:`~prunekit.training.lora.LoraTrainer`'s with the masks raised between each backward
    pass and its update. ``stop_after`` ends the run after that many steps as if killed (tests); the state
    folder keeps the last checkpoint. ``refit(merged, plan)`` runs on the merged, still unsliced model before the
    slice (reconstruction).
    """
    from prunekit.pruning.slicing import apply_plan

    masks = UnitMasks(model, adapter, units, layers)
    steps = cfg.lora.steps
    with seeded(cfg.lora.seed):  # adapters' init and dropout; the caller's random state is left as it was
        peft_model = attach_lora(model, cfg.lora)
        trainer = LoraTrainer(peft_model, blocks, cfg.lora, cfg.loss)
        run = _Masking(peft_model, adapter, masks, req, allocation, cfg)
        if state_dir is not None:
            run.load(trainer, state_dir, state_key)
        masks.set_plan(run.plan)
        masks.attach(peft_model)
        peft_model.train()
        try:
            for step in tqdm(range(trainer.step, steps), desc="iterative pruning", unit="step",
                             initial=trainer.step, total=steps):  # fmt: skip
                run.between(step, trainer.backward())
                trainer.update()
                if state_dir is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                    run.save(trainer, state_dir, state_key)
                if stop_after is not None and step + 1 >= stop_after:
                    raise KeyboardInterrupt(f"stopped after step {step} (stop_after)")
        finally:
            masks.detach()
    if run.plan is None or not math.isclose(run.plan.target, req.target):
        raise PrunekitError("the schedule never reached prune.target: raise schedule.lora.steps")
    merged = peft_model.merge_and_unload()
    merged.eval()
    if refit is not None:
        refit(merged, run.plan)
    apply_plan(merged, adapter, run.plan, mode="slice")
    return merged, run.plan, run.history


class Iterative(Schedule):
    """LoRAPrune: masks raised on a cubic schedule while LoRA trains, importance from its adapters."""

    name = "iterative"

    def problems(self, cut: Cut) -> list[str]:
        out = []
        beyond = [u for u in cut.units if u in UNITS and (UNITS.get(u).whole_layer or UNITS.get(u).model_wide)]
        if beyond:
            out.append(
                "params.yaml key 'prune.units': the iterative schedule masks widths inside layers; "
                f"{', '.join(repr(u) for u in beyond)} need prune.schedule: oneshot or kshot"
            )
        if cut.bias_compensation:
            out.append(
                "params.yaml key 'prune.bias_compensation': not available with prune.schedule 'iterative' "
                "(the schedules retrain after each cut); use prune.schedule: oneshot"
            )
        if cut.allocation in ALLOCATIONS and ALLOCATIONS.get(cut.allocation).evaluates_candidates:
            out.append(
                "params.yaml key 'prune.allocation': the iterative schedule re-plans at every mask update; "
                f"'{cut.allocation}' evaluates candidates on the model and needs prune.schedule: oneshot or kshot"
            )
        return out

    def run(self, job: PruneJob) -> PruneResult:
        from prunekit.models.size import count_params
        from prunekit.pruning.criteria.lora import missing_targets
        from prunekit.training.lora import LoraSettings, check_targets

        sc, units = job.schedule, list(job.cut.units)
        lora = LoraSettings.from_params(sc.lora, job.seed, "schedule.lora")
        check_targets(job.model, lora.target_modules, "schedule.lora.target_modules")
        layers = job.cut.layers(job.model, job.adapter)
        dense_layers = job.adapter.layers(job.model)
        targets = lora.target_modules
        missing = sorted({t for i in layers for t in missing_targets(job.adapter, dense_layers[i], units, targets)})
        if missing:
            raise PrunekitError(
                f"schedule.lora.target_modules {targets} miss {missing}: the iterative schedule scores every pruned "
                "module from its LoRA adapter"
            )
        cfg = IterativeSettings(sc.prune_freq, sc.warmup, sc.cooldown, sc.ema, sc.checkpoint_every, lora, job.loss())
        req = job.cut.request(job.model, job.adapter, job.cut.target, count_params(job.model))
        blocks = job.blocks(sc.lora.seq_len)
        fits: list[Any] = []
        refit = None
        if job.cut.reconstruct != "none":
            dense = job.dense()  # before LoRA trains: the refit follows the model the schedule started from

            def refit(merged: nn.Module, plan: Plan) -> None:
                fits.extend(job.cut.refit(merged, job.adapter, plan, job, reference=dense))

        model, plan, history = iterative_prune(job.model, job.adapter, blocks, req, units, layers, job.cut.allocation,
                                               cfg, job.state_dir, job.state_key, refit=refit)  # fmt: skip
        return PruneResult(model, plan, history, fits=fits)


SCHEDULES.register(Iterative.name)(Iterative())
