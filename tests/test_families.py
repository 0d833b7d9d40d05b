"""Contract test for every model family: prune, save, reload, and match the masked dense model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_pruning import WIDTH_UNITS, assert_generate_matches, logits, random_plan
from transformers import AutoModelForCausalLM

from prunekit.models.adapters import ADAPTERS, adapter_for
from prunekit.pruning.slicing import apply_plan, save_model

SIZES = dict(
    vocab_size=160,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=8,
    max_position_embeddings=256,
)


# Settings a family's contract test turns on beyond the sizes (Mistral: a sliding window shorter than the text).
EXTRA = {"mistral": {"sliding_window": 4}}


def tiny_family(family: str, tie: bool, vocab_size: int):
    from conftest import tiny_model

    sizes = SIZES | {"vocab_size": vocab_size, "tie_word_embeddings": tie} | EXTRA.get(family, {})
    if family == "llama":
        return tiny_model(num_hidden_layers=3, vocab_size=vocab_size, tie_word_embeddings=tie)
    torch.manual_seed(0)
    config_cls, causal_cls = ADAPTERS.get(family).stock_classes  # any registered family: its stock classes
    model = causal_cls(config_cls(**sizes))
    with torch.no_grad():  # make biases and norms non-trivial so slicing errors cannot hide
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_every_family_is_covered() -> None:
    assert ADAPTERS.names() == ["llama", "mistral", "qwen2"]


@pytest.mark.parametrize("family", ADAPTERS.names())
@pytest.mark.parametrize("tie", [True, False])
def test_family_prune_save_reload(family: str, tie: bool, tmp_path, tokenizer) -> None:
    dense = tiny_family(family, tie, len(tokenizer))
    adapter = adapter_for(dense.config)
    assert adapter.family == family
    if family == "qwen2":
        assert dense.model.layers[0].self_attn.q_proj.bias is not None
    plan = random_plan(dense, WIDTH_UNITS, seed=5)
    masked = apply_plan(copy.deepcopy(dense), adapter, plan, mode="mask")
    sliced = apply_plan(copy.deepcopy(dense), adapter, plan, mode="slice")
    ids = tokenizer("def f(x):\n    return x + 1", return_tensors="pt")["input_ids"]
    assert (logits(sliced, ids) - logits(masked, ids)).abs().max().item() <= 1e-5
    save_model(sliced, adapter, tokenizer, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == f"prunekit_{family}" and cfg["tie_word_embeddings"] is tie
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == f"Pruned{type(dense).__name__}"
    assert (logits(loaded, ids) - logits(masked, ids)).abs().max().item() <= 1e-5
    assert_generate_matches(loaded, masked, ids)
    emb, head = loaded.get_input_embeddings().weight, loaded.get_output_embeddings().weight
    assert (emb.data_ptr() == head.data_ptr()) is tie


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_family_uniform_saves_stock_config(family: str, tmp_path, tokenizer) -> None:
    dense = tiny_family(family, False, len(tokenizer))
    adapter = adapter_for(dense.config)
    plan = random_plan(dense, WIDTH_UNITS, seed=6, counts={i: 2 for i in range(3)})
    plan.keep["mlp_channel"] = {i: list(range(32)) for i in range(3)}
    sliced = apply_plan(copy.deepcopy(dense), adapter, plan, mode="slice")
    save_model(sliced, adapter, tokenizer, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == family and "layer_sizes" not in cfg
    stock = type(dense).from_pretrained(tmp_path).eval()
    ids = tokenizer("import os", return_tensors="pt")["input_ids"]
    assert_generate_matches(stock, sliced, ids)


TOY_FAMILY = '''
"""Granite: Llama's layout with scaling multipliers (embedding, residual, attention, logits)."""

from transformers.models.granite import modeling_granite

from prunekit.models.adapters import ADAPTERS, ModelAdapter


class GraniteAdapter(ModelAdapter):
    family = "granite"
    model_types = ("granite",)
    modeling = modeling_granite
    prefix = "Granite"


ADAPTERS.register(GraniteAdapter.family)(GraniteAdapter())
'''


def test_a_family_is_one_module(tmp_path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/extending.md's family: one module and its registration line, then the family contract holds
    (sliced = masked dense, saved with per-layer widths, reloaded by the Auto classes, head dims too)."""
    import importlib.util

    from transformers import GraniteConfig, GraniteForCausalLM

    from prunekit.models.adapters import register_auto_classes

    monkeypatch.setattr(ADAPTERS, "_items", dict(ADAPTERS._items))  # the registration ends with the test
    (tmp_path / "toy_family.py").write_text(TOY_FAMILY)
    spec = importlib.util.spec_from_file_location("toy_family", tmp_path / "toy_family.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    register_auto_classes()
    torch.manual_seed(0)
    config = GraniteConfig(**SIZES | {"vocab_size": len(tokenizer)}, residual_multiplier=0.5, attention_multiplier=0.2)
    dense = GraniteForCausalLM(config).eval()
    adapter = adapter_for(dense.config)
    assert adapter.family == "granite"
    adapter.enable_head_dims(dense.model.layers[1].self_attn)  # the family's head-dim attention, same outputs
    plan = random_plan(dense, WIDTH_UNITS, seed=5)
    masked = apply_plan(copy.deepcopy(dense), adapter, plan, mode="mask")
    sliced = apply_plan(copy.deepcopy(dense), adapter, plan, mode="slice")
    ids = tokenizer("def f(x):\n    return x + 1", return_tensors="pt")["input_ids"]
    assert (logits(sliced, ids) - logits(masked, ids)).abs().max().item() <= 1e-5
    save_model(sliced, adapter, tokenizer, tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == "prunekit_granite"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert type(loaded).__name__ == "PrunedGraniteForCausalLM"
    assert (logits(loaded, ids) - logits(masked, ids)).abs().max().item() <= 1e-5
