"""Query-head units and whole-layer units: slicing, composition, save/reload, and Block Influence."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from test_families import SIZES, tiny_family
from test_pruning import assert_generate_matches, logits, random_plan, save_and_reload
from torch import nn
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from prunekit.errors import PrunekitError
from prunekit.models.families import ADAPTERS, adapter_for
from prunekit.models.size import count_params
from prunekit.pruning.allocations import make_plan
from prunekit.pruning.criteria import CRITERIA, ScoreRequest
from prunekit.pruning.plan import Plan, PlanRequest
from prunekit.pruning.slicing import apply_plan, layouts
from prunekit.pruning.units import UNITS

FAMILIES = ADAPTERS.names()
HD = 8  # head_dim of every tiny model
HEADS_AND_WIDTHS = ["attn_query_head", "attn_kv_group", "mlp_channel"]


def ids_for(vocab: int, seed: int = 0) -> torch.Tensor:
    """17 tokens: longer than the sliding windows (4) of the Mistral/Qwen2 models below. No token 0:
    ``assert_generate_matches`` generates with ``pad_token_id=0``, which would mask such tokens."""
    return torch.randint(1, vocab, (2, 17), generator=torch.Generator().manual_seed(seed))


def plan_of(model, keep: dict[str, dict[int, list[int]]]) -> Plan:
    total = count_params(model)
    return Plan(keep=keep, params_before=total, params_after=total, target=0.0, allocation="test")


def sliced_and_masked(dense, plan: Plan):
    adapter = adapter_for(dense.config)
    masked = apply_plan(copy.deepcopy(dense), adapter, plan, mode="mask")
    sliced = apply_plan(copy.deepcopy(dense), adapter, plan, mode="slice")
    return sliced, masked


def max_diff(a, b, ids: torch.Tensor) -> float:
    return (logits(a, ids) - logits(b, ids)).abs().max().item()


# ---------------------------------------------------------------- attn_query_head


@pytest.mark.parametrize("family", FAMILIES)
def test_query_heads_sliced_equal_masked_dense(family: str) -> None:
    dense = tiny_family(family, False, 160)
    plan = random_plan(dense, ["attn_query_head"], seed=11, counts={0: 4, 1: 8, 2: 4})  # 1, 2, 1 per KV group
    sliced, masked = sliced_and_masked(dense, plan)
    ids = ids_for(160)
    assert max_diff(sliced, masked, ids) <= 1e-5
    assert max_diff(masked, dense, ids) > 1e-3  # the removed heads mattered
    for idx, per in ((0, 1), (1, 2), (2, 1)):
        a, d = sliced.model.layers[idx].self_attn, dense.model.layers[idx].self_attn
        kept = plan.keep["attn_query_head"][idx]
        assert torch.bincount(torch.tensor(kept) // 2, minlength=4).tolist() == [per] * 4
        rows = torch.cat([torch.arange(h * HD, (h + 1) * HD) for h in kept])
        assert torch.equal(a.q_proj.weight, d.q_proj.weight[rows])  # exactly the kept heads, in order
        assert torch.equal(a.o_proj.weight, d.o_proj.weight[:, rows])
        assert torch.equal(a.k_proj.weight, d.k_proj.weight)  # k/v heads (and the KV cache) untouched
        assert a.num_key_value_groups == per
        if family == "qwen2":
            assert torch.equal(a.q_proj.bias, d.q_proj.bias[rows])
    assert count_params(sliced) == count_params(dense) - (4 + 0 + 4) * 2 * HD * 48 - (
        8 * HD if family == "qwen2" else 0
    )


def test_unequal_query_heads_per_group_are_refused() -> None:
    dense = tiny_model()
    keep = {"attn_query_head": {0: [0, 1, 2, 4]}}  # KV group 0 keeps 2 heads, group 2 keeps none
    with pytest.raises(PrunekitError, match=r"keeps \[2, 1, 1, 0\] attn_query_head units in the 4 groups of layer 0"):
        apply_plan(copy.deepcopy(dense), adapter_for(dense.config), plan_of(dense, keep))
    assert torch.equal(
        dense.model.layers[0].self_attn.q_proj.weight, tiny_model().model.layers[0].self_attn.q_proj.weight
    )


def test_planned_query_heads_keep_equal_counts_per_kv_group() -> None:
    model = tiny_model()
    adapter = adapter_for(model.config)
    lays = layouts(model, adapter, ["attn_query_head"], [0, 1, 2, 3])
    assert {(lay.count, lay.groups, lay.parent) for lay in lays} == {(8, 4, "attn_kv_group")}
    gen = torch.Generator().manual_seed(3)
    scores = {f"attn_query_head.{i}": torch.rand(8, generator=gen, dtype=torch.float64) for i in range(4)}
    req = PlanRequest(0.05, count_params(model), lays, {}, 0.05)
    for allocation in ("uniform", "global", "global_weighted"):
        plan = make_plan(scores, req, allocation)
        for idx, kept in plan.keep["attn_query_head"].items():
            per_group = torch.bincount(torch.tensor(kept) // 2, minlength=4)
            assert (per_group == per_group[0]).all() and per_group[0] >= 1, (allocation, idx, kept)
            # Within each group the highest-scored heads stay.
            s = scores[f"attn_query_head.{idx}"].view(4, 2)
            if per_group[0] == 1:
                assert kept == [2 * g + int(s[g].argmax()) for g in range(4)]


@pytest.mark.parametrize("family", FAMILIES)
def test_query_heads_heterogeneous_save_reload_generate(family: str, tmp_path, tokenizer) -> None:
    dense = tiny_family(family, True, len(tokenizer))
    plan = random_plan(dense, ["attn_query_head"], seed=12, counts={0: 4, 1: 8, 2: 4})
    sliced, masked = sliced_and_masked(dense, plan)
    loaded, cfg = save_and_reload(sliced, tokenizer, tmp_path)
    assert cfg["model_type"] == dense.config.model_type
    assert [s["num_attention_heads"] for s in cfg["layer_sizes"]] == [4, 8, 4]
    assert [s["num_key_value_heads"] for s in cfg["layer_sizes"]] == [4, 4, 4]
    assert [layer.self_attn.num_key_value_groups for layer in loaded.model.layers] == [1, 2, 1]
    ids = tokenizer("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    assert max_diff(loaded, masked, ids) <= 1e-5
    assert_generate_matches(loaded, masked, ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_query_heads_compose_with_kv_groups_and_mlp(family: str, tmp_path, tokenizer) -> None:
    dense = tiny_family(family, False, len(tokenizer))
    keep = {
        "attn_kv_group": {0: [1, 3], 1: [0, 1, 2], 2: [2]},
        "attn_query_head": {0: [0, 3, 4, 7], 1: [1, 2, 5, 6], 2: [0, 1, 2, 3, 4, 5, 6, 7]},
        "mlp_channel": {i: list(range(i, 64, 3)) for i in range(3)},
    }
    sliced, masked = sliced_and_masked(dense, plan_of(dense, keep))
    ids = ids_for(len(tokenizer))
    assert max_diff(sliced, masked, ids) <= 1e-5
    assert max_diff(masked, dense, ids) > 1e-3
    # KV groups and query heads both number the dense layer: layer 0 keeps groups 1 and 3, and in them
    # query heads 3 and 7 (heads 0 and 4 belong to the removed groups 0 and 2).
    a, d = sliced.model.layers[0].self_attn, dense.model.layers[0].self_attn
    assert torch.equal(a.q_proj.weight, torch.cat([d.q_proj.weight[h * HD : (h + 1) * HD] for h in (3, 7)]))
    assert torch.equal(a.k_proj.weight, torch.cat([d.k_proj.weight[g * HD : (g + 1) * HD] for g in (1, 3)]))
    assert [layer.self_attn.num_key_value_groups for layer in sliced.model.layers] == [1, 1, 2]
    # The order of plan.keep does not matter: apply_plan orders unit types itself.
    reordered = plan_of(dense, dict(reversed(list(keep.items()))))
    other = apply_plan(copy.deepcopy(dense), adapter_for(dense.config), reordered)
    assert all(torch.equal(p, q) for p, q in zip(sliced.state_dict().values(), other.state_dict().values()))
    loaded, cfg = save_and_reload(sliced, tokenizer, tmp_path)
    assert [(s["num_attention_heads"], s["num_key_value_heads"]) for s in cfg["layer_sizes"]] == [
        (2, 2),
        (3, 3),
        (2, 1),
    ]
    assert_generate_matches(loaded, masked, ids[:1, :9])


# ---------------------------------------------------------------- layer


class Skip(nn.Module):
    """What a removed decoder layer contributes: nothing (its input passes through)."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states


def skip_reference(dense, drop: list[int]):
    """The dense model with layers ``drop`` replaced by :class:`Skip`: same config, same layer numbering,
    so every kept layer keeps its attention type (full / sliding) by construction."""
    ref = copy.deepcopy(dense)
    for idx in drop:
        ref.model.layers[idx] = Skip()
    return ref


def deep_family(family: str, vocab_size: int = 160):
    """4-layer models; Mistral with one sliding window for all layers, Qwen2 with full attention in
    layers 0-1 and sliding in 2-3 (``max_window_layers=2``), Gemma-3 sliding in layers 0 and 2, full in 1 and 3
    (a window of 4), so per-layer attention types matter."""
    if family == "llama":
        return tiny_model(vocab_size=vocab_size)
    if family not in ("mistral", "qwen2"):
        return tiny_family(family, False, vocab_size, num_hidden_layers=4)
    torch.manual_seed(0)
    sizes = SIZES | {"vocab_size": vocab_size, "num_hidden_layers": 4}
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**sizes, sliding_window=4))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**sizes, use_sliding_window=True, sliding_window=4, max_window_layers=2))
    with torch.no_grad():  # make biases and norms non-trivial so slicing errors cannot hide
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def layer_plan(model, drop: list[int]) -> Plan:
    return plan_of(model, {"layer": {i: [] if i in drop else [0] for i in range(len(model.model.layers))}})


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_layers_equal_skipped_layers(family: str) -> None:
    dense = deep_family(family)
    drop = [0, 2]
    sliced, masked = sliced_and_masked(dense, layer_plan(dense, drop))
    ref = skip_reference(dense, drop)
    ids = ids_for(160)
    assert max_diff(sliced, ref, ids) <= 1e-5
    assert max_diff(sliced, masked, ids) <= 1e-5  # a masked (all-zero) layer is the identity
    assert max_diff(ref, dense, ids) > 1e-3
    assert len(sliced.model.layers) == 2 and sliced.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in sliced.model.layers] == [0, 1]
    assert count_params(sliced) == count_params(dense) - sum(
        p.numel() for i in drop for p in dense.model.layers[i].parameters()
    )


def test_qwen2_per_layer_config_follows_the_kept_layers(tmp_path, tokenizer) -> None:
    dense = deep_family("qwen2", len(tokenizer))
    assert dense.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    drop = [0, 3]
    sliced, _ = sliced_and_masked(dense, layer_plan(dense, drop))
    for cfg in (sliced.config, sliced.model.config):
        assert cfg.num_hidden_layers == 2
        assert cfg.layer_types == ["full_attention", "sliding_attention"]  # old layers 1 and 2
        assert cfg.max_window_layers == 1  # layers below it use full attention, as before
    assert [layer.self_attn.sliding_window for layer in sliced.model.layers] == [None, 4]
    ids = ids_for(len(tokenizer))
    ref = skip_reference(dense, drop)
    assert max_diff(sliced, ref, ids) <= 1e-5
    # Guard: the attention types matter here, so a misaligned layer_types list could not pass.
    wrong = copy.deepcopy(sliced)
    wrong.model.config.layer_types = ["full_attention", "full_attention"]
    wrong.model.layers[1].self_attn.sliding_window = None
    assert max_diff(wrong, ref, ids) > 1e-4
    loaded, cfg = save_and_reload(sliced, tokenizer, tmp_path)
    assert cfg["model_type"] == "qwen2"  # uniform widths: the stock config, with two layers
    assert (cfg["num_hidden_layers"], cfg["layer_types"], cfg["max_window_layers"]) == (
        2,
        ["full_attention", "sliding_attention"],
        1,
    )
    assert_generate_matches(loaded, ref, ids[:1, :9], n=10)


def test_gemma3_layer_removal_keeps_each_layers_attention_type(tmp_path, tokenizer) -> None:
    """Gemma-3's layer_types (sliding with the local rope base, or full with the global one) follow the kept
    layers, in memory and in the saved stock config."""
    dense = deep_family("gemma3", len(tokenizer))
    assert dense.config.layer_types == ["sliding_attention", "full_attention"] * 2
    drop = [0, 3]
    sliced, _ = sliced_and_masked(dense, layer_plan(dense, drop))
    for cfg in (sliced.config, sliced.model.config):
        assert (cfg.num_hidden_layers, cfg.layer_types) == (2, ["full_attention", "sliding_attention"])
    assert [layer.self_attn.sliding_window for layer in sliced.model.layers] == [None, 4]
    ids = ids_for(len(tokenizer))
    ref = skip_reference(dense, drop)
    assert max_diff(sliced, ref, ids) <= 1e-5
    wrong = copy.deepcopy(sliced)  # guard: the attention types matter here
    wrong.model.config.layer_types = ["sliding_attention", "sliding_attention"]
    wrong.model.layers[0].self_attn.sliding_window = 4
    assert max_diff(wrong, ref, ids) > 1e-4
    loaded, cfg = save_and_reload(sliced, tokenizer, tmp_path)
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["layer_types"]) == (
        "gemma3_text",
        2,
        ["full_attention", "sliding_attention"],
    )
    assert_generate_matches(loaded, ref, ids[:1, :9], n=10)


def test_mistral_layer_removal_keeps_its_global_window(tmp_path, tokenizer) -> None:
    dense = deep_family("mistral", len(tokenizer))
    sliced, _ = sliced_and_masked(dense, layer_plan(dense, [1]))
    assert sliced.config.num_hidden_layers == 3 and sliced.config.sliding_window == 4
    assert not hasattr(sliced.config, "layer_types") or sliced.config.layer_types is None
    loaded, cfg = save_and_reload(sliced, tokenizer, tmp_path)
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["sliding_window"]) == ("mistral", 3, 4)
    assert_generate_matches(loaded, skip_reference(dense, [1]), ids_for(len(tokenizer))[:1, :9], n=10)


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_and_widths_in_one_plan_save_reload_generate(family: str, tmp_path, tokenizer) -> None:
    dense = deep_family(family, len(tokenizer))
    plan = random_plan(dense, [*HEADS_AND_WIDTHS, "layer"], seed=13)  # layers 0 and 2 go (even indices)
    assert plan.keep["layer"] == {0: [], 1: [0], 2: [], 3: [0]}
    sliced, masked = sliced_and_masked(dense, plan)
    # Reference: widths masked, then the removed layers skipped.
    ref = skip_reference(
        apply_plan(
            copy.deepcopy(dense),
            adapter_for(dense.config),
            plan_of(dense, {u: plan.keep[u] for u in HEADS_AND_WIDTHS}),
            mode="mask",
        ),
        [0, 2],
    )
    ids = ids_for(len(tokenizer))
    assert max_diff(sliced, ref, ids) <= 1e-5 and max_diff(sliced, masked, ids) <= 1e-5
    kept = [1, 3]
    assert [layer.mlp.gate_proj.out_features for layer in sliced.model.layers] == [
        len(plan.keep["mlp_channel"][i]) for i in kept
    ]
    loaded, cfg = save_and_reload(sliced, tokenizer, tmp_path)
    assert cfg["num_hidden_layers"] == 2
    if "layer_sizes" in cfg:
        assert len(cfg["layer_sizes"]) == 2
    assert_generate_matches(loaded, ref, ids[:1, :9], n=10)


def test_removing_layers_of_a_heterogeneous_model_keeps_layer_sizes(tmp_path, tokenizer) -> None:
    dense = tiny_family("llama", False, len(tokenizer))
    plan = random_plan(dense, ["attn_query_head"], seed=14, counts={0: 4, 1: 8, 2: 4})  # 1, 2, 1 per group
    hetero, _ = save_and_reload(apply_plan(copy.deepcopy(dense), adapter_for(dense.config), plan), tokenizer, tmp_path)
    assert [s["num_attention_heads"] for s in hetero.config.layer_sizes] == [4, 8, 4]
    sliced, _ = sliced_and_masked(hetero, layer_plan(hetero, [0]))
    # The decoder's own config (read at run time) drops layer 0's entry; the saved one is rebuilt from weights.
    assert [s["num_attention_heads"] for s in sliced.model.config.layer_sizes] == [8, 4]
    loaded, cfg = save_and_reload(sliced, tokenizer, tmp_path / "again")
    assert cfg["num_hidden_layers"] == 2 and [s["num_attention_heads"] for s in cfg["layer_sizes"]] == [8, 4]
    assert_generate_matches(loaded, skip_reference(hetero, [0]), ids_for(len(tokenizer))[:1, :9])


def test_layer_unit_owns_every_parameter_of_its_layer() -> None:
    model = tiny_model()
    adapter, layer = adapter_for(model.config), model.model.layers[1]
    ut = UNITS.get("layer")
    assert ut.count(adapter, layer) == 1 and ut.whole_layer
    assert ut.params_per_unit(adapter, layer) == sum(p.numel() for p in layer.parameters())


# ---------------------------------------------------------------- criteria on layers


def layer_request(layers=(0, 1, 2, 3), units=("layer",), seed=0) -> ScoreRequest:
    calib = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(5))
    return ScoreRequest(list(units), list(layers), calib, batch_size=4, seed=seed)


def test_block_influence_equals_hand_computation() -> None:
    model = tiny_model()
    req = layer_request()
    scores = CRITERIA.get("block_influence").score(model, adapter_for(model.config), req)
    # Hand computation: one forward of all windows; hidden_states[i] is layer i's input, hidden_states[i+1]
    # its output except for the last layer, whose output is the final norm's input.
    captured: list[torch.Tensor] = []
    handle = model.model.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    with torch.no_grad():
        hs = list(model(input_ids=req.calibration, output_hidden_states=True).hidden_states)
    handle.remove()
    hs[-1] = captured[0]
    for i in range(4):
        x, y = hs[i].double().reshape(-1, 48), hs[i + 1].double().reshape(-1, 48)
        cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        expected = 1.0 - cos.mean()
        assert scores[f"layer.{i}"].shape == (1,) and scores[f"layer.{i}"].dtype == torch.float64
        torch.testing.assert_close(scores[f"layer.{i}"][0], expected, rtol=1e-6, atol=1e-9)
    assert all(0.0 < float(s) < 2.0 for s in scores.values())


def test_block_influence_ranks_an_identity_layer_lowest_and_planning_removes_it() -> None:
    model = tiny_model()
    with torch.no_grad():  # layer 2 adds nothing to the residual stream
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    adapter = adapter_for(model.config)
    scores = CRITERIA.get("block_influence").score(model, adapter, layer_request(layers=(1, 2)))
    assert sorted(scores) == ["layer.1", "layer.2"]
    assert abs(float(scores["layer.2"])) <= 1e-12 and float(scores["layer.1"]) > 1e-3
    lays = layouts(model, adapter, ["layer"], [1, 2])
    target = lays[0].params_per_unit / count_params(model)
    plan = make_plan(scores, PlanRequest(target, count_params(model), lays, {}, 1e-6), "uniform")
    assert plan.keep["layer"] == {1: [0], 2: []}
    pruned = apply_plan(copy.deepcopy(model), adapter, plan)
    ids = ids_for(128)
    assert max_diff(pruned, model, ids) <= 1e-5 and count_params(pruned) == plan.params_after


def test_block_influence_refuses_width_units() -> None:
    model = tiny_model()
    with pytest.raises(PrunekitError, match="criterion 'block_influence' does not support unit type 'mlp_channel'"):
        CRITERIA.get("block_influence").score(model, adapter_for(model.config), layer_request(units=("mlp_channel",)))


@pytest.mark.parametrize("name,fn", [("l1", lambda w: w.abs().sum()), ("l2", lambda w: w.pow(2).sum())])
def test_magnitude_scores_a_layer_by_all_its_weights(name, fn) -> None:
    model = tiny_model()
    scores = CRITERIA.get(name).score(model, adapter_for(model.config), layer_request(layers=(0, 3)))
    for i in (0, 3):
        expected = sum(fn(p.double()).item() for p in model.model.layers[i].parameters())
        assert scores[f"layer.{i}"].shape == (1,)
        assert scores[f"layer.{i}"].item() == pytest.approx(expected, rel=1e-6)


def test_random_scores_one_value_per_layer() -> None:
    model = tiny_model()
    crit, adapter = CRITERIA.get("random"), adapter_for(model.config)
    a = crit.score(model, adapter, layer_request(seed=1))
    b = crit.score(model, adapter, layer_request(seed=1))
    assert sorted(a) == [f"layer.{i}" for i in range(4)] and all(v.shape == (1,) for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
