"""The one LoRA trainer (peft): recovery, the iterative and k-shot schedules, QLoRA and the ``lora`` criterion.

A run is described by :class:`LoraSettings` (every params section that trains LoRA has the same keys:
``recover.lora``, ``schedule.lora``, ``quantize.lora``, ``score.lora``; :class:`~prunekit.pipeline.params.LoraParams`).
:func:`attach_lora` puts fresh adapters on a model, :class:`LoraTrainer` takes AdamW steps on them over token
blocks visited in a seeded random order (epoch after epoch), with transformers' linear schedule (warm-up from 0,
then a linear decay to 0 at the last step); :func:`train_lora` does both and merges. The base weights stay frozen;
the adapters are float32 (peft's default) so half-precision bases do not produce NaN losses.

Randomness: the adapters' initialisation and dropout draw from torch's global generator, the batch order from the
trainer's own generator (seeded by ``seed``). Callers run the attach and the steps inside
:func:`prunekit.rng.seeded` so that the caller's random state is left as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.errors import PrunekitError
from prunekit.models.types import CausalLM
from prunekit.rng import seeded
from prunekit.training.loss import lm_loss

log = logging.getLogger(__name__)

# (model, token batch (B, T)) -> scalar loss to minimise; default: the LM loss (training.loss.lm_loss).
LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LoraSettings:
    """One LoRA run. ``key``: the params section it comes from (named in errors); ``layers``: adapt only these
    decoder layers (None: all)."""

    rank: int
    alpha: float
    dropout: float
    target_modules: list[str]
    learning_rate: float
    batch_size: int
    steps: int
    warmup_steps: int
    weight_decay: float
    seed: int
    key: str = "recover.lora"
    layers: tuple[int, ...] | None = None

    @classmethod
    def from_params(cls, section: Any, seed: int, key: str, **overrides: Any) -> LoraSettings:
        """From a :class:`~prunekit.pipeline.params.LoraParams` section (``overrides`` replace its fields)."""
        fields = {
            "rank": section.rank,
            "alpha": section.alpha,
            "dropout": section.dropout,
            "target_modules": list(section.target_modules),
            "learning_rate": section.learning_rate,
            "batch_size": section.batch_size,
            "steps": section.steps,
            "warmup_steps": section.warmup_steps,
            "weight_decay": section.weight_decay,
        }
        return cls(**(fields | overrides), seed=seed, key=key)


def check_targets(model: CausalLM, targets: list[str], key: str) -> None:
    """Every LoRA target must name Linear(-like) modules of the model (error lists the ones it has)."""
    names = {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) or (hasattr(m, "in_features") and hasattr(m, "out_features"))
    }
    missing = [t for t in targets if t not in names]
    if missing:
        raise PrunekitError(f"{key} {missing} match no Linear module of the model; available: {sorted(names)}")


def attach_lora(model: CausalLM, cfg: LoraSettings, custom_modules: dict[type, type] | None = None) -> CausalLM:
    """Fresh adapters on ``cfg.target_modules`` (of ``cfg.layers``); the peft model, base frozen.

    ``custom_modules`` maps module types peft does not know (quantized layers) to the LoRA layer that wraps them.
    Draws the adapters' initialisation from torch's global generator (run it inside :func:`seeded`).
    """
    from peft import LoraConfig, get_peft_model

    check_targets(model, cfg.target_modules, f"{cfg.key}.target_modules")
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # peft annotates int; it scales by alpha / r in float
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        layers_to_transform=list(cfg.layers) if cfg.layers is not None else None,
        task_type="CAUSAL_LM",
        bias="none",
    )
    if custom_modules:
        config._register_custom_module(custom_modules)
    return get_peft_model(model, config)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based): transformers' linear schedule with warm-up."""
    warmup = min(warmup, total)
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


class LoraTrainer:
    """AdamW steps on the trainable parameters of ``peft_model`` over ``blocks`` (N, T), one batch per step.

    :meth:`backward` runs the forward and backward pass of the next batch; :meth:`update` takes the optimizer
    step at the scheduled learning rate. Callers that look at the gradients in between (the iterative schedule)
    call the two themselves; :meth:`run` does the whole run. :meth:`state` / :meth:`restore` hold everything a
    resumed run needs as tensors plus a JSON record (no pickle).
    """

    def __init__(
        self, peft_model: CausalLM, blocks: torch.Tensor, cfg: LoraSettings, loss: LossFn | None = None
    ) -> None:
        self.model, self.blocks, self.cfg = peft_model, blocks, cfg
        self.loss = loss or lm_loss
        self.params = [p for p in peft_model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.order, self.pos, self.step = torch.randperm(blocks.shape[0], generator=self.gen), 0, 0
        self.device = next(peft_model.parameters()).device

    def backward(self) -> float:
        """Loss of the next batch, its gradients accumulated on the adapters."""
        if self.pos + self.cfg.batch_size > self.order.numel():
            self.order, self.pos = torch.randperm(self.blocks.shape[0], generator=self.gen), 0
        batch = self.blocks[self.order[self.pos : self.pos + self.cfg.batch_size]].to(self.device)
        self.pos += self.cfg.batch_size
        loss = self.loss(self.model, batch)  # logits chunked: the LM head's memory of one chunk at a time
        if not torch.isfinite(loss):
            raise PrunekitError(
                f"LoRA loss became {loss.item()} at step {self.step}; lower {self.cfg.key}.learning_rate or "
                "use model.dtype float32/bfloat16"
            )
        loss.backward()
        return loss.item()

    def update(self) -> None:
        """The optimizer step at the scheduled learning rate; gradients cleared."""
        factor = lr_factor(self.step, self.cfg.steps, self.cfg.warmup_steps)
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.learning_rate * factor
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1

    def run(self, desc: str, between: Callable[[int, float], None] | None = None) -> list[float]:
        """The remaining steps (train mode, restored after); ``between(step, loss)`` runs before each update."""
        was_training, losses = self.model.training, []
        self.model.train()
        for step in tqdm(range(self.step, self.cfg.steps), desc=desc, unit="step"):
            loss = self.backward()
            if between is not None:
                between(step, loss)
            self.update()
            losses.append(loss)
        self.model.train(was_training)
        return losses

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON record): optimizer, batch order, both random generators, the step."""
        tensors = {"rng.torch": torch.get_rng_state(), "rng.data": self.gen.get_state(), "order": self.order}
        record: dict[str, Any] = {"step": self.step, "pos": self.pos, "optimizer": {}}
        opt = self.opt.state_dict()
        record["optimizer"] = {"param_groups": opt["param_groups"], "state": {}}
        for pid, entries in opt["state"].items():
            record["optimizer"]["state"][str(pid)] = {}
            for name, value in entries.items():
                if torch.is_tensor(value):
                    tensors[f"opt.{pid}.{name}"] = value.detach().clone().contiguous()
                    value = "tensor"
                record["optimizer"]["state"][str(pid)][name] = value
        return tensors, record

    def restore(self, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
        """Continue from :meth:`state`'s output (the same model, blocks and settings)."""
        layout = record["optimizer"]
        state = {
            int(pid): {k: tensors[f"opt.{pid}.{k}"] if v == "tensor" else v for k, v in entries.items()}
            for pid, entries in layout["state"].items()
        }
        self.opt.load_state_dict({"state": state, "param_groups": layout["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        self.gen.set_state(tensors["rng.data"])
        self.order, self.pos, self.step = tensors["order"], record["pos"], record["step"]


def train_lora(
    model: CausalLM,
    blocks: torch.Tensor,
    cfg: LoraSettings,
    merge: bool = True,
    custom_modules: dict[type, type] | None = None,
    desc: str = "LoRA",
    loss: LossFn | None = None,
) -> tuple[CausalLM, list[float]]:
    """Train fresh LoRA adapters on ``blocks`` (N, T) for ``cfg.steps`` steps; return (model, loss per step).

    With ``merge`` the adapters are merged into the weights and the plain model comes back; without it (a
    quantized base, QLoRA) the peft model comes back with its adapters. ``loss`` replaces the LM loss (distillation:
    :func:`recovery_loss`). The caller's random state is left as it was.
    """
    with seeded(cfg.seed):  # adapters' init and dropout
        peft_model = attach_lora(model, cfg, custom_modules)
        losses = LoraTrainer(peft_model, blocks, cfg, loss).run(desc)
    if not merge:
        peft_model.eval()
        return peft_model, losses
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, losses


def train_full(
    model: CausalLM, blocks: torch.Tensor, cfg: LoraSettings, desc: str = "fine-tuning", loss: LossFn | None = None
) -> tuple[nn.Module, list[float]]:
    """Full fine-tuning: every parameter of ``model`` trained, with the trainer, batches, schedule and loss of
    :func:`train_lora` (``cfg``'s adapter fields unused); the model (in eval mode) and the loss per step.

    Memory: the weights, their gradients and AdamW's two moments (four times the weights, in their dtype: train a
    float32 model; AdamW on bfloat16 weights loses small updates). The caller's random state is left as it was.
    """
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        with seeded(cfg.seed):  # dropout
            losses = LoraTrainer(model, blocks, cfg, loss).run(desc)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    model.eval()
    return model, losses


def recovery_loss(kind: str, teacher: CausalLM | None, temperature: float) -> LossFn:
    """``recover.loss``: lm (next-token NLL), kd (distillation from ``teacher``: temperature^2 * KL of the softened
    distributions) or lm_kd (their sum)."""
    from prunekit.training.loss import kd_loss

    if kind == "lm":
        return lm_loss
    if teacher is None:
        raise PrunekitError(f"recover.loss '{kind}' distils from the dense model: give the stage its teacher")
    if kind == "kd":
        return lambda model, batch: kd_loss(model, teacher, batch, temperature)
    if kind == "lm_kd":
        return lambda model, batch: lm_loss(model, batch) + kd_loss(model, teacher, batch, temperature)
    raise PrunekitError(f"recover.loss '{kind}': expected lm, kd or lm_kd")
