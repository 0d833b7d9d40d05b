"""LLM-Pruner's Taylor criteria: importance from the gradient of the language-modelling loss.

Source: Ma et al., "LLM-Pruner: On the Structural Pruning of Large Language Models" (NeurIPS 2023),
and its public code (``TaylorImportance`` in ``LLMPruner/pruner/hf_llama_pruner.py``). Setting a weight
element w to zero changes the loss by ``dL ~= -g*w + 1/2 * w*H*w`` (Taylor, to second order), with g the
gradient of the LM loss on the calibration data and H approximated by the diagonal Fisher
``F = mean over calibration samples s of g_s^2`` (g_s: gradient of sample s's own loss). Per unit:

* ``param_first``  = sum over the unit's weights of |w*g|                (the paper's default, "Element^1")
* ``vectorize``    = |sum over the unit's weights of w*g|                (first order for the unit as a whole)
* ``param_second`` = sum over the unit's weights of w*F*w
* ``param_mix``    = sum over the unit's weights of |w*g - 1/2 * w*F*w|  ("Element^2": first + second order)

``param_mix`` follows the paper's equation and its code (``salience - 0.5 * w * acc_grad * w``, then abs):
the two orders are combined per element before the absolute value, not added as two scores.

g is the gradient of the mean token NLL over all calibration windows; F needs one backward pass per
window (the per-sample, "empirical" Fisher, as LLM-Pruner's ``acc_grad`` loop), so ``param_second`` and
``param_mix`` cost N backward passes of batch 1 instead of N / batch_size, and one extra weight-sized
buffer (two for ``param_mix``) for the scored weights. g for ``param_mix`` is the mean of the same
per-sample gradients (equal to the batched gradient: the windows have equal length), so it costs no
extra pass.

Only the scored weights (the members of the requested units in the requested layers) get gradients:
embeddings, norms and the LM head are never differentiated, which saves their gradient memory and
changes no score.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM
from prunekit.pruning.criteria.base import CRITERIA, Criterion, ScoreRequest, Scores, reduce_elementwise
from prunekit.pruning.units import UNITS
from prunekit.training.loss import layer_checkpointing, lm_loss

log = logging.getLogger(__name__)

GradMap = dict[torch.Tensor, torch.Tensor]  # parameter (by identity) -> a tensor of its shape


def accumulate_lm_gradients(
    model: CausalLM,
    calibration: torch.Tensor,
    batch_size: int,
    after_batch: Callable[[], None] | None = None,
    desc: str = "gradients",
    checkpointing: bool = False,
) -> None:
    """Add to ``.grad`` of every parameter that requires grad the gradient of the mean token NLL over
    all calibration windows: ``sum over batches b of (|b| / N) * dL_b/dw`` (``.grad`` is not zeroed first).

    ``after_batch`` runs after each batch's backward pass (per-sample statistics read ``.grad`` there).
    The loss is :func:`~prunekit.training.loss.lm_loss` (logits chunked); ``checkpointing`` also checkpoints
    every decoder layer (``score.gradient_checkpointing``).
    """
    device = next(model.parameters()).device
    n = calibration.shape[0]
    was_training = model.training
    model.eval()  # no dropout: the gradient of the deterministic loss
    try:
        with layer_checkpointing(model, checkpointing):
            for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch"):
                batch = calibration[start : start + batch_size].to(device)
                # Weight each batch by its share of windows so the sum equals the mean over all windows.
                (lm_loss(model, batch) * batch.shape[0] / n).backward()
                if after_batch is not None:
                    after_batch()
    finally:
        model.train(was_training)


def member_parameters(model: CausalLM, adapter: ModelAdapter, req: ScoreRequest) -> list[nn.Parameter]:
    """The parameters the requested units own in the requested layers (each once, in model order)."""
    layers = adapter.layers(model)
    wanted = {
        id(layers[idx].get_parameter(m.path))
        for unit in req.units
        for idx in UNITS.get(unit).score_layers(req.layers)
        for m in UNITS.get(unit).members(adapter, layers[idx])
    }
    return [p for p in model.parameters() if id(p) in wanted]


@contextmanager
def gradient_scope(model: CausalLM, trainable: Iterable[nn.Parameter]) -> Iterator[None]:
    """Inside: exactly ``trainable`` requires grad, starting from ``.grad = None``. On exit every
    parameter gets back its ``requires_grad`` flag and its previous ``.grad`` (criteria leave no trace).

    Parameters outside ``trainable`` are frozen, so the backward pass neither computes nor stores
    gradients for them (and their ``.grad`` is never touched).
    """
    train_ids = {id(p) for p in trainable}
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        for p, _, _ in saved:
            p.requires_grad_(id(p) in train_ids)
            if id(p) in train_ids:
                p.grad = None
        yield
    finally:
        for p, flag, grad in saved:
            p.grad = grad
            p.requires_grad_(flag)


def mean_gradients(model: CausalLM, params: list[nn.Parameter], req: ScoreRequest) -> GradMap:
    """g = dL/dw of the mean NLL over all calibration windows, batched by ``req.batch_size``."""
    accumulate_lm_gradients(model, req.calibration, req.batch_size, checkpointing=req.options.gradient_checkpointing)
    return {p: p.grad for p in params if p.grad is not None}


def per_sample_statistics(
    model: CausalLM, params: list[nn.Parameter], req: ScoreRequest, with_mean: bool
) -> tuple[GradMap | None, GradMap]:
    """(g, F): the mean gradient (only if ``with_mean``) and the diagonal empirical Fisher
    ``F = 1/N * sum_s g_s^2`` from one backward pass per calibration window (LLM-Pruner's ``acc_grad``).

    The shared loop weights window s's loss by 1/N, so ``.grad`` holds ``g_s / N`` after each pass:
    ``g = sum_s (g_s / N)`` and ``F = N * sum_s (g_s / N)^2``. Accumulators are float32.
    """
    n = req.calibration.shape[0]
    fisher: GradMap = {p: torch.zeros_like(p, dtype=torch.float32) for p in params}
    mean: GradMap | None = {p: torch.zeros_like(p, dtype=torch.float32) for p in params} if with_mean else None

    def collect() -> None:
        for p in params:
            if p.grad is None:
                continue
            g = p.grad.float()
            fisher[p].addcmul_(g, g)
            if mean is not None:
                mean[p].add_(g)
            p.grad = None  # the next window's gradient must not add to this one

    accumulate_lm_gradients(
        model,
        req.calibration,
        1,
        after_batch=collect,
        desc="per-sample gradients",
        checkpointing=req.options.gradient_checkpointing,
    )
    for f in fisher.values():
        f.mul_(n)
    return mean, fisher


class TaylorCriterion(Criterion):
    """Shared gradient pass; subclasses give the per-element quantity and how a unit's sum is finished."""

    base_gradients = True
    needs_mean = True
    needs_fisher = False

    def elementwise(self, w: torch.Tensor, g: torch.Tensor | None, f: torch.Tensor | None) -> torch.Tensor:
        """Per-element importance (before the per-unit sum) from weight w, gradient g and Fisher f."""
        raise NotImplementedError

    def finish(self, unit_sum: torch.Tensor) -> torch.Tensor:
        """Turn a unit's summed elementwise quantity into its score (identity by default)."""
        return unit_sum

    def score(self, model: CausalLM, adapter: ModelAdapter, req: ScoreRequest) -> Scores:
        params = member_parameters(model, adapter, req)
        with gradient_scope(model, params):
            if self.needs_fisher:
                grads, fisher = per_sample_statistics(model, params, req, with_mean=self.needs_mean)
            else:
                grads, fisher = mean_gradients(model, params, req), None
        with torch.no_grad():
            scores = reduce_elementwise(
                model,
                adapter,
                req,
                lambda p: self.elementwise(
                    p.detach().float(),
                    grads[p].float() if grads is not None else None,
                    fisher[p] if fisher is not None else None,
                ),
            )
        return {k: self.finish(v) for k, v in scores.items()}


class ParamFirst(TaylorCriterion):
    """sum over the unit's weights of |w * dL/dw| (LLM-Pruner ``param_first``)."""

    name = "param_first"

    def elementwise(self, w: torch.Tensor, g: torch.Tensor | None, f: torch.Tensor | None) -> torch.Tensor:
        assert g is not None  # needs_mean
        return (w * g).abs()


class Vectorize(TaylorCriterion):
    """|sum over the unit's weights of w * dL/dw| (LLM-Pruner ``vectorize``, the paper's vector-wise score).

    The first-order loss change of removing the whole unit at once; signed terms may cancel. Summed in
    float64 because of that cancellation. (LLM-Pruner's code applies the abs per row/column of each
    member before summing them; we follow the paper's equation: one abs per unit.)
    """

    name = "vectorize"

    def elementwise(self, w: torch.Tensor, g: torch.Tensor | None, f: torch.Tensor | None) -> torch.Tensor:
        assert g is not None  # needs_mean
        return w.double() * g.double()

    def finish(self, unit_sum: torch.Tensor) -> torch.Tensor:
        return unit_sum.abs()


class ParamSecond(TaylorCriterion):
    """sum over the unit's weights of w * F * w, F the per-sample diagonal Fisher (LLM-Pruner ``param_second``)."""

    name = "param_second"
    needs_mean = False
    needs_fisher = True

    def elementwise(self, w: torch.Tensor, g: torch.Tensor | None, f: torch.Tensor | None) -> torch.Tensor:
        assert f is not None  # needs_fisher
        return w * f * w


class ParamMix(TaylorCriterion):
    """sum over the unit's weights of |w*g - 1/2 * w*F*w| (LLM-Pruner ``param_mix``: first + second order)."""

    name = "param_mix"
    needs_fisher = True

    def elementwise(self, w: torch.Tensor, g: torch.Tensor | None, f: torch.Tensor | None) -> torch.Tensor:
        assert g is not None and f is not None  # needs_mean, needs_fisher
        return (w * g - 0.5 * w * f * w).abs()


for _c in (ParamFirst(), Vectorize(), ParamSecond(), ParamMix()):
    CRITERIA.register(_c.name)(_c)
