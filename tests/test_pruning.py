"""Units, plans and slicing: a pruned model equals the dense model with the same structures zeroed."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from accelerate import init_empty_weights
from conftest import tiny_config, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from prunekit.errors import PrunekitError
from prunekit.models.families import adapter_for
from prunekit.models.loading import load_pretrained
from prunekit.models.saving import save_model
from prunekit.models.size import count_params
from prunekit.pruning.allocations import make_plan
from prunekit.pruning.plan import Plan, PlanRequest, kept_count
from prunekit.pruning.slicing import apply_plan, layouts, prunable_layers
from prunekit.pruning.units import UNITS

# The unit types whose widths the tests below check by name (per-layer sizes in the saved config).
WIDTH_UNITS = ["attn_kv_group", "mlp_channel"]


def random_plan(model, units: list[str], seed: int, counts: dict[int, int] | None = None) -> Plan:
    """Keep a random subset of each unit type in each layer (``counts[layer]`` units, else about half).

    Grouped unit types keep the same number in every group (``k // groups``, at least one); whole layers
    are kept in odd-numbered layers (in every layer named in ``counts``).
    """
    adapter = adapter_for(model.config)
    gen = torch.Generator().manual_seed(seed)
    keep: dict[str, dict[int, list[int]]] = {}
    for unit in units:
        ut = UNITS.get(unit)
        for idx, layer in enumerate(adapter.layers(model)):
            n, groups = ut.count(adapter, layer), ut.groups(adapter, layer)
            if ut.whole_layer:
                keep.setdefault(unit, {})[idx] = [0] if idx % 2 or idx in (counts or {}) else []
                continue
            k = (counts or {}).get(idx, max(1, n // 2 + idx % 2))
            size, per = n // groups, max(1, k // groups)
            kept = [g * size + int(i) for g in range(groups) for i in torch.randperm(size, generator=gen)[:per]]
            keep.setdefault(unit, {})[idx] = sorted(kept)
    total = count_params(model)
    return Plan(keep=keep, params_before=total, params_after=total, target=0.0, allocation="test")


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("units", [[u] for u in UNITS.names()] + [UNITS.names()])
def test_sliced_equals_masked_dense(units: list[str]) -> None:
    dense = tiny_model()
    plan = random_plan(dense, units, seed=1)
    adapter = adapter_for(dense.config)
    masked = apply_plan(copy.deepcopy(dense), adapter, plan, mode="mask")
    sliced = apply_plan(copy.deepcopy(dense), adapter, plan, mode="slice")
    ids = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(0))
    assert count_params(sliced) < count_params(dense)
    assert (logits(sliced, ids) - logits(masked, ids)).abs().max().item() <= 1e-5
    # Guard against a vacuous pass: the masked model really differs from the dense one.
    assert (logits(masked, ids) - logits(dense, ids)).abs().max().item() > 1e-3


def test_masking_other_units_changes_output() -> None:
    """The exactness test would fail if slicing kept the wrong units: keeping the complement differs."""
    dense = tiny_model()
    adapter = adapter_for(dense.config)
    plan = random_plan(dense, ["mlp_channel"], seed=2, counts={i: 32 for i in range(4)})
    other = copy.deepcopy(plan)
    other.keep = {u: {i: sorted(set(range(64)) - set(k)) for i, k in d.items()} for u, d in plan.keep.items()}
    sliced = apply_plan(copy.deepcopy(dense), adapter, plan, mode="slice")
    wrong = apply_plan(copy.deepcopy(dense), adapter, other, mode="mask")
    ids = torch.randint(0, 128, (2, 9))
    assert (logits(sliced, ids) - logits(wrong, ids)).abs().max().item() > 1e-3


def save_and_reload(model, tokenizer, tmp_path):
    adapter = adapter_for(model.config)
    save_model(model, adapter, tokenizer, tmp_path)
    return load_pretrained(tmp_path).eval(), json.loads((tmp_path / "config.json").read_text())


def assert_generate_matches(model, reference, ids: torch.Tensor, n: int = 8) -> None:
    """generate() with the KV cache gives, at every step, the logits ``reference`` gives by full forwards.

    Comparing logits rather than tokens keeps the check exact-to-tolerance and free of argmax near-ties.
    """
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        steps = torch.stack(out.logits, dim=1)  # (B, n, V)
        ref = reference(input_ids=out.sequences[:, :-1]).logits[:, ids.shape[1] - 1 :]
    assert out.sequences.shape[1] == ids.shape[1] + n
    assert (steps - ref).abs().max().item() <= 1e-4


def test_heterogeneous_roundtrip_generate(tmp_path, tokenizer) -> None:
    dense = tiny_model(vocab_size=len(tokenizer))
    adapter = adapter_for(dense.config)
    plan = random_plan(dense, WIDTH_UNITS, seed=3)  # kept counts differ between layers
    masked = apply_plan(copy.deepcopy(dense), adapter, plan, mode="mask")
    sliced = apply_plan(copy.deepcopy(dense), adapter, plan, mode="slice")
    loaded, cfg = save_and_reload(sliced, tokenizer, tmp_path)
    assert cfg["model_type"] == "llama"
    assert cfg["architectures"] == ["PrunedLlamaForCausalLM"]
    assert [s["intermediate_size"] for s in cfg["layer_sizes"]] == [len(k) for k in plan.keep["mlp_channel"].values()]
    assert [s["num_key_value_heads"] for s in cfg["layer_sizes"]] == [
        len(k) for k in plan.keep["attn_kv_group"].values()
    ]
    ids = tokenizer("def f(x):", return_tensors="pt")["input_ids"]
    assert (logits(loaded, ids) - logits(masked, ids)).abs().max().item() <= 1e-5
    assert_generate_matches(loaded, masked, ids)


def test_uniform_roundtrip_is_stock_llama(tmp_path, tokenizer) -> None:
    dense = tiny_model(vocab_size=len(tokenizer))
    adapter = adapter_for(dense.config)
    plan = random_plan(dense, WIDTH_UNITS, seed=4, counts={i: 2 for i in range(4)})
    plan.keep["mlp_channel"] = {i: list(range(0, 64, 2)) for i in range(4)}
    sliced = apply_plan(copy.deepcopy(dense), adapter, plan, mode="slice")
    loaded, cfg = save_and_reload(sliced, tokenizer, tmp_path)
    assert cfg["model_type"] == "llama" and "layer_sizes" not in cfg
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (4, 2, 32)
    stock = LlamaForCausalLM.from_pretrained(tmp_path).eval()  # the stock class, no prunekit involved
    assert type(stock) is LlamaForCausalLM
    ids = tokenizer("class A:", return_tensors="pt")["input_ids"]
    assert_generate_matches(stock, sliced, ids)
    assert_generate_matches(loaded, sliced, ids)


def smollm2_shaped() -> LlamaForCausalLM:
    """SmolLM2-135M's architecture on the meta device (shapes only, no memory)."""
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    model.tie_weights()
    return model


@pytest.mark.parametrize("target", [0.05, 0.1, 0.2, 0.3, 0.4, 0.5])
def test_achieved_fraction_within_one_point(target: float) -> None:
    model = smollm2_shaped()
    adapter = adapter_for(model.config)
    lays = layouts(model, adapter, WIDTH_UNITS, prunable_layers(30, 3, 2))
    scores = {f"{lay.unit}.{lay.layer}": torch.arange(lay.count, dtype=torch.float64) for lay in lays}
    req = PlanRequest(target, count_params(model), lays, {"mlp_channel": 8}, 0.01)
    plan = make_plan(scores, req, "uniform")
    assert abs(plan.achieved - target) <= 0.01
    assert count_params(model) == 134_515_008
    assert all(len(k) % 8 == 0 for k in plan.keep["mlp_channel"].values())
    # Every pruned layer gets the same widths (uniform allocation), skipped layers are absent.
    assert len({len(k) for k in plan.keep["mlp_channel"].values()}) == 1
    assert sorted(plan.keep["mlp_channel"]) == list(range(3, 28))


def test_plan_keeps_highest_scores_and_counts_match(model) -> None:
    adapter = adapter_for(model.config)
    lays = layouts(model, adapter, ["mlp_channel"], prunable_layers(4, 1, 1))
    scores = {f"{lay.unit}.{lay.layer}": torch.arange(lay.count, dtype=torch.float64) for lay in lays}
    req = PlanRequest(0.1, count_params(model), lays, {"mlp_channel": 8}, 0.02)
    plan = make_plan(scores, req, "uniform")
    k = len(plan.keep["mlp_channel"][1])
    assert plan.keep["mlp_channel"][1] == list(range(64 - k, 64))  # the highest-scored channels
    sliced = apply_plan(copy.deepcopy(model), adapter, plan)
    assert count_params(sliced) == plan.params_after
    assert plan.to_json()["achieved"] == pytest.approx(1 - plan.params_after / plan.params_before)
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_unreachable_target_names_the_knobs(model) -> None:
    adapter = adapter_for(model.config)
    lays = layouts(model, adapter, ["attn_kv_group"], prunable_layers(4, 1, 1))
    scores = {f"{lay.unit}.{lay.layer}": torch.ones(lay.count) for lay in lays}
    req = PlanRequest(0.6, count_params(model), lays, {}, 0.01)
    with pytest.raises(PrunekitError, match=r"prune.target=0.6 cannot be met.*prune.skip_first"):
        make_plan(scores, req, "uniform")


def test_skip_layers_error_and_kept_count() -> None:
    with pytest.raises(PrunekitError, match="leaves no layer of 4 to prune"):
        prunable_layers(4, 2, 2)
    assert kept_count(1536, 0.3, 8) == 1072
    assert kept_count(3, 0.99, 1) == 1  # never a zero-width layer
    assert kept_count(3, 0.0, 8) == 3


def test_plan_rejects_missing_scores(model) -> None:
    adapter = adapter_for(model.config)
    lays = layouts(model, adapter, ["mlp_channel"], [1, 2])
    req = PlanRequest(0.1, count_params(model), lays, {}, 0.05)
    with pytest.raises(PrunekitError, match="scores for mlp_channel in layer 2 are missing"):
        make_plan({"mlp_channel.1": torch.ones(64)}, req, "uniform")


def test_unsupported_architecture_lists_supported() -> None:
    from transformers import GPT2Config

    with pytest.raises(
        PrunekitError,
        match=r"Unsupported architecture 'gpt2'.*Supported model types: gemma3_text, llama, mistral, qwen2, qwen3\.",
    ):
        adapter_for(GPT2Config())


def test_tiny_config_is_gqa() -> None:
    cfg = tiny_config()
    assert cfg.num_attention_heads // cfg.num_key_value_heads == 2
