"""Allocations: kept counts against hand computations, achieved fractions, exact parameter accounting."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from test_pruning import smollm2_shaped

from prunekit.errors import PrunekitError
from prunekit.models.families import adapter_for
from prunekit.models.size import count_params
from prunekit.pruning.allocations import ALLOCATIONS, make_plan
from prunekit.pruning.plan import PlanRequest, UnitLayout
from prunekit.pruning.slicing import apply_plan, layouts, prunable_layers

ALLOCATION_NAMES = ["uniform", "global", "global_weighted"]


def kept(plan) -> dict[tuple[str, int], int]:
    return {(u, i): len(k) for u, d in plan.keep.items() for i, k in d.items()}


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Two layers, each with 4 MLP channels of 10 parameters and 2 KV groups of 30; 200 parameters in all.
WIDTH_LAYOUTS = [
    UnitLayout("mlp_channel", 0, 4, 10),
    UnitLayout("attn_kv_group", 0, 2, 30),
    UnitLayout("mlp_channel", 1, 4, 10),
    UnitLayout("attn_kv_group", 1, 2, 30),
]
WIDTH_SCORES = {
    "mlp_channel.0": t(1, 1, 1, 1),
    "mlp_channel.1": t(1, 2, 3, 6),
    "attn_kv_group.0": t(1, 3),
    "attn_kv_group.1": t(2, 2),
}


def test_global_equals_hand_computation() -> None:
    # Keys = score / layer sum * units per layer (1 = the layer's average unit):
    #   mlp 0: 1, 1, 1, 1          mlp 1: 1/3, 2/3, 1, 2      kv 0: 0.5, 1.5      kv 1: 1, 1
    # Removing the keys below 1 removes mlp 1's channels 0-1 (20) and kv 0's group 0 (30): 50 = 25% of 200.
    # (Below 2/3: 40; below 1.5: every key of 1 goes too, each layer keeping its minimum: 120.)
    plan = make_plan(WIDTH_SCORES, PlanRequest(0.25, 200, WIDTH_LAYOUTS, {}, 1e-9), "global")
    assert kept(plan) == {
        ("mlp_channel", 0): 4,
        ("attn_kv_group", 0): 1,
        ("mlp_channel", 1): 2,
        ("attn_kv_group", 1): 2,
    }
    assert plan.keep["mlp_channel"][1] == [2, 3] and plan.keep["attn_kv_group"][0] == [1]
    assert plan.params_after == 150 and plan.achieved == pytest.approx(0.25)


def test_global_weighted_equals_hand_computation() -> None:
    # z = (s - mean) / std (sample std) within each layer and unit type:
    #   mlp 0 (1,2,3,4): mean 2.5, std sqrt(5/3) -> -1.162, -0.387, 0.387, 1.162
    #   mlp 1 (1,1,1,5): mean 2, std 2          -> -0.5, -0.5, -0.5, 1.5
    #   kv 0 (1,3): -0.707, 0.707               kv 1 (2,2): constant -> 0, 0
    # Ascending, with parameters: -1.162 (10), -0.707 (30), -0.5 x3 (30), -0.387 (10), 0 (kv 1, 30 kept) ...
    # Target 35% of 200 = 70: remove everything up to -0.5 -> 10 + 30 + 30 = 70.
    scores = {**WIDTH_SCORES, "mlp_channel.0": t(1, 2, 3, 4), "mlp_channel.1": t(1, 1, 1, 5)}
    plan = make_plan(scores, PlanRequest(0.35, 200, WIDTH_LAYOUTS, {}, 1e-9), "global_weighted")
    assert kept(plan) == {
        ("mlp_channel", 0): 3,
        ("attn_kv_group", 0): 1,
        ("mlp_channel", 1): 1,
        ("attn_kv_group", 1): 2,
    }
    assert plan.params_after == 130
    # Target 50% = 100: the keys below 0 remove 80; below 0.387 kv 1's groups (z = 0) go too, down to its
    # minimum of one: 110, the closer of the two.
    plan = make_plan(scores, PlanRequest(0.5, 200, WIDTH_LAYOUTS, {}, 0.06), "global_weighted")
    assert plan.params_after == 90 and kept(plan)[("attn_kv_group", 1)] == 1


def test_global_rounds_per_group_and_keeps_a_minimum() -> None:
    # 8 query heads in 4 groups (2 each) of 5 parameters, round_to 1 per group; 100 parameters in all.
    lays = [UnitLayout("attn_query_head", 0, 8, 5, groups=4, parent="attn_kv_group")]
    scores = {"attn_query_head.0": t(1, 8, 2, 7, 3, 6, 4, 5)}  # keys: score / 36 * 8
    # One or two heads below the threshold round to none removed per group (2 * 7/8 and 2 * 6/8 round to
    # 2); three (scores 1, 2, 3) round to one per group, each group's lowest: 4 heads, 20 parameters.
    plan = make_plan(scores, PlanRequest(0.2, 100, lays, {}, 1e-9), "global")
    assert plan.keep["attn_query_head"][0] == [1, 3, 5, 7] and plan.params_after == 80
    # However high the target, every group keeps one head.
    with pytest.raises(PrunekitError, match="closest plan removes 0.2000"):
        make_plan(scores, PlanRequest(0.9, 100, lays, {}, 0.01), "global")


# Four whole layers of 120 parameters (100 of them MLP channels: 10 of 10); 1000 parameters in all.
LAYER_SCORES = {"layer.0": t(0.4), "layer.1": t(0.1), "layer.2": t(0.3), "layer.3": t(0.2)}


def layer_layouts(with_mlp: bool) -> list[UnitLayout]:
    out = [UnitLayout("layer", i, 1, 120, whole_layer=True) for i in range(4)]
    return out + ([UnitLayout("mlp_channel", i, 10, 10) for i in range(4)] if with_mlp else [])


@pytest.mark.parametrize("allocation", ALLOCATION_NAMES)
def test_layers_are_chosen_by_score_globally(allocation: str) -> None:
    # 24% of 1000 = 240 = two layers: the two lowest-scored (1 and 3) go, no "at least one" per layer.
    plan = make_plan(LAYER_SCORES, PlanRequest(0.24, 1000, layer_layouts(False), {}, 1e-9), allocation)
    assert plan.keep["layer"] == {0: [0], 1: [], 2: [0], 3: []}
    assert plan.layer_ratios["layer"] == {0: 0.0, 1: 1.0, 2: 0.0, 3: 1.0}


def test_uniform_layers_alone_take_the_closest_count() -> None:
    # 32% = 320: two layers remove 240 (80 short), three remove 360 (40 over) -> three.
    plan = make_plan(LAYER_SCORES, PlanRequest(0.32, 1000, layer_layouts(False), {}, 0.05), "uniform")
    assert plan.keep["layer"] == {0: [0], 1: [], 2: [], 3: []} and plan.params_after == 640


def test_uniform_layers_then_widths_close_the_gap() -> None:
    # 30% = 300: layers 1 and 3 fit (240); the MLPs of the two remaining layers give the other 60 at the
    # same ratio: 3 of 10 channels each. The removed layers' MLPs stay listed whole (they go with the layer).
    scores = {**LAYER_SCORES, **{f"mlp_channel.{i}": torch.arange(10, dtype=torch.float64) for i in range(4)}}
    plan = make_plan(scores, PlanRequest(0.3, 1000, layer_layouts(True), {}, 1e-9), "uniform")
    assert plan.keep["layer"] == {0: [0], 1: [], 2: [0], 3: []}
    assert {i: len(k) for i, k in plan.keep["mlp_channel"].items()} == {0: 7, 1: 10, 2: 7, 3: 10}
    assert plan.keep["mlp_channel"][0] == list(range(3, 10)) and plan.params_after == 700


def test_nested_units_are_counted_once() -> None:
    # One layer: 2 KV groups of 50 parameters, each holding 2 query heads of 20 (and 10 of k/v).
    lays = [
        UnitLayout("attn_kv_group", 0, 2, 50),
        UnitLayout("attn_query_head", 0, 4, 20, groups=2, parent="attn_kv_group"),
    ]
    scores = {"attn_kv_group.0": t(1, 2), "attn_query_head.0": t(1, 2, 3, 4)}
    # Keeping 1 group and 1 head per group leaves one group with one head: 20 + 10 = 30 of 100 kept.
    plan = make_plan(scores, PlanRequest(0.7, 100, lays, {}, 1e-9), "uniform")
    assert kept(plan) == {("attn_kv_group", 0): 1, ("attn_query_head", 0): 2}
    assert plan.params_after == 30


# ---------------------------------------------------------------- SmolLM2-shaped model


def smollm2_request(units: list[str], target: float, tolerance: float = 0.01):
    model = smollm2_shaped()
    adapter = adapter_for(model.config)
    lays = layouts(model, adapter, units, prunable_layers(30, 3, 2))
    gen = torch.Generator().manual_seed(7)
    scores = {f"{lay.unit}.{lay.layer}": torch.rand(lay.count, generator=gen, dtype=torch.float64) for lay in lays}
    round_to = {"mlp_channel": 8, "attn_kv_group": 1, "attn_query_head": 1}
    return scores, PlanRequest(target, count_params(model), lays, round_to, tolerance)


@pytest.mark.parametrize("allocation", ALLOCATION_NAMES)
@pytest.mark.parametrize("units", [["attn_kv_group", "mlp_channel"], ["attn_query_head", "mlp_channel"]])
@pytest.mark.parametrize("target", [0.2, 0.5])
def test_smollm2_widths_within_one_point(allocation: str, units: list[str], target: float) -> None:
    scores, req = smollm2_request(units, target)
    plan = make_plan(scores, req, allocation)  # raises beyond prune.tolerance = 0.01
    assert abs(plan.achieved - target) <= 0.01
    assert all(len(k) % 8 == 0 and len(k) >= 8 for k in plan.keep["mlp_channel"].values())
    if "attn_query_head" in units:  # 9 query heads in 3 KV groups: the same count in each
        for k in plan.keep["attn_query_head"].values():
            assert len(k) % 3 == 0 and torch.bincount(torch.tensor(k) // 3, minlength=3).unique().numel() == 1
    widths = {len(k) for k in plan.keep["mlp_channel"].values()}
    assert (len(widths) == 1) == (allocation == "uniform")  # global allocations give layers different widths


LAYER_PARAMS = 3_540_096  # one SmolLM2 decoder layer: 884,736 attention + 2,654,208 MLP + 1,152 norms


@pytest.mark.parametrize("allocation", ALLOCATION_NAMES)
def test_smollm2_layers(allocation: str) -> None:
    total = 134_515_008
    scores, req = smollm2_request(["layer"], 0.5)
    plan = make_plan(scores, req, allocation)
    assert abs(plan.achieved - 0.5) <= 0.01 and plan.params_before - plan.params_after == 19 * LAYER_PARAMS
    lowest = sorted(scores, key=lambda k: float(scores[k]))[:19]
    assert sorted(f"layer.{i}" for i, k in plan.keep["layer"].items() if not k) == sorted(lowest)
    # At 0.2 no whole number of layers is within one point (7.6 layers of 2.63% each): the closest, 8
    # layers, is 1.05 points over; the planner finds it and the 1-point tolerance refuses it.
    assert abs(8 * LAYER_PARAMS / total - 0.2) > 0.01
    plan = make_plan(*smollm2_request(["layer"], 0.2, tolerance=0.011), allocation)
    assert plan.params_before - plan.params_after == 8 * LAYER_PARAMS
    with pytest.raises(PrunekitError, match="closest plan removes 0.2105"):
        make_plan(*smollm2_request(["layer"], 0.2), allocation)


# ---------------------------------------------------------------- plans applied to a real model


@pytest.mark.parametrize("allocation", ALLOCATION_NAMES)
@pytest.mark.parametrize(
    "units",
    [
        ["attn_kv_group", "attn_query_head", "mlp_channel"],
        ["layer", "attn_kv_group", "attn_query_head", "mlp_channel"],
    ],
)
def test_plan_counts_equal_the_sliced_model(allocation: str, units: list[str]) -> None:
    """params_after is exact: nested query heads and removed layers are not counted twice."""
    model = tiny_model()
    adapter = adapter_for(model.config)
    lays = layouts(model, adapter, units, [0, 1, 2, 3])
    gen = torch.Generator().manual_seed(8)
    scores = {f"{lay.unit}.{lay.layer}": torch.rand(lay.count, generator=gen, dtype=torch.float64) for lay in lays}
    plan = make_plan(scores, PlanRequest(0.35, count_params(model), lays, {}, 0.05), allocation)
    pruned = apply_plan(copy.deepcopy(model), adapter, plan)
    assert count_params(pruned) == plan.params_after
    kept_layers = [i for i, k in plan.keep.get("layer", {i: [0] for i in range(4)}).items() if k]
    assert len(pruned.model.layers) == len(kept_layers)
    # The overlap the accounting must handle is there: a layer losing KV groups and query heads, or a
    # removed layer beside pruned widths (the allocations leave the widths of removed layers whole).
    qh, kv = plan.keep["attn_query_head"], plan.keep["attn_kv_group"]
    if "layer" in units:
        assert len(kept_layers) < 4 and any(len(kv[i]) < 4 for i in kept_layers), plan.keep
    else:
        assert any(len(qh[i]) < 8 and len(kv[i]) < 4 for i in kept_layers), plan.keep


def test_allocations_are_registered() -> None:
    assert set(ALLOCATION_NAMES) <= set(ALLOCATIONS.names())
