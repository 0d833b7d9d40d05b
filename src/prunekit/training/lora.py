"""LoRA recovery: fine-tune low-rank adapters on the pruned model, then merge them into its weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from prunekit.errors import PrunekitError
from prunekit.rng import seeded
from prunekit.training.loss import lm_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSettings:
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

    @classmethod
    def from_params(
        cls, section: Any, steps: int, seed: int, warmup_steps: int = 0, weight_decay: float = 0.0
    ) -> LoraSettings:
        """From a params section with the LoRA fields (``recover``, ``schedule``: LoraTrainParams)."""
        return cls(
            rank=section.rank,
            alpha=section.alpha,
            dropout=section.dropout,
            target_modules=list(section.target_modules),
            learning_rate=section.learning_rate,
            batch_size=section.batch_size,
            steps=steps,
            warmup_steps=warmup_steps,
            weight_decay=weight_decay,
            seed=seed,
        )


def check_targets(model: nn.Module, targets: list[str], key: str = "recover.target_modules") -> None:
    """Every LoRA target must name Linear(-like) modules of the model (error lists the ones it has)."""
    names = {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) or (hasattr(m, "in_features") and hasattr(m, "out_features"))
    }
    missing = [t for t in targets if t not in names]
    if missing:
        raise PrunekitError(f"{key} {missing} match no Linear module of the model; available: {sorted(names)}")


def train_lora(
    model: nn.Module,
    blocks: torch.Tensor,
    cfg: LoraSettings,
    merge: bool = True,
    custom_modules: dict[type, type] | None = None,
    key: str = "recover.target_modules",
) -> tuple[nn.Module, list[float]]:
    """Train LoRA on ``blocks`` (N, T) for ``cfg.steps`` steps; return (model, loss per step).

    With ``merge`` the adapters are merged into the weights and the plain model comes back; without it
    (a quantized base, QLoRA) the peft model comes back with its adapters. ``custom_modules`` maps
    module types peft does not know to the LoRA layer that wraps them.

    Blocks are visited in a seeded random order, epoch after epoch. The base weights stay frozen; the
    adapters are kept in float32 (peft's default) so half-precision bases do not produce NaN losses.
    """
    check_targets(model, cfg.target_modules, key)
    with seeded(cfg.seed):  # LoRA A's init and dropout; the caller's random state is left as it was
        return _train(model, blocks, cfg, merge, custom_modules)


def _train(
    model: nn.Module, blocks: torch.Tensor, cfg: LoraSettings, merge: bool, custom_modules: dict[type, type] | None
) -> tuple[nn.Module, list[float]]:
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )
    if custom_modules:
        lora._register_custom_module(custom_modules)
    peft_model = get_peft_model(model, lora)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, min(cfg.warmup_steps, cfg.steps), cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device
    order = torch.randperm(blocks.shape[0], generator=gen)
    pos, losses = 0, []
    peft_model.train()
    for _ in tqdm(range(cfg.steps), desc="LoRA recovery", unit="step"):
        if pos + cfg.batch_size > order.numel():
            order, pos = torch.randperm(blocks.shape[0], generator=gen), 0
        batch = blocks[order[pos : pos + cfg.batch_size]].to(device)
        pos += cfg.batch_size
        loss = lm_loss(peft_model, batch)  # logits chunked: the LM head's memory of one chunk at a time
        if not torch.isfinite(loss):
            raise PrunekitError(
                f"LoRA loss became {loss.item()} at step {len(losses)}; lower recover.learning_rate or "
                "use model.dtype float32/bfloat16"
            )
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if not merge:
        peft_model.eval()
        return peft_model, losses
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, losses
