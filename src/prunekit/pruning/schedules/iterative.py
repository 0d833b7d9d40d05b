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
from prunekit.pruning.plan import Plan, PlanRequest, make_plan
from prunekit.pruning.schedules.base import SCHEDULES, Cut, PruneJob, PruneResult, Schedule
from prunekit.pruning.schedules.state import read_state, write_state
from prunekit.pruning.units import UNITS
from prunekit.rng import seeded
from prunekit.training.loss import lm_loss

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
            "lower them or raise schedule.iterative_steps"
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

    def __init__(self, model: nn.Module, adapter: ModelAdapter, units: list[str], layers: list[int]) -> None:
        self.adapter = adapter
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

    def attach(self, model: nn.Module) -> None:
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
    peft_model: nn.Module, adapter: ModelAdapter, units: list[str], layers: list[int], lr: float
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
                mod = layer.get_submodule(module_path)
                if ADAPTER not in getattr(mod, "lora_A", {}):
                    raise PrunekitError(f"schedule.target_modules must cover '{module_path}' (unit {unit})")
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
    lora: Any  # recovery.LoraSettings: its ``steps`` are the schedule's steps in all


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then linear decay to 0 (transformers' linear schedule), as a function of the step."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def iterative_prune(
    model: nn.Module,
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
) -> tuple[nn.Module, Plan, list[dict[str, float]]]:
    """LoRAPrune's schedule (module docstring); returns (sliced merged model, final plan, log per step).

    ``stop_after`` ends the run after that many steps as if killed (tests); the state folder keeps the
    last checkpoint.
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from prunekit.pruning.slicing import apply_plan

    masks = UnitMasks(model, adapter, units, layers)
    lc = cfg.lora
    with seeded(lc.seed):  # LoRA A's init and dropout; the caller's random state is left as it was
        lora = LoraConfig(
            r=lc.rank,
            lora_alpha=lc.alpha,
            lora_dropout=lc.dropout,
            target_modules=list(lc.target_modules),
            task_type="CAUSAL_LM",
            bias="none",
        )
        peft_model = get_peft_model(model, lora)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=lc.learning_rate, weight_decay=lc.weight_decay)
        gen = torch.Generator().manual_seed(lc.seed)
        order, pos = torch.randperm(blocks.shape[0], generator=gen), 0
        ema: dict[str, torch.Tensor] | None = None
        plan: Plan | None = None
        history: list[dict[str, float]] = []
        start = 0
        state = read_state(state_dir, state_key) if state_dir is not None else None
        if state is not None:
            set_peft_model_state_dict(peft_model, load_file(str(state_dir / "adapter.safetensors")))
            tensors = load_file(str(state_dir / "tensors.safetensors"))
            opt.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
            ema = {k.removeprefix("ema."): v for k, v in tensors.items() if k.startswith("ema.")} or None
            torch.set_rng_state(tensors["rng.torch"])
            gen.set_state(tensors["rng.data"])
            order, pos = tensors["order"], state["pos"]
            plan = Plan.from_json(state["plan"]) if state["plan"] else None
            history, start = state["history"], state["step"] + 1
            log.info("iterative schedule: resuming after step %d", state["step"])
        masks.set_plan(plan)
        masks.attach(peft_model)
        steps = lc.steps
        warm = round(cfg.warmup * steps)
        device = next(model.parameters()).device
        peft_model.train()
        current = plan.target if plan is not None else 0.0
        for step in tqdm(range(start, steps), desc="iterative pruning", unit="step", initial=start, total=steps):
            if pos + lc.batch_size > order.numel():
                order, pos = torch.randperm(blocks.shape[0], generator=gen), 0
            batch = blocks[order[pos : pos + lc.batch_size]].to(device)
            pos += lc.batch_size
            loss = lm_loss(peft_model, batch)
            if not torch.isfinite(loss):
                raise PrunekitError(f"loss became {loss.item()} at step {step}; lower schedule.learning_rate")
            loss.backward()
            want = cubic_fraction(step, steps, req.target, cfg.warmup, cfg.cooldown)
            due = step >= warm and ((step - warm) % cfg.prune_freq == 0 or want == req.target)
            if due and want > current:
                with torch.no_grad():
                    new = training_lora_scores(peft_model, adapter, units, layers, lc.learning_rate)
                ema = smooth(ema, new, cfg.ema, plan)
                final = want == req.target
                step_req = PlanRequest(
                    want, req.total_params, req.layouts, req.round_to, req.tolerance if final else 1.0
                )
                plan = make_plan(ema, step_req, allocation, criterion="lora")
                masks.set_plan(plan)
                current = want
            for group in opt.param_groups:
                group["lr"] = lc.learning_rate * _lr_factor(step, steps, warm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            history.append({"step": step, "loss": loss.item(), "fraction": plan.achieved if plan else 0.0})
            last = step + 1 == steps
            if state_dir is not None and ((step + 1) % cfg.checkpoint_every == 0) and not last:
                record = {
                    "step": step,
                    "pos": pos,
                    "plan": plan.to_json() if plan else None,
                    "history": history,
                }
                flat, layout = _flatten_optimizer(opt.state_dict())
                record["optimizer"] = layout
                tensors = {**flat, "rng.torch": torch.get_rng_state(), "rng.data": gen.get_state(), "order": order}
                tensors |= {f"ema.{k}": v for k, v in (ema or {}).items()}
                adapter_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}

                def write(tmp: Path, tensors: dict = tensors, adapter_state: dict = adapter_state) -> None:
                    save_file(adapter_state, str(tmp / "adapter.safetensors"))
                    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))

                write_state(state_dir, state_key, record, write)
            if stop_after is not None and step + 1 >= stop_after:
                masks.detach()
                raise KeyboardInterrupt(f"stopped after step {step} (stop_after)")
        masks.detach()
        if plan is None or not math.isclose(plan.target, req.target):
            raise PrunekitError("the schedule never reached prune.target: raise schedule.iterative_steps")
        merged = peft_model.merge_and_unload()
        merged.eval()
        apply_plan(merged, adapter, plan, mode="slice")
        return merged, plan, history


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state_dict as safetensors-ready tensors plus a JSON layout (no pickle)."""
    flat, layout = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        layout["state"][str(pid)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                flat[f"opt.{pid}.{name}"] = value.detach().clone().contiguous()
                layout["state"][str(pid)][name] = "tensor"
            else:
                layout["state"][str(pid)][name] = value
    return flat, layout


def _unflatten_optimizer(flat: dict[str, torch.Tensor], layout: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for pid, entries in layout["state"].items():
        state[int(pid)] = {k: flat[f"opt.{pid}.{k}"] if v == "tensor" else v for k, v in entries.items()}
    return {"state": state, "param_groups": layout["param_groups"]}


class Iterative(Schedule):
    """LoRAPrune: masks raised on a cubic schedule while LoRA trains, importance from its adapters."""

    name = "iterative"

    def problems(self, cut: Cut) -> list[str]:
        out = []
        if set(cut.units) & {"layer", "hidden_channel"}:
            out.append(
                "params.yaml key 'prune.units': the iterative schedule masks widths inside layers; "
                "'layer' and 'hidden_channel' need prune.schedule: oneshot or kshot"
            )
        if cut.bias_compensation:
            out.append(
                "params.yaml key 'prune.bias_compensation': not available with prune.schedule 'iterative' "
                "(the schedules retrain after each cut); use prune.schedule: oneshot"
            )
        return out

    def run(self, job: PruneJob) -> PruneResult:
        from prunekit.pruning.criteria.lora import missing_targets
        from prunekit.pruning.slicing import count_params
        from prunekit.training.lora import LoraSettings, check_targets

        sc, units = job.schedule, list(job.cut.units)
        check_targets(job.model, list(sc.target_modules), "schedule.target_modules")
        layers = job.cut.layers(job.model, job.adapter)
        dense_layers = job.adapter.layers(job.model)
        targets = list(sc.target_modules)
        missing = sorted({t for i in layers for t in missing_targets(job.adapter, dense_layers[i], units, targets)})
        if missing:
            raise PrunekitError(
                f"schedule.target_modules {targets} miss {missing}: the iterative schedule scores every pruned "
                "module from its LoRA adapter"
            )
        cfg = IterativeSettings(
            prune_freq=sc.prune_freq,
            warmup=sc.warmup,
            cooldown=sc.cooldown,
            ema=sc.ema,
            checkpoint_every=sc.checkpoint_every,
            lora=LoraSettings.from_params(sc, sc.iterative_steps, job.seed),
        )
        req = job.cut.request(job.model, job.adapter, job.cut.target, count_params(job.model))
        model, plan, history = iterative_prune(job.model, job.adapter, job.blocks(sc.seq_len), req, units, layers,
                                               job.cut.allocation, cfg, job.state_dir, job.state_key)  # fmt: skip
        return PruneResult(model, plan, history)


SCHEDULES.register(Iterative.name)(Iterative())
