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
        logits = model(input_ids=batch).logits[:, :-1].float()  # (B, T-1, V)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    mean = total / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count}
