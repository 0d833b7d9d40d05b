"""LoRAPrune's criterion ``lora``: importance from LoRA gradients, never from the frozen weights' gradients.

Source: Zhang et al., "LoRAPrune: Structured Pruning Meets Low-Rank Parameter-Efficient Fine-Tuning"
(Findings of ACL 2024), and its public code (``compute_sensitivity`` in ``loraprune/utils.py``).

One-shot form: fresh LoRA adapters (``score.lora``: rank r, alpha, dropout 0 by default) are attached to the
target modules of the requested layers; every base parameter has ``requires_grad=False`` for the whole scoring, so the
backward passes store gradients for the adapters only (r * (in + out) numbers per module instead of
in * out: that is the memory saving; it lowers the peak only where weight gradients outweigh the saved
activations, i.e. large models or small calibration batches). After ``score.lora.steps`` steps of the one LoRA
trainer (:mod:`prunekit.training.lora`: AdamW, linear decay, seeded batch order) on the calibration windows (each
one forward and backward pass of a batch, as costly as ``param_first``'s), the
gradients G_A, G_B of the mean LM loss over all calibration windows are accumulated and, per module,

    G_hat = s * (G_B @ A + B @ G_A - eta * G_B @ G_A)          (estimated gradient of the merged weight)
    I     = |G_hat * (W + s * B @ A)|                          (element importance)

summed over each unit's weight slices. The adapters are removed without merging: the model comes back
with the same modules, weights, ``requires_grad`` flags and ``.grad`` it had.

Derivation. With the merged weight W' = W + s * B @ A (s = alpha / r) and G = dL/dW', the chain rule
gives G_B = dL/dB = s * G @ A^T and G_A = dL/dA = s * B^T @ G. One SGD step of learning rate eta on
(A, B) changes the merged weight by
    dW' = s * [(B - eta*G_B) @ (A - eta*G_A) - B @ A] = -eta * s * (G_B @ A + B @ G_A - eta * G_B @ G_A),
so the gradient that would move W' the same way is G_hat = -dW'/eta, the formula above. Substituting,
    G_hat = s^2 * (G @ A^T @ A + B @ B^T @ G) - eta * s^3 * G @ A^T @ B^T @ G:
the true gradient projected on A's row space and B's column space (rank <= 2r), plus a term of second
order in G. LoRAPrune writes ``G_B @ A + B @ G_A - G_B @ G_A``, i.e. eta = 1 and without the factor s
(every module shares s, so it changes no ranking); we keep the derivation's eta = ``score.lora.learning_rate``,
which makes the second-order term as small as the paper says it is. At initialisation B = 0, so G_A = 0 and G_hat is
s^2 * G @ A^T @ A alone: hence the default of a few training steps (``score.lora.steps``).

Choices (the public record does not settle them for a one-shot score):
* no per-module normalisation and no moving average: LoRAPrune's code L2-normalises each module's
  vector and smooths 0.9 / 0.1 over its pruning iterations; a single scoring has no iterations.
* adapters only on the requested layers (LoRAPrune adapts every layer because it fine-tunes as it prunes).
* every weight member of a requested unit must belong to a LoRA target module, else
  :class:`~prunekit.errors.PrunekitError` names the missing ones. Bias members (Qwen2's q/k/v biases)
  contribute 0: LoRA has no bias factor, and LoRAPrune's code scores weight matrices only.
* the adapters (and G_hat) are float32 whatever the base dtype (peft's default).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM, Submodule
from prunekit.pruning.criteria.base import CRITERIA, Criterion, ScoreRequest, Scores
from prunekit.pruning.criteria.taylor import accumulate_lm_gradients, gradient_scope
from prunekit.pruning.units import UNITS
from prunekit.rng import seeded
from prunekit.training.lora import LoraSettings, LoraTrainer, attach_lora
from prunekit.training.loss import layer_checkpointing

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's adapter name


def lora_gradient_estimate(
    a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor, scaling: float, lr: float
) -> torch.Tensor:
    """G_hat = s * (G_B @ A + B @ G_A - eta * G_B @ G_A): the merged weight's gradient from LoRA's (see module doc)."""
    return scaling * (grad_b @ a + b @ grad_a - lr * (grad_b @ grad_a))


def missing_targets(adapter: ModelAdapter, layer: Submodule, units: list[str], targets: list[str]) -> list[str]:
    """Weight members of ``units`` in ``layer`` whose module is not a LoRA target (paths, sorted)."""
    missing = set()
    for unit in units:
        for m in UNITS.get(unit).members(adapter, layer):
            module_path, _, attr = m.path.rpartition(".")
            if attr == "weight" and module_path.rsplit(".", 1)[-1] not in targets:
                missing.add(module_path)
    return sorted(missing)


@contextmanager
def attached_lora(model: CausalLM, lc: LoraSettings) -> Iterator[nn.Module]:
    """Fresh LoRA adapters on ``lc.target_modules`` of ``lc.layers`` (the one trainer's :func:`attach_lora`).

    On exit the adapters are unloaded without merging and every ``requires_grad`` flag is restored
    (peft freezes the base model when it attaches adapters).
    """
    from prunekit.quant.backend import lora_custom_modules

    flags = [(p, p.requires_grad) for p in model.parameters()]
    peft_model = attach_lora(model, lc, lora_custom_modules())
    try:
        yield peft_model
    finally:
        peft_model.unload()
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass(frozen=True)
class LoraFactors:
    """One target module's adapter after training: A (r x in), B (out x r), their gradients, and s."""

    a: torch.Tensor
    b: torch.Tensor
    grad_a: torch.Tensor
    grad_b: torch.Tensor
    scaling: float


def collect_factors(model: CausalLM) -> dict[nn.Module, LoraFactors]:
    """The adapters of every peft LoRA layer in ``model``, keyed by the base module they adapt (a Linear or a
    quantized module of a frozen quantized base).

    The factors are small (r * (in + out) each): keeping them lets the adapters go before the
    weight-sized importances are built, one layer at a time.
    """
    out: dict[nn.Module, LoraFactors] = {}
    for module in model.modules():
        if ADAPTER in getattr(module, "lora_A", {}):
            a, b = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
            out[module.get_base_layer()] = LoraFactors(a.detach(), b.detach(), a.grad, b.grad, module.scaling[ADAPTER])
    return out


def frozen_weight(module: Submodule) -> torch.Tensor:
    """The (out x in) weight a base module computes with: a Linear's own, a quantized module's dequantized."""
    from prunekit.quant.backend import backend_of, is_quantized

    return backend_of(module).dequantize(module) if is_quantized(module) else module.weight.detach()


def element_importance(w: torch.Tensor, f: LoraFactors, lr: float) -> torch.Tensor:
    """|G_hat * (W + s * B @ A)| for one adapted weight, float32, shaped like W."""
    g_hat = lora_gradient_estimate(f.a, f.b, f.grad_a, f.grad_b, f.scaling, lr)
    return (g_hat * (w.detach().float() + f.scaling * (f.b @ f.a))).abs()


class LoraCriterion(Criterion):
    """LoRAPrune: sum over the unit's weights of |G_hat * (W + s*B@A)|, G_hat from LoRA gradients only."""

    name = "lora"
    quantized_base = True

    def score(self, model: CausalLM, adapter: ModelAdapter, req: ScoreRequest) -> Scores:
        cfg = req.options
        lc = LoraSettings.from_params(cfg.lora, req.seed, "score.lora", layers=tuple(req.layers))
        layers = adapter.layers(model)
        targets = lc.target_modules
        missing = sorted({p for idx in req.layers for p in missing_targets(adapter, layers[idx], req.units, targets)})
        if missing:
            raise PrunekitError(
                f"score.criterion 'lora' needs LoRA on every pruned module; score.lora.target_modules "
                f"{targets} miss {missing}"
            )
        was_training = model.training
        try:
            # The adapters' init (and dropout, if any) seeded; the caller's random state is left as it was.
            with seeded(req.seed), attached_lora(model, lc) as peft_model:
                lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
                # Exactly the adapters train: the base weights are frozen throughout (no gradient memory).
                with gradient_scope(model, lora_params):
                    with layer_checkpointing(peft_model, cfg.gradient_checkpointing):
                        LoraTrainer(peft_model, req.calibration, lc).run("LoRA steps")
                    model.eval()  # no dropout in the gradient pass: dL/dB = s * G @ A^T exactly
                    for p in lora_params:
                        p.grad = None
                    accumulate_lm_gradients(peft_model, req.calibration, req.batch_size, desc="LoRA gradients",
                                            checkpointing=cfg.gradient_checkpointing)  # fmt: skip
                    factors = collect_factors(model)
        finally:
            model.train(was_training)

        # On the restored model, one layer at a time (the member paths are the base modules' again).
        with torch.no_grad():
            return {
                f"{unit}.{idx}": unit_importance(adapter, layers[idx], unit, factors, lc.learning_rate)
                for unit in req.units
                for idx in UNITS.get(unit).score_layers(req.layers)
            }


def unit_importance(
    adapter: ModelAdapter, layer: Submodule, unit: str, factors: dict[nn.Module, LoraFactors], lr: float
) -> torch.Tensor:
    """The scores of ``unit``'s units in ``layer``: each member read through its module (a quantized base module
    has no float weight parameter, only its codes)."""
    ut = UNITS.get(unit)
    values = {}
    for m in ut.members(adapter, layer):
        module_path, _, attr = m.path.rpartition(".")
        module = layer.get_submodule(module_path)
        if attr == "bias":  # LoRA has no bias factor (see module doc)
            values[m.path] = torch.zeros(module.out_features, dtype=torch.float32)
        elif module in factors:
            values[m.path] = element_importance(frozen_weight(module), factors[module], lr)
        else:  # missing_targets let it by
            raise RuntimeError(f"lora: the weight of {module_path} got no adapter")
    return ut.reduce(adapter, layer, values)


CRITERIA.register(LoraCriterion.name)(LoraCriterion())
