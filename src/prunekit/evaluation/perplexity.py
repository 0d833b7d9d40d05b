"""Perplexity of a causal LM under LLM-Pruner's protocol (non-overlapping chunks, no carried context), of a model
in memory or held one decoder layer at a time (:class:`prunekit.models.layerwise.LayerwiseModel`)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prunekit.data.tokens import chunks, token_stream
from prunekit.evaluation.datasets import PplText, metric_name
from prunekit.models.layerwise import LayerwiseModel
from prunekit.models.types import CausalLM


@torch.no_grad()
def perplexity(model: CausalLM, chunked: torch.Tensor, batch_size: int) -> dict[str, float]:
    """exp(mean token NLL) over non-overlapping chunks, each predicted from its own start (no context
    carried across chunks), as LLM-Pruner's ``PPLMetric`` does. Returns ppl, nll and token count."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, chunked.shape[0], batch_size), desc="perplexity", unit="batch"):
        batch = chunked[start : start + batch_size].to(device)
        nll, n = next_token_nll(model(input_ids=batch).logits, batch)
        total, count = total + nll, count + n
    return ppl_of(total, count)


def next_token_nll(logits: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
    """(sum of the NLL of every next token of ``batch`` (B, T) under ``logits`` (B, T, V), how many tokens)."""
    logits = logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
    return float(nll), batch[:, 1:].numel()


def ppl_of(total: float, count: int) -> dict[str, float]:
    """{ppl, nll (mean), tokens} from a summed NLL over ``count`` tokens."""
    mean = total / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count}


@torch.no_grad()
def perplexity_layerwise(
    lw: LayerwiseModel, chunked: torch.Tensor, batch_size: int, activations_mib: int = 2048
) -> dict[str, float]:
    """:func:`prunekit.evaluation.perplexity.perplexity` of the model with one decoder layer in memory at a time."""
    hidden = lw.run(chunked, batch_size, activations_mib=activations_mib)
    total, count = 0.0, 0
    try:
        with lw.head() as (norm, head):
            for b, start in enumerate(range(0, chunked.shape[0], batch_size)):
                batch = chunked[start : start + batch_size].to(lw.device)
                nll, n = next_token_nll(head(norm(hidden.get(b))), batch)
                total, count = total + nll, count + n
    finally:
        hidden.close()
    return ppl_of(total, count)


def perplexity_table(
    model: Any,
    tokenizer: Any,
    texts: list[PplText],
    seq_lens: list[int],
    batch_size: int,
    max_chunks: int | None = None,
    activations_mib: int = 2048,
) -> dict[str, dict[str, float]]:
    """``{metric name: {ppl, nll, tokens}}`` for every text at every length (each text tokenized once).

    ``model``: a model in memory, or a :class:`prunekit.models.layerwise.LayerwiseModel` (one layer at a time,
    hidden states in memory up to ``activations_mib``)."""
    out = {}
    for text in texts:
        stream = token_stream(tokenizer, text.rows, join=text.join)
        for seq_len in seq_lens:
            chunked = chunks(stream, seq_len, f"perplexity dataset '{text.name}'")
            if max_chunks:
                chunked = chunked[:max_chunks]
            if isinstance(model, LayerwiseModel):
                result = perplexity_layerwise(model, chunked, batch_size, activations_mib)
            else:
                result = perplexity(model, chunked, batch_size)
            out[metric_name(text.name, text.split, seq_len, text.join)] = result
    return out
