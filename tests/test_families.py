"""Contract test for every model family: prune, save, reload, and match the masked dense model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_pruning import WIDTH_UNITS, assert_generate_matches, logits, random_plan

from prunekit.models.families import ADAPTERS, adapter_for
from prunekit.models.loading import load_pretrained
from prunekit.models.saving import save_model
from prunekit.pruning.slicing import apply_plan

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


# Settings a family's contract test turns on beyond the sizes: Mistral a sliding window shorter than the text;
# Gemma-3 sliding and full layers (a window of 4) and an attention scale other than 1/sqrt(head_dim).
EXTRA = {
    "mistral": {"sliding_window": 4},
    "gemma3": {"sliding_window": 4, "query_pre_attn_scalar": 6},
}


def family_config(family: str, **overrides: object):
    """The stock config of ``family`` with the test sizes, ``EXTRA`` and ``overrides`` (Gemma-3: every other layer
    full attention, whatever the depth)."""
    sizes = SIZES | EXTRA.get(family, {}) | overrides
    if family == "gemma3" and "layer_types" not in overrides:
        sizes["layer_types"] = [
            ("full" if i % 2 else "sliding") + "_attention" for i in range(sizes["num_hidden_layers"])
        ]
    config_cls, _ = ADAPTERS.get(family).stock_classes
    return config_cls(**sizes)


def tiny_family(family: str, tie: bool, vocab_size: int, **overrides: object):
    from conftest import tiny_model

    if family == "llama" and not overrides:
        return tiny_model(num_hidden_layers=3, vocab_size=vocab_size, tie_word_embeddings=tie)
    torch.manual_seed(0)
    _, causal_cls = ADAPTERS.get(family).stock_classes  # any registered family: its stock classes
    model = causal_cls(family_config(family, vocab_size=vocab_size, tie_word_embeddings=tie, **overrides))
    with torch.no_grad():  # make biases and norms non-trivial so slicing errors cannot hide
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_every_family_is_covered() -> None:
    assert ADAPTERS.names() == ["gemma3", "llama", "mistral", "qwen2", "qwen3"]


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
    assert cfg["model_type"] == dense.config.model_type and cfg["tie_word_embeddings"] is tie
    loaded = load_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == f"Pruned{adapter.prefix}ForCausalLM"
    assert (logits(loaded, ids) - logits(masked, ids)).abs().max().item() <= 1e-5
    assert_generate_matches(loaded, masked, ids)
    emb, head = loaded.get_input_embeddings().weight, loaded.get_output_embeddings().weight
    assert (emb.data_ptr() == head.data_ptr()) is tie


@pytest.mark.parametrize("family", ADAPTERS.names())
def test_family_uniform_saves_stock_config(family: str, tmp_path, tokenizer) -> None:
    dense = tiny_family(family, False, len(tokenizer))
    adapter = adapter_for(dense.config)
    plan = random_plan(dense, WIDTH_UNITS, seed=6, counts={i: 2 for i in range(3)})
    plan.keep["mlp_channel"] = {i: list(range(32)) for i in range(3)}
    sliced = apply_plan(copy.deepcopy(dense), adapter, plan, mode="slice")
    save_model(sliced, adapter, tokenizer, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == dense.config.model_type and "layer_sizes" not in cfg
    stock = type(dense).from_pretrained(tmp_path).eval()
    ids = tokenizer("import os", return_tensors="pt")["input_ids"]
    assert_generate_matches(stock, sliced, ids)


REFUSALS = [
    (family, ["attn_qk_dim"], {}, "prune.units[0]")
    for family in ADAPTERS.names()
    if "attn_qk_dim" in ADAPTERS.get(family).refused_units
] + [
    ("gemma3", ["hidden_channel"], {}, "prune.units[0]"),
    ("gemma3", ["mlp_channel"], {"criterion": "bip"}, "score.criterion"),
    ("gemma3", ["mlp_channel"], {"compensation": True}, "prune.bias_compensation"),
    ("gemma3", ["mlp_channel"], {"reconstruct": True}, "prune.reconstruct"),
]


@pytest.mark.parametrize(("family", "units", "options", "key"), REFUSALS)
def test_what_a_family_declares_it_cannot_do_is_refused(family, units, options, key) -> None:
    """One line naming the params key, the family and its declared reason."""
    from prunekit.errors import ParamsError
    from prunekit.pruning.support import check_support

    adapter = ADAPTERS.get(family)
    model = tiny_family(family, False, 160)
    with pytest.raises(ParamsError) as err:
        check_support(adapter, model, units, **options)
    (line,) = str(err.value).splitlines()
    reasons = {
        "prune.units[0]": adapter.refused_units.get(units[0]),
        "score.criterion": adapter.refused_criteria.get(options.get("criterion", "")),
        "prune.bias_compensation": adapter.compensation_refused,
        "prune.reconstruct": adapter.reconstruction_refused,
    }
    assert line.startswith(f"params.yaml key '{key}': the {family} family") and reasons[key] in line
    check_support(adapter, model, ["mlp_channel"])  # what it can do passes


def test_kv_groups_of_a_one_kv_head_model_are_refused() -> None:
    """Gemma-3 1B / 270M have one KV head per layer: a KV group is the layer's attention, so attn_kv_group is refused
    (with what to prune instead); query heads and MLP channels are not."""
    from prunekit.errors import ParamsError
    from prunekit.pruning.support import check_support

    model = tiny_family("gemma3", True, 160, num_key_value_heads=1)
    adapter = adapter_for(model.config)
    with pytest.raises(ParamsError, match=r"'prune.units\[1\]': the gemma3 family cannot prune 'attn_kv_group': every "
                       r"layer of this model has one key/value head.*prune attn_query_head"):  # fmt: skip
        check_support(adapter, model, ["mlp_channel", "attn_kv_group"])
    check_support(adapter, model, ["attn_query_head", "mlp_channel"])
    check_support(adapter, tiny_family("gemma3", True, 160), ["attn_kv_group"])  # 4 KV heads: allowed


TOY_FAMILY = '''
"""Granite: Llama's layout with scaling multipliers (embedding, residual, attention, logits)."""

from types import MappingProxyType

from transformers.models.granite import modeling_granite

from prunekit.models.adapters import ADAPTERS, ModelAdapter


class GraniteAdapter(ModelAdapter):
    family = "granite"
    model_types = ("granite",)
    modeling = modeling_granite
    prefix = "Granite"
    gguf_architectures = ("granite",)  # llama.cpp's converter writes Granite as "granite"
    refused_units = MappingProxyType({"hidden_channel": "its residual_multiplier is not rescaled"})


ADAPTERS.register(GraniteAdapter.family)(GraniteAdapter())
'''


def test_a_family_is_one_module(tmp_path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/extending.md's family: one module and its registration line, then the family contract holds
    (sliced = masked dense, saved with per-layer widths, reloaded by the Auto classes, head dims too)."""
    import importlib.util

    from transformers import GraniteConfig, GraniteForCausalLM

    from prunekit.models.families import register_auto_classes

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
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == "granite"
    loaded = load_pretrained(tmp_path / "model").eval()
    assert type(loaded).__name__ == "PrunedGraniteForCausalLM"
    assert (logits(loaded, ids) - logits(masked, ids)).abs().max().item() <= 1e-5


def markdown_table(text: str, header_start: str) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table whose header row starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return [rows[0], *rows[2:]]  # without the |---| line


def test_the_docs_tables_are_the_declarations() -> None:
    """docs/families.md's tables say what each family module declares: units refused, llama.cpp architectures."""
    from pathlib import Path

    from prunekit.pruning.units import UNITS

    text = (Path(__file__).resolve().parents[1] / "docs" / "families.md").read_text()
    header, *rows = markdown_table(text, "| family | attn_kv_group")
    assert sorted(header[1:]) == UNITS.names() and sorted(r[0] for r in rows) == ADAPTERS.names()
    for family, *cells in rows:
        refused = {unit for unit, cell in zip(header[1:], cells) if cell.startswith("refused")}
        assert refused == set(ADAPTERS.get(family).refused_units), family
    _, *rows = markdown_table(text, "| family | config `model_type`")
    for family, model_type, _, uniform, per_layer in rows:
        adapter = ADAPTERS.get(family)
        assert model_type == f"`{adapter.model_types[0]}`"
        assert uniform.split()[0] == f"`{adapter.llama_cpp_arch}`"
        assert per_layer == (f"`{adapter.llama_cpp_per_layer_arch}`" if adapter.llama_cpp_per_layer_arch else "refused")


def test_params_validation_reads_the_family_of_a_local_model(tmp_path, tokenizer) -> None:
    """With model.source a local directory (or GGUF file), its family is known before any stage runs: what the
    family declares it cannot do is refused by params validation, one line per key."""
    from prunekit.errors import ParamsError
    from prunekit.pipeline.params import parse_params
    from prunekit.pipeline.validation import check_choices

    model = tiny_family("gemma3", True, len(tokenizer))
    save_model(model, adapter_for(model.config), tokenizer, tmp_path)
    raw = {
        "model": {"source": str(tmp_path)},
        "score": {"criterion": "bip"},
        "prune": {"units": ["mlp_channel", "attn_qk_dim"], "reconstruct": "least_squares"},
    }
    with pytest.raises(ParamsError) as err:
        check_choices(parse_params(raw))
    keys = [line.split("'")[1] for line in str(err.value).splitlines()]
    assert keys == ["prune.units[1]", "score.criterion", "prune.reconstruct"]
    check_choices(parse_params(raw | {"score": {"criterion": "flap"}, "prune": {"units": ["mlp_channel"]}}))
