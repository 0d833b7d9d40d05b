"""One model's whole evaluation: perplexity protocols, zero-shot accuracy, size, cost and speed."""

from __future__ import annotations

import time
from typing import Any

import torch

from prunekit.models.types import CausalLM
from prunekit.pipeline.params import EvaluateParams


def evaluate_model(
    model: CausalLM,
    tokenizer: object,
    adapter: object,
    settings: EvaluateParams,
    seed: int,
    default_rows: list[str],
    default_name: str,
) -> dict[str, object]:
    """Perplexity protocols, zero-shot accuracy and efficiency of one loaded model.

    ``settings``: what to measure (the ``evaluate`` section); ``seed``: the auto_mc questions and lm-eval's
    sampling; ``default_rows``: the ``data.evaluation`` documents, named ``default_name`` in the metrics.
    """
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    table = _perplexities(model, tokenizer, settings, default_rows, default_name)
    seconds["perplexity"] = time.perf_counter() - t0
    out: dict[str, object] = {
        "ppl": {k: round(v["ppl"], 4) for k, v in table.items()},
        "ppl_tokens": {k: v["tokens"] for k, v in table.items()},
    }
    if settings.zero_shot.tasks:
        t0 = time.perf_counter()
        out["zero_shot"] = _zero_shot(model, tokenizer, settings, seed, default_rows)
        seconds["zero_shot"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["efficiency"] = _efficiency(model, tokenizer, adapter, settings, default_rows)
    seconds["speed"] = time.perf_counter() - t0
    out["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    return out


def evaluate_layerwise(
    model_dir: object,
    dtype: str,
    device: str,
    activations_mib: int,
    settings: EvaluateParams,
    default_rows: list[str],
    default_name: str,
) -> dict[str, object]:
    """Size and the perplexity protocols of the model in ``model_dir`` with one decoder layer in memory at a time
    (:class:`prunekit.models.layerwise.LayerwiseModel`); zero-shot accuracy and speed need the whole model."""
    from prunekit.models.layerwise import LayerwiseModel
    from prunekit.models.loading import load_tokenizer
    from prunekit.models.size import count_params, weight_bytes

    lw = LayerwiseModel(model_dir, dtype, device)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    table = _perplexities(lw, load_tokenizer(model_dir), settings, default_rows, default_name, activations_mib)  # type: ignore[arg-type]
    return {
        "params": count_params(lw.model),
        "weight_bytes": weight_bytes(lw.model),
        "offload": "layerwise",
        "ppl": {k: round(v["ppl"], 4) for k, v in table.items()},
        "ppl_tokens": {k: v["tokens"] for k, v in table.items()},
        "seconds": {"perplexity": round(time.perf_counter() - t0, 1)},
    }  # fmt: skip


def _perplexities(
    model: object,
    tokenizer: object,
    e: EvaluateParams,
    default_rows: list[str],
    default_name: str,
    activations_mib: int = 2048,
) -> dict[str, dict[str, float]]:
    from prunekit.evaluation.datasets import DEFAULT, PPL_DATASETS, PplText, protocol_rows
    from prunekit.evaluation.perplexity import perplexity_table

    texts = []
    for name in e.perplexity:
        if name == DEFAULT:
            texts.append(PplText(default_name, "evaluation", default_rows))
        else:
            join = e.ptb_join if name == "ptb" else "\n\n"
            texts.append(PplText(name, PPL_DATASETS[name].split, protocol_rows(name, e.local_files), join))
    return perplexity_table(model, tokenizer, texts, list(e.seq_lens), e.batch_size, e.max_chunks, activations_mib)


def _zero_shot(
    model: CausalLM, tokenizer: object, e: EvaluateParams, seed: int, default_rows: list[str]
) -> dict[str, Any]:
    from prunekit.evaluation.zeroshot import AUTO_MC, auto_mc_rows, zero_shot

    z = e.zero_shot
    rows = None
    if AUTO_MC in z.tasks:
        rows = auto_mc_rows(default_rows, z.auto_mc_questions, z.auto_mc_choices, z.auto_mc_context_words,
                            z.auto_mc_continuation_words, seed)  # fmt: skip
    return zero_shot(model, tokenizer, list(z.tasks), local_dir=z.local_dir, auto_rows=rows,
                     batch_size=z.batch_size, limit=z.limit, seed=seed)  # fmt: skip


def _efficiency(
    model: CausalLM, tokenizer: object, adapter: object, e: EvaluateParams, default_rows: list[str]
) -> dict[str, object]:
    """Size and cost per token, then prefill / decode speed and peak memory at each batch size."""
    from prunekit.data.tokens import token_stream
    from prunekit.evaluation.efficiency import efficiency, peak_memory_mib, reset_peak_memory
    from prunekit.evaluation.speed import speed, speed_prompts

    device = next(model.parameters()).device
    eff: dict[str, object] = dict(efficiency(model, adapter, list(e.seq_lens)))  # type: ignore[arg-type]
    stream = token_stream(tokenizer, default_rows)
    eff["peak_memory"] = peak_memory_mib(device)[1]  # what the per-batch peaks measure
    for batch in e.speed.batch_sizes:
        reset_peak_memory(device)
        prompt = speed_prompts(stream, batch, e.speed.prompt_len)
        timing = speed(model, prompt, e.speed.new_tokens, e.speed.repeats)
        peak, _ = peak_memory_mib(device)
        eff[f"batch_{batch}"] = {k: round(v, 2) for k, v in timing.items()} | {"peak_memory_mib": round(peak, 1)}
    eff["device"] = str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)
    return eff
