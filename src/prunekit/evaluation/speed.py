"""Prefill and decode throughput of a causal LM on its KV cache."""

from __future__ import annotations

import statistics
import time

import torch

from prunekit.models.types import CausalLM


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed_prompts(stream: torch.Tensor, batch_size: int, prompt_len: int) -> torch.Tensor:
    """``batch_size`` prompts: consecutive non-overlapping ``prompt_len``-token windows of the evaluation stream,
    repeated from the start when the text holds fewer (throughput does not depend on which tokens)."""
    from prunekit.data.tokens import chunks

    windows = chunks(stream, prompt_len, "evaluation (speed prompts)")
    reps = -(-batch_size // windows.shape[0])
    return windows.repeat(reps, 1)[:batch_size]


@torch.no_grad()
def speed(model: CausalLM, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, float]:
    """Prefill and decode tokens/s at batch ``prompt.shape[0]``: median over ``repeats`` after one warm-up.

    Prefill = one forward over the prompt; decode = ``new_tokens`` greedy single-token steps on the KV cache.
    """
    from prunekit.models.compat import cache_of, with_cache

    device = next(model.parameters()).device
    prompt = prompt.to(device)
    prefill_times, decode_times = [], []
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        _sync(device)
        t1 = time.perf_counter()
        cache, token = cache_of(out), out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **with_cache(cache))
            cache, token = cache_of(out), out.logits[:, -1:].argmax(-1)
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
