"""Every stage for every family: the stage functions `dvc repro` runs, in this process, on a tiny random model of
each registered family (download from a local directory, calibrate, score, prune, recover, search, quantize,
evaluate, export).

Each family gets a criterion that applies to it (so that, across the families, a gradient, a LoRA, a forward-only
and an activation criterion with bias compensation all run), the unit types it declares among KV groups, query
heads and MLP channels, a uniform cut of every layer (the widths every llama.cpp graph holds), LoRA recovery,
a searched RTN plan with QLoRA, and an F16 GGUF export, which llama.cpp then runs with the recovered model's logits.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from test_deploy import PROMPT, LlamaCpp, gguf_model

from prunekit.models.families import ADAPTERS, adapter_for
from prunekit.models.loading import load_pretrained
from prunekit.models.saving import save_model
from prunekit.models.size import count_params
from prunekit.pipeline.params import parse_params

ROOT = Path(__file__).resolve().parents[1]
# A criterion each family is scored with in this test (all of them score every family but where refused).
CRITERION = {"llama": "activation", "mistral": "lora", "qwen2": "bip", "qwen3": "param_first", "gemma3": "flap"}


def stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def family_params(family: str, source: Path) -> dict:
    units = [
        u for u in ("attn_kv_group", "attn_query_head", "mlp_channel") if u not in ADAPTERS.get(family).refused_units
    ]
    criterion = CRITERION[family]
    return {
        "model": {"source": str(source)},
        "calibrate": {"samples": 4, "seq_len": 16},
        "score": {"criterion": criterion, "batch_size": 2, "lora": {"steps": 1, "batch_size": 2}},
        "prune": {
            "target": 0.2,
            "units": units,
            "allocation": "uniform",  # every family's llama.cpp graph reads it
            "skip_first": 0,
            "skip_last": 0,
            "tolerance": 0.05,
            "round_to": {"attn_kv_group": 1, "attn_query_head": 1, "mlp_channel": 8},
            "bias_compensation": criterion == "activation",  # FLAP's compensation (Llama's export reads the biases)
        },
        "recover": {"lora": {"steps": 2, "batch_size": 2, "seq_len": 32, "warmup_steps": 1}},
        "search": {"choices": ["rtn4", "rtn8"], "trials": 1, "random_starts": 1, "importance_spreads": [0.5],
                   "samples": 1, "seq_len": 16, "batch_size": 1, "budget_bits": 6.0, "embeddings": False},
        "quantize": {"group_size": 16, "lora": {"steps": 1, "batch_size": 1, "seq_len": 16}},
        "evaluate": {"seq_lens": [16], "max_chunks": 4, "zero_shot": {"tasks": []},
                     "speed": {"batch_sizes": [1], "prompt_len": 8, "new_tokens": 2, "repeats": 1}},
        "export": {"types": "f16", "embedding": "f16"},
    }  # fmt: skip


@pytest.mark.parametrize("family", ADAPTERS.names())
def test_every_stage_runs_for_every_family(family: str, tmp_path: Path, bpe_tokenizer) -> None:
    source = tmp_path / "source"
    # Rows to spare: a family's tokenizer class may add its own special token when the stages reload it (Qwen2's).
    model = gguf_model(family, len(bpe_tokenizer) + 8, tie_word_embeddings=True)
    save_model(model, adapter_for(model.config), bpe_tokenizer, source)
    params = parse_params(family_params(family, source))
    base, text, calib, scores = tmp_path / "base", tmp_path / "text", tmp_path / "calib.st", tmp_path / "scores.st"
    pruned, recovered, quantized = tmp_path / "pruned", tmp_path / "recovered", tmp_path / "quantized"
    m = tmp_path / "metrics"
    stage("download_model").download_model(params, base)
    stage("download_data").download_data(params, text)
    stage("calibrate").calibrate(params, base, text, calib)
    stage("score").score(params, base, calib, scores)
    stage("prune").prune(params, base, scores, pruned, m / "plan.json", m / "prune.json", m / "trials.json", text,
                         calib, tmp_path / "state")  # fmt: skip
    stage("recover").recover(params, pruned, base, text, recovered, m / "loss.json", m / "loss.png")
    stage("search").search(params, recovered, text, m / "quant_plan.json", m / "search_trials.json",
                           m / "search.json", m / "sensitivity.json", m / "search.png")  # fmt: skip
    stage("quantize").quantize(params, recovered, m / "quant_plan.json", text, quantized, m / "qlora.json",
                               m / "qlora.png")  # fmt: skip
    stage("evaluate").evaluate(params, quantized, text, m / "eval.json", "quantized")
    stage("export").export(params, recovered, base, m / "quant_plan.json", quantized, tmp_path / "m.gguf",
                           m / "export.json")  # fmt: skip

    prune_metrics = json.loads((m / "prune.json").read_text())
    loaded = load_pretrained(pruned)
    assert abs(prune_metrics["achieved_fraction"] - 0.2) <= 0.05 and prune_metrics["params_after"] == count_params(
        loaded
    )
    sizes = adapter_for(loaded.config).all_layer_sizes(loaded)
    assert len(set(sizes)) == 1  # a uniform cut of every layer
    assert json.loads((m / "quant_plan.json").read_text())["schemes"]  # a scheme per searched group
    evaluation = json.loads((m / "eval.json").read_text())
    assert all(0 < v < float("inf") for k, v in evaluation.items() if k.startswith("ppl."))
    export = json.loads((m / "export.json").read_text())
    assert export["architecture"] == ADAPTERS.get(family).llama_cpp_arch or (
        family == "qwen2" and export["architecture"] == "deci"  # query heads no longer span the hidden size
    )
    # llama.cpp runs the exported file with the recovered model's logits (F16 weights, as the file holds them).
    reference = load_pretrained(recovered).eval()
    with torch.no_grad():
        for p in reference.parameters():
            if p.dim() == 2:
                p.copy_(p.to(torch.float16).to(torch.float32))
        expected = reference(torch.tensor([PROMPT])).logits[0]
    cpp = LlamaCpp(tmp_path / "m.gguf")
    try:
        assert (cpp.logits(PROMPT) - expected).abs().max().item() <= 2e-3
    finally:
        cpp.close()
    assert copy.deepcopy(prune_metrics)["params_before"] == count_params(model)


@pytest.fixture(scope="module")
def bpe_tokenizer():
    from conftest import tiny_tokenizer

    return tiny_tokenizer(300, unk=True)
