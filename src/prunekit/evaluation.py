"""Perplexity (LLM-Pruner protocol) and speed of a causal LM; :func:`evaluate_model` runs the whole evaluation."""

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


def speed_prompts(stream: torch.Tensor, batch_size: int, prompt_len: int) -> torch.Tensor:
    """``batch_size`` prompts: consecutive non-overlapping ``prompt_len``-token windows of the evaluation stream,
    repeated from the start when the text holds fewer (throughput does not depend on which tokens)."""
    from prunekit.tokens import chunks

    windows = chunks(stream, prompt_len, "evaluation (speed prompts)")
    reps = -(-batch_size // windows.shape[0])
    return windows.repeat(reps, 1)[:batch_size]


@torch.no_grad()
def speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, float]:
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


def evaluate_model(
    model: nn.Module,
    tokenizer: object,
    adapter: object,
    params: object,
    default_rows: list[str],
    default_name: str,
) -> dict[str, object]:
    """Perplexity protocols, zero-shot accuracy and efficiency of one loaded model (``params``: the whole
    params.yaml; ``default_rows``: the ``data.evaluation`` documents, named ``default_name``)."""
    from prunekit.efficiency import efficiency, peak_memory_mib, reset_peak_memory
    from prunekit.protocols import DEFAULT, PPL_DATASETS, PplText, perplexity_table, protocol_rows
    from prunekit.tokens import token_stream
    from prunekit.zeroshot import AUTO_MC, auto_mc_rows, zero_shot

    e = params.evaluate  # type: ignore[attr-defined]
    seconds: dict[str, float] = {}
    texts = []
    for name in e.perplexity:
        if name == DEFAULT:
            texts.append(PplText(default_name, "evaluation", default_rows))
        else:
            join = e.ptb_join if name == "ptb" else "\n\n"
            texts.append(PplText(name, PPL_DATASETS[name].split, protocol_rows(name, e.local_files), join))
    t0 = time.perf_counter()
    table = perplexity_table(model, tokenizer, texts, list(e.seq_lens), e.batch_size, e.max_chunks)
    seconds["perplexity"] = time.perf_counter() - t0
    out: dict[str, object] = {
        "ppl": {k: round(v["ppl"], 4) for k, v in table.items()},
        "ppl_tokens": {k: v["tokens"] for k, v in table.items()},
    }
    z = e.zero_shot
    if z.tasks:
        rows = None
        if AUTO_MC in z.tasks:
            rows = auto_mc_rows(
                default_rows,
                z.auto_mc_questions,
                z.auto_mc_choices,
                z.auto_mc_context_words,
                z.auto_mc_continuation_words,
                params.seed,  # type: ignore[attr-defined]
            )
        t0 = time.perf_counter()
        out["zero_shot"] = zero_shot(
            model,
            tokenizer,
            list(z.tasks),
            local_dir=z.local_dir,
            auto_rows=rows,
            batch_size=z.batch_size,
            limit=z.limit,
            seed=params.seed,  # type: ignore[attr-defined]
        )
        seconds["zero_shot"] = time.perf_counter() - t0
    device = next(model.parameters()).device
    eff: dict[str, object] = dict(efficiency(model, adapter, list(e.seq_lens)))  # type: ignore[arg-type]
    stream = token_stream(tokenizer, default_rows)
    eff["peak_memory"] = peak_memory_mib(device)[1]  # what the per-batch peaks measure
    t0 = time.perf_counter()
    for batch in e.speed.batch_sizes:
        reset_peak_memory(device)
        prompt = speed_prompts(stream, batch, e.speed.prompt_len)
        timing = speed(model, prompt, e.speed.new_tokens, e.speed.repeats)
        peak, _ = peak_memory_mib(device)
        eff[f"batch_{batch}"] = {k: round(v, 2) for k, v in timing.items()} | {"peak_memory_mib": round(peak, 1)}
    seconds["speed"] = time.perf_counter() - t0
    eff["device"] = str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)
    out["efficiency"] = eff
    out["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    return out
