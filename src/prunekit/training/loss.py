"""The language-modelling loss for backward passes, with less memory than ``model(labels=...)``.

``model(input_ids=x, labels=x).loss`` materialises the logits of every token (tokens x vocabulary, in
float32 for the loss) and keeps them, their log-softmax and then their gradient alive for the backward
pass: 3 x 126 MiB for 10 x 64 tokens of a 49k vocabulary, more than the scored weights of a small model.
:func:`lm_loss` computes the same mean next-token NLL with the LM head and the cross-entropy applied to
as many tokens at a time as keep a chunk's logits within :data:`LOSS_CHUNK_ELEMENTS` numbers (8 MiB in
float32; 42 tokens of a 49k vocabulary, 16 of a 128k one), under activation checkpointing, so one chunk's
logits exist at a time and are recomputed (one extra LM-head product) in the backward pass.

:func:`layer_checkpointing` also checkpoints every decoder layer: only each layer's input is kept from
the forward pass, and the layer runs again in the backward pass (about a third more compute).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from prunekit.errors import PrunekitError
from prunekit.models.types import CausalLM

LOSS_CHUNK_ELEMENTS = 2**21


def causal_lm(model: CausalLM) -> CausalLM:
    """The transformers ``*ForCausalLM`` inside ``model`` (itself, or the model a peft wrapper adapts)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _chunk_nll_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")


def lm_loss(model: CausalLM, input_ids: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean NLL of every next token of every window of ``input_ids`` (B, T): the value and gradient of
    transformers' ``model(input_ids=x, labels=x).loss`` for unpadded windows, the logits computed
    ``chunk_tokens`` tokens at a time (default: from :data:`LOSS_CHUNK_ELEMENTS` and the vocabulary)."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise PrunekitError(f"lm_loss needs (batch, tokens >= 2) token ids, got shape {tuple(input_ids.shape)}")
    lm = causal_lm(model)
    hidden = lm.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = input_ids[:, 1:].reshape(-1)
    head = lm.get_output_embeddings()
    if chunk_tokens is None:
        chunk_tokens = max(1, LOSS_CHUNK_ELEMENTS // head.out_features)  # vocabulary (quantized heads too)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, labels.numel(), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(partial(_chunk_nll_sum, head), hidden[part], labels[part], use_reentrant=False)
    return total / labels.numel()


def _chunk_kd_sum(
    head: nn.Module, hidden: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    student = F.log_softmax(head(hidden).float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum")


def kd_loss(
    model: CausalLM,
    teacher: CausalLM,
    input_ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Distillation: ``temperature^2 * mean_t KL(p_teacher(. | t) || p_model(. | t))`` over every position that
    predicts a next token of ``input_ids`` (B, T), both distributions softened by ``temperature``.

    The teacher runs without gradients; its logits, like the model's, exist one chunk of tokens at a time.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise PrunekitError(f"kd_loss needs (batch, tokens >= 2) token ids, got shape {tuple(input_ids.shape)}")
    t_head = causal_lm(teacher).get_output_embeddings()
    return kd_loss_from(model, teacher_states(teacher, input_ids), t_head, input_ids, temperature, chunk_tokens)


@torch.no_grad()
def teacher_states(teacher: CausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """The teacher's last hidden states at every position that predicts a next token, (B * (T - 1), hidden):
    all of the teacher that :func:`kd_loss_from` needs besides its output head (a caller scoring many students
    against one teacher computes them once)."""
    tm = causal_lm(teacher)
    t_hidden = tm.get_decoder()(input_ids=input_ids.to(tm.device), use_cache=False).last_hidden_state
    return t_hidden[:, :-1].reshape(-1, t_hidden.shape[-1])


def kd_loss_from(
    model: CausalLM,
    t_hidden: torch.Tensor,
    t_head: nn.Module,
    input_ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """:func:`kd_loss` with the teacher given as its :func:`teacher_states` and output head."""
    lm = causal_lm(model)
    hidden = lm.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    head = lm.get_output_embeddings()
    if chunk_tokens is None:
        chunk_tokens = max(1, LOSS_CHUNK_ELEMENTS // head.out_features)  # vocabulary (quantized heads too)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        with torch.no_grad():
            t_logits = t_head(t_hidden[part]).to(hidden.device)
        chunk = partial(_chunk_kd_sum, head, temperature=temperature)
        total = total + checkpoint(chunk, hidden[part], t_logits, use_reentrant=False)
    return total * temperature**2 / hidden.shape[0]


@contextmanager
def layer_checkpointing(model: CausalLM, enabled: bool = True) -> Iterator[None]:
    """Inside: every decoder layer of ``model`` runs under activation checkpointing (non-reentrant, so
    frozen inputs still pass gradients). Dropout stays as the modules' own train/eval flags set it:
    only the layer objects themselves are flagged as training, which transformers requires to checkpoint.
    """
    if not enabled:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise PrunekitError(
            f"gradient checkpointing: {type(causal_lm(model)).__name__} has no checkpointable decoder layers; "
            "set score.gradient_checkpointing: false"
        )
    saved = [(m, m.gradient_checkpointing, m.training, m.__dict__.get("_gradient_checkpointing_func")) for m in layers]
    try:
        for m in layers:
            m.gradient_checkpointing = True
            m.__dict__["_gradient_checkpointing_func"] = partial(checkpoint, use_reentrant=False)
            m.training = True  # this object only: its attention and MLP keep their own flags
        yield
    finally:
        for m, flag, training, func in saved:
            m.gradient_checkpointing = flag
            m.training = training
            if func is None:
                m.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                m._gradient_checkpointing_func = func
