"""Within-head units (TransAct): q/k rotary pairs and v/o dims per KV group.

A model sliced along these units must compute what the dense model computes with the same dims zeroed,
save a config that rebuilds it, keep a smaller KV cache, and be scored by the member-based criteria.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from test_families import tiny_family
from test_pruning import assert_generate_matches, logits
from transformers.models.llama.modeling_llama import LlamaAttention

from prunekit.errors import PrunekitError
from prunekit.models.compat import cache_of
from prunekit.models.families import ADAPTERS, adapter_for
from prunekit.models.loading import load_pretrained
from prunekit.models.modeling import HeadDimAttention, check_layer_sizes
from prunekit.models.saving import save_model
from prunekit.models.size import count_params
from prunekit.pruning.allocations import make_plan
from prunekit.pruning.criteria import CRITERIA
from prunekit.pruning.criteria.base import ScoreRequest
from prunekit.pruning.plan import Plan, PlanRequest
from prunekit.pruning.slicing import apply_plan, layouts
from prunekit.pruning.units import UNITS

FAMILIES = ADAPTERS.names()


def supports(family: str, units: list[str]) -> bool:
    return all(u not in ADAPTERS.get(family).refused_units for u in units)


def head_units(family: str) -> list[str]:
    """The head-dim unit types the family declares (q/k dims are refused where per-head q/k norms run)."""
    return [u for u in HEAD_DIM_UNITS if supports(family, [u])]


HEAD_DIM_UNITS = ["attn_qk_dim", "attn_vo_dim"]
# Tiny models (tests/test_families.py): 8 query heads, 4 k/v heads (n_rep 2), head_dim 8 -> 4 rotary pairs.
KV, N_REP, HD = 4, 2, 8


def grouped_plan(model, units: list[str], seed: int, per_group: dict[str, list[int]] | None = None) -> Plan:
    """Random kept units, the same number in every group of a layer: ``per_group[unit][layer]``, else a
    quarter, a half or three quarters of each group, varying with the layer. Indices number the dense
    model's units, whatever the order of ``units`` (apply_plan orders the unit types).
    """
    adapter = adapter_for(model.config)
    gen = torch.Generator().manual_seed(seed)
    keep: dict[str, dict[int, list[int]]] = {}
    for unit in units:
        ut = UNITS.get(unit)
        for idx, layer in enumerate(adapter.layers(model)):
            n, groups = ut.count(adapter, layer), ut.groups(adapter, layer)
            size = n // groups
            counts = (per_group or {}).get(unit)
            k = counts[idx] if counts else max(1, size * (1 + (seed + idx) % 3) // 4)
            kept = [g * size + int(i) for g in range(groups) for i in torch.randperm(size, generator=gen)[:k]]
            keep.setdefault(unit, {})[idx] = sorted(kept)
    total = count_params(model)
    return Plan(keep=keep, params_before=total, params_after=total, target=0.0, allocation="test")


def masked_and_sliced(dense, plan: Plan):
    adapter = adapter_for(dense.config)
    masked = apply_plan(copy.deepcopy(dense), adapter, plan, mode="mask")
    sliced = apply_plan(copy.deepcopy(dense), adapter, plan, mode="slice")
    return masked, sliced


def random_ids(batch: int = 3, length: int = 17, vocab: int = 160) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


# KV groups listed first: the plan's order must not matter (head dims are applied inside whole KV groups).
UNIT_SETS = {
    "qk": ["attn_qk_dim"],
    "vo": ["attn_vo_dim"],
    "qk+vo": HEAD_DIM_UNITS,
    "kv+mlp+qk+vo": ["attn_kv_group", "mlp_channel", *HEAD_DIM_UNITS],
    "kv+heads+qk+vo": ["attn_kv_group", "attn_query_head", *HEAD_DIM_UNITS],
}


@pytest.mark.parametrize(
    ("family", "units"),
    [
        pytest.param(f, units, id=f"{f}-{key}")
        for f in FAMILIES
        for key, units in UNIT_SETS.items()
        if supports(f, units)
    ],
)
def test_sliced_equals_masked_dense(family: str, units: list[str]) -> None:
    dense = tiny_family(family, False, 160)
    plan = grouped_plan(dense, units, seed=1)
    masked, sliced = masked_and_sliced(dense, plan)
    ids = random_ids()
    assert count_params(sliced) < count_params(dense)
    assert (logits(sliced, ids) - logits(masked, ids)).abs().max().item() <= 1e-5
    # Not vacuous: the masked model differs from the dense one.
    assert (logits(masked, ids) - logits(dense, ids)).abs().max().item() > 1e-3
    adapter = adapter_for(dense.config)
    for idx, layer in enumerate(adapter.layers(sliced)):
        attn = adapter.attention(layer)
        kv = len(plan.keep["attn_kv_group"][idx]) if "attn_kv_group" in plan.keep else KV
        n_rep = len(plan.keep["attn_query_head"][idx]) // KV if "attn_query_head" in plan.keep else N_REP
        qk = 2 * len(plan.keep["attn_qk_dim"][idx]) // KV if "attn_qk_dim" in plan.keep else HD
        v = len(plan.keep["attn_vo_dim"][idx]) // KV if "attn_vo_dim" in plan.keep else HD
        assert (attn.k_proj.out_features, attn.v_proj.out_features) == (kv * qk, kv * v)
        assert (attn.q_proj.out_features, attn.o_proj.in_features) == (kv * n_rep * qk, kv * n_rep * v)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_implementations_match_mask(implementation: str) -> None:
    dense = tiny_family("llama", False, 160)
    dense.set_attn_implementation(implementation)
    masked, sliced = masked_and_sliced(dense, grouped_plan(dense, HEAD_DIM_UNITS, seed=2))
    ids = random_ids()
    with torch.no_grad():
        out = sliced(input_ids=ids, output_attentions=True)
    assert (out.logits - logits(masked, ids)).abs().max().item() <= 1e-5
    # The implementation really ran: only eager returns attention weights, (B, H, T, T).
    weights = [w for w in out.attentions or () if w is not None]
    assert bool(weights) is (implementation == "eager")
    assert all(w.shape == (3, KV * N_REP, 17, 17) for w in weights)


def test_plan_keeps_the_same_count_in_every_kv_group() -> None:
    dense = tiny_family("llama", False, 160)
    adapter = adapter_for(dense.config)
    units = [*HEAD_DIM_UNITS, "attn_kv_group", "mlp_channel"]
    lays = layouts(dense, adapter, units, [1, 2])
    gen = torch.Generator().manual_seed(3)
    scores = {f"{lay.unit}.{lay.layer}": torch.rand(lay.count, generator=gen, dtype=torch.float64) for lay in lays}
    plan = make_plan(scores, PlanRequest(0.15, count_params(dense), lays, {}, 0.02), "uniform")
    for unit in HEAD_DIM_UNITS:
        assert {lay.groups for lay in lays if lay.unit == unit} == {KV}
        size = {"attn_qk_dim": HD // 2, "attn_vo_dim": HD}[unit]  # units per KV group
        for keep in plan.keep[unit].values():
            per_group = torch.bincount(torch.tensor(keep) // size, minlength=KV)
            assert len(per_group) == KV and len(set(per_group.tolist())) == 1 and per_group[0] > 0
    assert len(plan.keep["attn_qk_dim"][1]) < KV * HD // 2  # something was removed
    sliced = apply_plan(copy.deepcopy(dense), adapter, plan)
    # params_per_unit counts what slicing removes; a removed KV group takes its dims with it (``parent``).
    assert count_params(sliced) == plan.params_after


def test_unequal_group_counts_are_rejected() -> None:
    dense = tiny_family("llama", False, 160)
    plan = grouped_plan(dense, ["attn_qk_dim"], seed=4)
    plan.keep["attn_qk_dim"][0] = [0, 1, 4, 8, 12]  # group 0 keeps two pairs, the others one
    with pytest.raises(PrunekitError, match=r"keeps \[2, 1, 1, 1\]"):
        apply_plan(copy.deepcopy(dense), adapter_for(dense.config), plan)
    # The unit refuses it too when called directly (not through apply_plan's check).
    layer = dense.model.layers[0]
    with pytest.raises(PrunekitError, match=r"attn_qk_dim in layer 0 keeps \[2, 1, 1, 1\] units in its 4 KV groups"):
        UNITS.get("attn_qk_dim").apply(adapter_for(dense.config), layer, torch.tensor([0, 1, 4, 8, 12]), "slice")


def test_pruning_twice_composes_rotary_pairs_and_kv_groups() -> None:
    """Slice q/k pairs, slice again by the pruned layout, then drop KV groups: equals one dense mask."""
    dense = tiny_family("llama", False, 160)
    adapter = adapter_for(dense.config)
    first = {0: [[1, 2, 3], [0, 1, 3], [0, 2, 3], [0, 1, 2]]}  # dense pairs kept per group (layer 0)
    second = {0: [[0, 2], [1, 2], [0, 1], [0, 2]]}  # positions in the first stage's kept pairs
    kv_keep = [0, 2, 3]

    def plan_of(unit: str, per_layer: dict[int, list[int]]) -> Plan:
        return Plan(keep={unit: per_layer}, params_before=1, params_after=1, target=0.0, allocation="test")

    sliced = copy.deepcopy(dense)
    apply_plan(sliced, adapter, plan_of("attn_qk_dim", {0: [g * 4 + p for g, ps in enumerate(first[0]) for p in ps]}))
    apply_plan(sliced, adapter, plan_of("attn_qk_dim", {0: [g * 3 + p for g, ps in enumerate(second[0]) for p in ps]}))
    apply_plan(sliced, adapter, plan_of("attn_kv_group", {0: kv_keep}))
    dense_pairs = [[first[0][g][p] for p in second[0][g]] for g in range(KV)]
    masked = copy.deepcopy(dense)
    apply_plan(
        masked, adapter, plan_of("attn_qk_dim", {0: [g * 4 + p for g in range(KV) for p in dense_pairs[g]]}), "mask"
    )
    apply_plan(masked, adapter, plan_of("attn_kv_group", {0: kv_keep}), "mask")
    ids = random_ids()
    assert (logits(sliced, ids) - logits(masked, ids)).abs().max().item() <= 1e-5
    sizes = adapter.layer_sizes(sliced, 0)
    assert sizes.rope_pairs == tuple(tuple(dense_pairs[g]) for g in kv_keep)
    assert (sizes.num_key_value_heads, sizes.qk_head_dim, sizes.v_head_dim) == (3, 4, HD)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_reload_generate_matches_masked(family: str, tmp_path, tokenizer) -> None:
    dense = tiny_family(family, True, len(tokenizer))
    adapter = adapter_for(dense.config)
    units = head_units(family)  # Qwen3, Gemma-3: v/o dims alone (their q/k norms run over whole heads)
    plan = grouped_plan(dense, [*units, "attn_kv_group", "mlp_channel"], seed=5)
    for unit in units:
        plan.keep[unit].pop(0)  # layer 0 keeps its head dims: its attention must stay stock
    masked, sliced = masked_and_sliced(dense, plan)
    save_model(sliced, adapter, tokenizer, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == dense.config.model_type
    assert "qk_head_dim" not in cfg["layer_sizes"][0]
    for idx in (1, 2):
        entry = cfg["layer_sizes"][idx]
        kept_qk = plan.keep["attn_qk_dim"][idx] if "attn_qk_dim" in units else range(KV * HD // 2)
        assert entry["qk_head_dim"] == 2 * len(kept_qk) // KV
        assert entry["v_head_dim"] == len(plan.keep["attn_vo_dim"][idx]) // KV
        pairs = [[p % 4 for p in kept_qk if p // 4 == g] for g in plan.keep["attn_kv_group"][idx]]
        assert entry["rope_pairs"] == pairs
    assert "model.layers.1.self_attn.rope_index" in load_file(tmp_path / "model.safetensors")
    loaded = load_pretrained(tmp_path).eval()
    assert type(loaded) is ADAPTERS.get(family).pruned[2]
    attns = [layer.self_attn for layer in loaded.model.layers]
    assert not isinstance(attns[0], HeadDimAttention) and all(isinstance(a, HeadDimAttention) for a in attns[1:])
    ids = tokenizer("def f(x):\n    return x + 1", return_tensors="pt")["input_ids"]
    assert (logits(loaded, ids) - logits(masked, ids)).abs().max().item() <= 1e-5
    assert_generate_matches(loaded, masked, ids)


def test_uniform_head_dims_save_a_prunekit_config(tmp_path, tokenizer) -> None:
    """Every layer equally pruned is still not a stock config: stock attention has one head_dim."""
    dense = tiny_family("llama", False, len(tokenizer))
    plan = grouped_plan(dense, HEAD_DIM_UNITS, seed=6, per_group={"attn_qk_dim": [2] * 3, "attn_vo_dim": [5] * 3})
    masked, sliced = masked_and_sliced(dense, plan)
    save_model(sliced, adapter_for(dense.config), tokenizer, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert {(e["qk_head_dim"], e["v_head_dim"]) for e in cfg["layer_sizes"]} == {(4, 5)}
    loaded = load_pretrained(tmp_path).eval()
    ids = tokenizer("import os", return_tensors="pt")["input_ids"]
    assert_generate_matches(loaded, masked, ids)


def test_model_without_head_dim_pruning_is_unchanged() -> None:
    dense = tiny_family("llama", False, 160)
    adapter = adapter_for(dense.config)
    plan = grouped_plan(dense, ["attn_kv_group", "mlp_channel"], seed=7)
    full = {i: list(range(KV * HD // 2)) for i in range(3)}  # every pair kept: nothing to prune
    plan.keep = {"attn_qk_dim": full, **plan.keep}
    sliced = apply_plan(copy.deepcopy(dense), adapter, plan)
    assert all(type(layer.self_attn) is LlamaAttention for layer in sliced.model.layers)
    assert all(not s.head_dims_pruned for s in adapter.all_layer_sizes(sliced))
    assert all(
        set(e) == {"num_attention_heads", "num_key_value_heads", "intermediate_size"} for e in sliced.config.layer_sizes
    )


def kv_cache_bytes_per_token(model, ids: torch.Tensor) -> int:
    with torch.no_grad():
        cache = cache_of(model(input_ids=ids, use_cache=True))
    total = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return total // ids.numel()


def test_kv_cache_shrinks_with_k_and_v_widths() -> None:
    dense = tiny_family("llama", False, 160)
    adapter = adapter_for(dense.config)
    plan = grouped_plan(dense, [*HEAD_DIM_UNITS, "attn_kv_group"], seed=8)
    sliced = apply_plan(copy.deepcopy(dense), adapter, plan)
    ids = random_ids(2, 9)
    expected = 0
    with torch.no_grad():
        cache = cache_of(sliced(input_ids=ids, use_cache=True))
    for idx, sizes in enumerate(adapter.all_layer_sizes(sliced)):
        kv, qk, v = sizes.num_key_value_heads, sizes.qk_head_dim, sizes.v_head_dim
        assert cache.layers[idx].keys.shape == (2, kv, 9, qk)
        assert cache.layers[idx].values.shape == (2, kv, 9, v)
        expected += kv * (qk + v) * 4  # float32
    assert kv_cache_bytes_per_token(sliced, ids) == expected
    assert kv_cache_bytes_per_token(dense, ids) == 3 * KV * 2 * HD * 4
    assert expected < 3 * KV * 2 * HD * 4


def _score(model, criterion: str, units: list[str], layer: int, ids: torch.Tensor):
    req = ScoreRequest(units=units, layers=[layer], calibration=ids, batch_size=ids.shape[0], seed=0)
    return CRITERIA.get(criterion).score(model, adapter_for(model.config), req)


def _qk_pair_by_hand(attn, values: dict[str, torch.Tensor], g: int, p: int, qk: int) -> float:
    """Sum of ``values`` over pair p of group g: dims p and p + qk/2 of its k head and of its query heads."""
    dims = [p, p + qk // 2]
    total = 0.0
    for proj, heads in (("q_proj", range(g * N_REP, (g + 1) * N_REP)), ("k_proj", [g])):
        for name in ("weight", "bias"):
            if f"{proj}.{name}" in values:
                rows = [h * qk + d for h in heads for d in dims]
                total += values[f"{proj}.{name}"][rows].sum().item()
    return total


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k biases belong to the pair too
def test_l1_of_one_qk_pair_equals_hand_computation(family: str) -> None:
    dense = tiny_family(family, False, 160)
    attn = dense.model.layers[1].self_attn
    values = {n: p.detach().abs().double() for n, p in attn.named_parameters()}
    scores = _score(dense, "l1", ["attn_qk_dim", "attn_vo_dim"], 1, random_ids())
    g, p = 2, 1
    assert scores["attn_qk_dim.1"][g * 4 + p].item() == pytest.approx(
        _qk_pair_by_hand(attn, values, g, p, HD), rel=1e-6
    )
    # A v/o unit: v row g*8+d (and its bias) and o_proj column h*8+d of the group's query heads.
    d = 5
    by_hand = values["v_proj.weight"][g * HD + d].sum() + values["o_proj.weight"][:, [h * HD + d for h in (4, 5)]].sum()
    if "v_proj.bias" in values:
        by_hand += values["v_proj.bias"][g * HD + d]
    assert scores["attn_vo_dim.1"][g * HD + d].item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_l1_follows_the_pruned_layout() -> None:
    """After slicing, pair p of group g is at dims p and p + qk/2 of the narrower heads."""
    dense = tiny_family("llama", False, 160)
    plan = grouped_plan(dense, [*HEAD_DIM_UNITS, "attn_kv_group"], seed=9, per_group={"attn_qk_dim": [3] * 3})
    sliced = apply_plan(copy.deepcopy(dense), adapter_for(dense.config), plan)
    attn = sliced.model.layers[2].self_attn
    values = {n: p.detach().abs().double() for n, p in attn.named_parameters()}
    scores = _score(sliced, "l1", ["attn_qk_dim"], 2, random_ids())["attn_qk_dim.2"]
    kv = attn.k_proj.out_features // 6
    assert scores.shape == (kv * 3,)
    for g in range(kv):
        for p in range(3):
            assert scores[g * 3 + p].item() == pytest.approx(_qk_pair_by_hand(attn, values, g, p, 6), rel=1e-6)


def test_param_first_and_random_score_head_dim_units() -> None:
    dense = tiny_family("qwen2", False, 160)
    ids = random_ids(2, 12)
    model = copy.deepcopy(dense)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    attn = model.model.layers[1].self_attn
    values = {n: (p.detach() * p.grad).abs().double() for n, p in attn.named_parameters()}
    scores = _score(copy.deepcopy(dense), "param_first", HEAD_DIM_UNITS, 1, ids)
    for g, p in ((0, 0), (3, 2)):
        assert scores["attn_qk_dim.1"][g * 4 + p].item() == pytest.approx(
            _qk_pair_by_hand(attn, values, g, p, HD), rel=1e-6
        )
    # Every v_proj/o_proj entry belongs to exactly one v/o unit: the scores add up to the whole.
    whole = sum(v.sum().item() for n, v in values.items() if n.startswith(("v_proj", "o_proj.weight")))
    assert scores["attn_vo_dim.1"].sum().item() == pytest.approx(whole, rel=1e-6)
    rand = _score(dense, "random", HEAD_DIM_UNITS, 1, ids)
    assert rand["attn_qk_dim.1"].shape == (KV * HD // 2,) and rand["attn_vo_dim.1"].shape == (KV * HD,)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"qk_head_dim": 4, "v_head_dim": 8}, "give all of"),
        ({"qk_head_dim": 3, "v_head_dim": 8, "rope_pairs": [[0]] * 4}, "qk_head_dim=3 must be even"),
        ({"qk_head_dim": 4, "v_head_dim": 8, "rope_pairs": [[0, 1]] * 3}, "must list 2 pairs for each of 4"),
        ({"qk_head_dim": 4, "v_head_dim": 8, "rope_pairs": [[1, 0]] * 4}, "must be ascending, distinct"),
        ({"qk_head_dim": 4, "v_head_dim": 8, "rope_pairs": [[0, 4]] * 4}, r"in \[0, 4\)"),
    ],
)
def test_layer_sizes_reject_inconsistent_head_dims(entry: dict, message: str) -> None:
    config = copy.copy(tiny_family("llama", False, 160).config)
    object.__setattr__(config, "layer_sizes", [{}, {}, entry])
    with pytest.raises(ValueError, match=message):
        check_layer_sizes(config)


def test_head_dim_attention_is_built_from_a_layer_config() -> None:
    """The subclass built from config widths has the widths and rotary index the config names."""
    cfg = copy.copy(tiny_family("llama", False, 160).config)
    for key, value in {"qk_head_dim": 4, "v_head_dim": 3, "rope_pairs": [[0, 3], [1, 2], [0, 1], [2, 3]]}.items():
        object.__setattr__(cfg, key, value)
    attn = ADAPTERS.get("llama").pruned.attention(cfg, 0)
    assert (attn.q_proj.out_features, attn.k_proj.out_features) == (8 * 4, 4 * 4)
    assert (attn.v_proj.out_features, attn.o_proj.in_features) == (4 * 3, 8 * 3)
    assert attn.rope_index.tolist()[0] == [0, 3, 4, 7] and attn.scaling == HD**-0.5
    assert attn.rope_pairs() == ((0, 3), (1, 2), (0, 1), (2, 3))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("allocation", "target"), [("uniform", 0.3), ("global_weighted", 0.4)])
def test_query_heads_and_head_dims_in_one_plan(
    family: str, allocation: str, target: float, tmp_path, tokenizer
) -> None:
    """KV groups, query heads inside them and both head dims in one plan: the planner's parameter count is the
    sliced model's (q_proj and o_proj are sliced by three unit types: counted once), the sliced model equals the
    masked one, and it saves, reloads and generates the same."""
    dense = tiny_family(family, True, len(tokenizer))
    adapter = adapter_for(dense.config)
    units = ["attn_kv_group", "attn_query_head", *head_units(family), "mlp_channel"]
    lays = layouts(dense, adapter, units, [1, 2])
    gen = torch.Generator().manual_seed(3)
    scores = {f"{lay.unit}.{lay.layer}": torch.rand(lay.count, generator=gen) for lay in lays}
    plan = make_plan(scores, PlanRequest(target, count_params(dense), lays, {}, 0.02), allocation)
    assert all(len(plan.keep["attn_query_head"][i]) < KV * N_REP for i in (1, 2))  # query heads are cut ...
    assert any(len(plan.keep[u][i]) < KV * 4 for u in head_units(family) for i in (1, 2))  # ... and head dims
    masked, sliced = masked_and_sliced(dense, plan)
    assert count_params(sliced) == plan.params_after
    save_model(sliced, adapter, tokenizer, tmp_path)
    loaded = load_pretrained(tmp_path).eval()
    ids = tokenizer("def f(x):\n    return x + 1", return_tensors="pt")["input_ids"]
    assert (logits(loaded, ids) - logits(masked, ids)).abs().max().item() <= 1e-5
    assert_generate_matches(loaded, masked, ids)
