"""Family contract on configs exactly as real checkpoints ship them.

The config.json fields of four published checkpoints, written here as they are on the Hub (fields a
checkpoint lacks stay absent: Qwen2 and Mistral ship no ``head_dim``; Llama 3.2 has ``rope_scaling``
llama3). Only the sizes are cut so the test runs in seconds: depth to 3 layers, the vocabulary, the MLP
width, and the head width to 8 (``hidden_size`` = heads x 8, and ``head_dim`` 8 where the checkpoint has one; otherwise
transformers derives it from ``hidden_size``). Head counts and KV groups stay as shipped. Each config goes
the pipeline's way: written as config.json beside random weights, loaded by ``load_model``, scored,
planned, sliced, saved, reloaded by stock ``from_pretrained`` and generated from, for every unit type.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from test_pruning import assert_generate_matches, logits
from transformers import AutoConfig, AutoModelForCausalLM

from prunekit.models.loading import load_model
from prunekit.pruning.criteria import CRITERIA, ScoreRequest
from prunekit.pruning.plan import PlanRequest, make_plan
from prunekit.pruning.slicing import apply_plan, count_params, layouts, save_model

SHIPPED: dict[str, dict] = {
    "Llama-3.2-1B": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 8192,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 16,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0",
        "use_cache": True,
        "vocab_size": 128256,
    },
    "Mistral-7B-v0.3": {
        "architectures": ["MistralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.42.0.dev0",
        "use_cache": True,
        "vocab_size": 32768,
    },
    "Qwen2.5-0.5B": {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 896,
        "initializer_range": 0.02,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "model_type": "qwen2",
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "use_cache": True,
        "use_mrope": False,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "SmolLM2-135M": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": 576,
        "initializer_range": 0.041666666666666664,
        "intermediate_size": 1536,
        "is_llama_config": True,
        "max_position_embeddings": 8192,
        "model_type": "llama",
        "num_attention_heads": 9,
        "num_hidden_layers": 30,
        "num_key_value_heads": 3,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_interleaved": False,
        "rope_scaling": None,
        "rope_theta": 100000,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "use_cache": True,
        "vocab_size": 49152,
    },
}
HEAD_WIDTH = 8
UNITS = ["attn_kv_group", "attn_query_head", "attn_qk_dim", "attn_vo_dim", "mlp_channel", "layer", "hidden_channel"]


def shrunk(shipped: dict, vocab_size: int) -> dict:
    """The shipped config with sizes cut (module docstring); every other field as shipped."""
    cfg = copy.deepcopy(shipped)
    cfg.update(num_hidden_layers=3, vocab_size=vocab_size, intermediate_size=64)
    # transformers requires hidden_size to be a multiple of the head count
    cfg["hidden_size"] = shipped["num_attention_heads"] * HEAD_WIDTH
    if "head_dim" in shipped:
        cfg["head_dim"] = HEAD_WIDTH
    return cfg


def checkpoint(tmp: Path, name: str, tokenizer) -> Path:
    """A directory as the checkpoint ships: its config.json as shipped (shrunk), random weights, a tokenizer."""
    cfg = shrunk(SHIPPED[name], len(tokenizer))
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp))
    with torch.no_grad():  # make biases and norms non-trivial so slicing errors cannot hide behind them
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "config.json").write_text(json.dumps(cfg))  # back to the shipped fields, not transformers' rewrite
    return tmp


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_fields_survive_loading(name: str, tmp_path: Path, tokenizer) -> None:
    path = checkpoint(tmp_path, name, tokenizer)
    assert json.loads((path / "config.json").read_text()) == shrunk(SHIPPED[name], len(tokenizer))
    model, _, adapter = load_model(path)
    assert adapter.head_dim(model) == HEAD_WIDTH
    assert model.config.num_key_value_heads == SHIPPED[name]["num_key_value_heads"]
    if name == "Qwen2.5-0.5B":
        assert "head_dim" not in SHIPPED[name] and model.model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("name", list(SHIPPED))
def test_score_prune_save_reload_generate(name: str, unit: str, tmp_path: Path, tokenizer) -> None:
    dense, _, adapter = load_model(checkpoint(tmp_path / "base", name, tokenizer))
    n_layers = len(adapter.layers(dense))
    calibration = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(1))
    scores = CRITERIA.get("param_first").score(
        dense, adapter, ScoreRequest([unit], list(range(n_layers)), calibration, batch_size=4, seed=0)
    )
    round_to = {"hidden_channel": SHIPPED[name]["num_attention_heads"]} if unit == "hidden_channel" else {}
    lays = layouts(dense, adapter, [unit], [0, 1, 2])
    # Half of what this unit type holds (one of three layers for `layer`): reachable however coarse the units
    # (Qwen2.5 has 2 KV groups per layer).
    share = sum(lay.count * lay.params_per_unit for lay in lays) / count_params(dense)
    target = share / 3 if unit == "layer" else share / 2
    req = PlanRequest(target, count_params(dense), lays, round_to, target / 2)
    plan = make_plan(scores, req, "uniform", criterion="param_first")
    masked = apply_plan(copy.deepcopy(dense), adapter, plan, mode="mask") if unit != "layer" else None
    sliced = apply_plan(copy.deepcopy(dense), adapter, plan, mode="slice")
    assert count_params(sliced) == plan.params_after < count_params(dense)
    save_model(sliced, adapter, tokenizer, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    ids = tokenizer("def add(a, b):\n    return a + b", return_tensors="pt")["input_ids"]
    assert torch.equal(logits(reloaded, ids), logits(sliced, ids))
    if masked is not None:  # the pruned model computes what the dense one does with the unit zeroed
        assert (logits(reloaded, ids) - logits(masked, ids)).abs().max().item() <= 1e-5
    assert_generate_matches(reloaded, sliced, ids)
