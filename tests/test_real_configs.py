"""Family contract on configs exactly as real checkpoints ship them, for every registered family.

The config.json fields of published checkpoints, written here as they are on the Hub (fields a checkpoint
lacks stay absent: Qwen2 and Mistral ship no ``head_dim``; Llama 3.2 has ``rope_scaling`` llama3 and ties its
embedding; Qwen3's ``head_dim`` is its own; Gemma-3 1B has one KV head, ``query_pre_attn_scalar`` and the old
``sliding_window_pattern`` / ``rope_local_base_freq`` keys). Only the sizes are cut so the test runs in seconds:
depth to 3 layers, the vocabulary, the MLP width, the head width to 8 (``hidden_size`` = heads x 8, and
``head_dim`` 8 where the checkpoint has one; otherwise transformers derives it from ``hidden_size``), and
Gemma-3's sliding window to 4 tokens and its pattern to every 2nd layer full, so the 3 layers mix both kinds
(``sliding_window_pattern`` is a depth). Head counts, KV groups and every other field stay as shipped. Each
config goes the pipeline's way: written as config.json beside random weights, loaded by ``load_model``, scored,
planned, sliced, saved, reloaded by stock ``from_pretrained`` and generated from, for every unit type its family
declares (the ones it or the model refuses are refused with the reason).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from test_pruning import assert_generate_matches, logits
from transformers import AutoConfig, AutoModelForCausalLM

from prunekit.errors import ParamsError
from prunekit.models.families import ADAPTERS, family_of_model_type
from prunekit.models.loading import load_model, load_pretrained
from prunekit.models.saving import save_model
from prunekit.models.size import count_params
from prunekit.pruning.allocations import make_plan
from prunekit.pruning.criteria import CRITERIA, ScoreRequest
from prunekit.pruning.plan import PlanRequest
from prunekit.pruning.scoring import ModelSource, score_directory
from prunekit.pruning.slicing import apply_plan, layouts
from prunekit.pruning.units import UNITS

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
    "Qwen3-0.6B": {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "max_position_embeddings": 40960,
        "max_window_layers": 28,
        "model_type": "qwen3",
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "gemma-3-1b-it": {
        "architectures": ["Gemma3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "bos_token_id": 2,
        "cache_implementation": "hybrid",
        "eos_token_id": [1, 106],
        "final_logit_softcapping": None,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "initializer_range": 0.02,
        "intermediate_size": 6912,
        "max_position_embeddings": 32768,
        "model_type": "gemma3_text",
        "num_attention_heads": 4,
        "num_hidden_layers": 26,
        "num_key_value_heads": 1,
        "pad_token_id": 0,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.52.4",
        "use_cache": True,
        "vocab_size": 262144,
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


def family_of(name: str):
    return family_of_model_type(SHIPPED[name]["model_type"])


def refused(name: str, unit: str) -> bool:
    """Whether the family, or (one KV head) the model, refuses ``unit``."""
    one_kv = SHIPPED[name]["num_key_value_heads"] == 1
    return unit in family_of(name).refused_units or (unit == "attn_kv_group" and one_kv)


CASES = [(name, unit) for name in SHIPPED for unit in UNITS.names() if not refused(name, unit)]
REFUSED = [(name, unit) for name in SHIPPED for unit in UNITS.names() if refused(name, unit)]


def shrunk(shipped: dict, vocab_size: int) -> dict:
    """The shipped config with sizes cut (module docstring); every other field as shipped."""
    cfg = copy.deepcopy(shipped)
    cfg.update(num_hidden_layers=3, vocab_size=vocab_size, intermediate_size=64)
    # transformers requires hidden_size to be a multiple of the head count
    cfg["hidden_size"] = shipped["num_attention_heads"] * HEAD_WIDTH
    if "head_dim" in shipped:
        cfg["head_dim"] = HEAD_WIDTH
    if "sliding_window_pattern" in shipped:  # Gemma-3: layers 0, 2 sliding (a window of 4), layer 1 full
        cfg.update(sliding_window=4, sliding_window_pattern=2)
    return cfg


def checkpoint(tmp: Path, name: str, tokenizer, vocab_size: int | None = None) -> Path:
    """A directory as the checkpoint ships: its config.json as shipped (shrunk; the vocabulary to ``vocab_size``,
    default the tokenizer's), random weights, a tokenizer."""
    cfg = shrunk(SHIPPED[name], vocab_size or len(tokenizer))
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


def test_every_family_ships_here() -> None:
    assert {family_of(name).family for name in SHIPPED} == set(ADAPTERS.names())


@pytest.mark.parametrize(("name", "unit"), CASES)
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
    reloaded = load_pretrained(tmp_path / "pruned").eval()
    ids = tokenizer("def add(a, b):\n    return a + b", return_tensors="pt")["input_ids"]
    assert torch.equal(logits(reloaded, ids), logits(sliced, ids))
    if masked is not None:  # the pruned model computes what the dense one does with the unit zeroed
        assert (logits(reloaded, ids) - logits(masked, ids)).abs().max().item() <= 1e-5
    assert_generate_matches(reloaded, sliced, ids)


@pytest.mark.parametrize(("name", "unit"), REFUSED)
def test_refused_units_are_refused_before_scoring(name: str, unit: str, tmp_path: Path, tokenizer) -> None:
    """The score stage's library call refuses a unit type the family or the model cannot prune, naming the key
    and the reason, before it reads a weight."""
    path = checkpoint(tmp_path / "base", name, tokenizer)
    (path / "model.safetensors").write_bytes(b"not read")  # a refusal must come from the config alone
    calibration = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ParamsError) as err:
        score_directory(ModelSource(path), "param_first", ["mlp_channel", unit], calibration, 2, 0, {})
    message = str(err.value)
    assert message.startswith(f"params.yaml key 'prune.units[1]': the {family_of(name).family} family cannot prune")
    why = family_of(name).refused_units.get(unit) or "every layer of this model has one key/value head"
    assert why in message and len(message.splitlines()) == 1


def test_llama32_with_its_whole_vocabulary_runs_in_llama_cpp(tmp_path: Path) -> None:
    """Llama-3.2-1B's config as shipped with its 128,256-token vocabulary kept (tied embedding, llama3 rope
    scaling; other sizes cut as above), a uniform cut of KV groups and MLP channels, exported as an F16 GGUF file:
    llama.cpp gives the pruned model's logits (the rope scaling travels as rope_freqs) and greedy tokens."""
    import gguf
    from conftest import tiny_tokenizer
    from test_deploy import PROMPT, LlamaCpp, greedy
    from test_head_dims import grouped_plan, masked_and_sliced

    from prunekit.export.gguf import write_gguf
    from prunekit.export.tensor_types import TensorTypes
    from prunekit.quant.gguf_types import fake_quantize

    tokenizer = tiny_tokenizer(300)  # llama.cpp's gpt2 tokenizer needs merges; the token list is padded to 128,256
    path = checkpoint(tmp_path / "base", "Llama-3.2-1B", tokenizer, vocab_size=SHIPPED["Llama-3.2-1B"]["vocab_size"])
    dense, _, adapter = load_model(path)
    assert dense.config.vocab_size == 128256 and dense.config.tie_word_embeddings
    assert dense.config.rope_parameters["rope_type"] == "llama3"
    per_group = {"attn_kv_group": [4] * 3, "mlp_channel": [32] * 3}  # 4 of 8 KV groups, 32 of 64 channels
    plan = grouped_plan(dense, ["attn_kv_group", "mlp_channel"], seed=2, per_group=per_group)
    _, sliced = masked_and_sliced(dense, plan)
    save_model(sliced, adapter, tokenizer, tmp_path / "pruned")
    summary = write_gguf(sliced, adapter, tmp_path / "m.gguf", TensorTypes(default="F16"), name="llama-3.2",
                         hf_dir=tmp_path / "pruned")  # fmt: skip
    assert summary["architecture"] == "llama" and summary["tensor_types"]["F32"] == 1 + 2 * 3  # the norms
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    reference = copy.deepcopy(sliced)
    with torch.no_grad():
        for p in reference.parameters():
            if p.dim() == 2:
                p.copy_(fake_quantize(p, "F16"))
    cpp = LlamaCpp(tmp_path / "m.gguf")
    try:
        got = cpp.logits(PROMPT)
        assert got.shape[-1] == 128256
        assert (got - logits(reference, torch.tensor([PROMPT]))[0]).abs().max().item() <= 2e-3
        assert cpp.greedy(PROMPT, 8) == greedy(reference, PROMPT, 8)
    finally:
        cpp.close()
