"""Perplexity of a causal LM under LLM-Pruner's protocol (non-overlapping chunks, no carried context)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: nn.Module, chunked: torch.Tensor, batch_size: int) -> dict[str, float]:
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
