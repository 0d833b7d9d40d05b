"""Perplexity (LLM-Pruner protocol) and speed of a causal LM."""

from __future__ import annotations

import math
import statistics
import time

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, float]:
    """Prefill and decode tokens/s at batch ``prompt.shape[0]``: median over ``repeats`` after one warm-up.

    Prefill = one forward over the prompt; decode = ``new_tokens`` greedy single-token steps on the KV cache.
    """
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    prefill_times, decode_times = [], []
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        _sync(device)
        t1 = time.perf_counter()
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        t2 = time.perf_counter()
        if i:  # the first round warms up kernels and allocators
            prefill_times.append(t1 - t0)
            decode_times.append(t2 - t1)
    b, t = prompt.shape
    return {
        "prefill_tokens_per_s": b * t / statistics.median(prefill_times),
        "decode_tokens_per_s": b * new_tokens / statistics.median(decode_times),
    }
