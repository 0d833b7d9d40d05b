"""Hidden-channel units (LLM-Pruner channel-wise): members, scores, planning, slicing and save/reload."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import tiny_model
from huggingface_hub.errors import StrictDataclassClassValidationError
from test_families import tiny_family
from test_pruning import assert_generate_matches, logits, save_and_reload
from transformers import LlamaForCausalLM

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ROOT_ATTR
from prunekit.models.families import ADAPTERS, adapter_for
from prunekit.models.size import count_params
from prunekit.pruning.allocations import make_plan
from prunekit.pruning.criteria import CRITERIA, ScoreRequest
from prunekit.pruning.plan import Plan, PlanRequest
from prunekit.pruning.slicing import apply_plan, layouts, prunable_layers
from prunekit.pruning.units import UNITS
from prunekit.pruning.units.hidden import hidden_norms

D = 48  # hidden size of every tiny model
HC = "hidden_channel"


def hidden_plan(model, kept: list[int], idx: int = 1) -> Plan:
    total = count_params(model)
    return Plan(keep={HC: {idx: kept}}, params_before=total, params_after=total, target=0.0, allocation="test")


def random_kept(n_kept: int, seed: int = 0) -> list[int]:
    return sorted(torch.randperm(D, generator=torch.Generator().manual_seed(seed))[:n_kept].tolist())


def hidden_states(model, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states


def ids_for(vocab: int) -> torch.Tensor:
    return torch.randint(1, vocab, (2, 13), generator=torch.Generator().manual_seed(5))


# ---------------------------------------------------------------- members and scores


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_members_are_every_parameter_with_a_hidden_axis(tie: bool, bias: bool) -> None:
    """In the tiny model only hidden-dim axes have size 48, so the members must be exactly the parameters
    with an axis of size 48, along that axis; the parameter count per channel is the hand count."""
    model = tiny_model(tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias)
    adapter = adapter_for(model.config)
    ut, layer = UNITS.get(HC), adapter.layers(model)[2]
    members = ut.members(adapter, layer)
    by_name = {m.path.removeprefix(f"{ROOT_ATTR}."): m for m in members}
    expected = {n: p.shape.index(D) for n, p in model.named_parameters() if D in p.shape}
    assert {n: m.dim for n, m in by_name.items()} == expected
    assert len(by_name) == len(members)  # a tied lm_head is not listed twice
    assert all(layer.get_parameter(m.path) is model.get_parameter(n) for n, m in by_name.items())
    # Per layer: 2 norms + q 64 + k 32 + v 32 + gate 64 + up 64 (columns) + o 64 + down 64 (rows) [+ 2 biases];
    # embedding 128, final norm 1, untied lm_head 128.
    per_layer = 2 + 64 + 32 + 32 + 64 + 64 + 64 + 64 + (2 if bias else 0)
    assert ut.count(adapter, layer) == D
    assert ut.params_per_unit(adapter, layer) == 4 * per_layer + 128 + 1 + (0 if tie else 128)


def hand_sum(model, c: int, f) -> float:
    """sum of f(param) over everything hidden channel ``c`` holds, written out module by module."""
    with torch.no_grad():
        return _hand_sum(model, c, f)


def _hand_sum(model, c: int, f) -> float:
    m = model.model
    total = f(m.embed_tokens.weight)[:, c].sum() + f(m.norm.weight)[c]
    for layer in m.layers:
        a, mlp = layer.self_attn, layer.mlp
        total += f(layer.input_layernorm.weight)[c] + f(layer.post_attention_layernorm.weight)[c]
        for lin in (a.q_proj, a.k_proj, a.v_proj, mlp.gate_proj, mlp.up_proj):
            total += f(lin.weight)[:, c].sum()
        total += f(a.o_proj.weight)[c].sum() + f(mlp.down_proj.weight)[c].sum()
    if model.lm_head.weight is not m.embed_tokens.weight:
        total += f(model.lm_head.weight)[:, c].sum()
    return float(total)


@pytest.mark.parametrize("tie", [False, True])
def test_l1_score_is_the_hand_sum_and_scored_once(tie: bool) -> None:
    model = tiny_model(tie_word_embeddings=tie)
    adapter = adapter_for(model.config)
    req = ScoreRequest(units=[HC], layers=[1, 2], calibration=torch.zeros(1, 4, dtype=torch.long), batch_size=1, seed=0)
    scores = CRITERIA.get("l1").score(model, adapter, req)
    assert list(scores) == [f"{HC}.0"]  # model-wide: scored once, named by layer 0
    assert scores[f"{HC}.0"].shape == (D,)
    for c in (0, 17, 47):
        assert scores[f"{HC}.0"][c].item() == pytest.approx(hand_sum(model, c, torch.abs), rel=1e-6)
    # The embedding column alone is a large part; a score missing it (or lm_head) would not match.
    assert hand_sum(model, 17, torch.abs) - model.model.embed_tokens.weight[:, 17].abs().sum() > 0
    rnd = CRITERIA.get("random").score(model, adapter, req)
    assert list(rnd) == [f"{HC}.0"] and rnd[f"{HC}.0"].shape == (D,)


def test_param_first_is_the_hand_sum_of_weight_times_gradient() -> None:
    model = tiny_model()
    adapter = adapter_for(model.config)
    calib = torch.randint(1, 128, (3, 9), generator=torch.Generator().manual_seed(1))
    req = ScoreRequest(units=[HC], layers=[1], calibration=calib, batch_size=2, seed=0)
    scores = CRITERIA.get("param_first").score(model, adapter, req)[f"{HC}.0"]
    ref = copy.deepcopy(model)
    ref(input_ids=calib, labels=calib).loss.backward()  # the mean NLL over all windows (equal lengths)
    grads = {id(p): p.grad for p in ref.parameters()}
    for c in (3, 30):
        expected = hand_sum(ref, c, lambda p: (p.detach() * grads[id(p)]).abs())
        assert scores[c].item() == pytest.approx(expected, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())  # the criterion leaves no gradients behind


# ---------------------------------------------------------------- slicing equals masking


@pytest.mark.parametrize(
    "family", [f for f in ADAPTERS.names() if "hidden_channel" not in ADAPTERS.get(f).refused_units]
)
@pytest.mark.parametrize("tie", [False, True])
def test_sliced_equals_masked_and_the_residual_is_zero_where_removed(family: str, tie: bool) -> None:
    """Masking zeroes the channels everywhere, so the residual stream is exactly zero there at every layer;
    the sliced model's residual stream is the masked one's kept channels. The norm rescaling (weights and
    epsilon, see units/hidden.py) makes this exact: the tolerance is float32 rounding only."""
    dense = tiny_family(family, tie, 160)
    adapter = adapter_for(dense.config)
    kept = random_kept(37, seed=2)
    dropped = sorted(set(range(D)) - set(kept))
    masked = apply_plan(copy.deepcopy(dense), adapter, hidden_plan(dense, kept), mode="mask")
    sliced = apply_plan(copy.deepcopy(dense), adapter, hidden_plan(dense, kept), mode="slice")
    ids = ids_for(160)
    hs_masked, hs_sliced = hidden_states(masked, ids), hidden_states(sliced, ids)
    for m, s in zip(hs_masked[:-1], hs_sliced[:-1]):  # the last entry is after the final norm
        assert torch.equal(m[..., dropped], torch.zeros_like(m[..., dropped]))
        assert s.shape[-1] == 37
        assert (s - m[..., kept]).abs().max().item() <= 1e-5 * max(1.0, m.abs().max().item())
    assert (logits(sliced, ids) - logits(masked, ids)).abs().max().item() <= 1e-5
    assert (logits(masked, ids) - logits(dense, ids)).abs().max().item() > 1e-3  # removing channels mattered
    assert count_params(dense) - count_params(sliced) == 11 * UNITS.get(HC).params_per_unit(
        adapter, adapter.layers(dense)[0]
    )
    assert (sliced.lm_head.weight is sliced.model.embed_tokens.weight) == tie
    assert sliced.config.hidden_size == 37 and sliced.config.head_dim == 8


def test_slicing_rescales_norms_and_llm_pruner_copy_is_a_different_model() -> None:
    """Kept norm weights times sqrt(d/d'), epsilon times d/d'. Copying the norms as they are (LLM-Pruner)
    gives a different function: RMSNorm divides by the mean over fewer channels."""
    dense = tiny_model()
    adapter = adapter_for(dense.config)
    kept = random_kept(30, seed=3)
    masked = apply_plan(copy.deepcopy(dense), adapter, hidden_plan(dense, kept), mode="mask")
    sliced = apply_plan(copy.deepcopy(dense), adapter, hidden_plan(dense, kept), mode="slice")
    ratio = D / 30
    for n_dense, n_sliced in zip(hidden_norms(adapter, dense), hidden_norms(adapter, sliced)):
        assert torch.allclose(n_sliced.weight, n_dense.weight[kept] * math.sqrt(ratio), rtol=1e-6, atol=0)
        assert n_sliced.variance_epsilon == pytest.approx(n_dense.variance_epsilon * ratio)
    assert sliced.config.rms_norm_eps == pytest.approx(dense.config.rms_norm_eps * ratio)
    copied = copy.deepcopy(sliced)
    for n_copied in hidden_norms(adapter, copied):
        n_copied.weight.data.div_(math.sqrt(ratio))
        n_copied.variance_epsilon /= ratio
    ids = ids_for(128)
    assert (logits(copied, ids) - logits(masked, ids)).abs().max().item() > 1e-3


def test_epsilon_rescaling_is_needed_for_equality() -> None:
    """With epsilon 1e-2 (the tiny model's residual mean square is ~1e-4) the sliced model still equals
    the masked one to float32 rounding (RMSNorm computes in float32 whatever the model dtype, so that is
    the floor); rescaling only the weights, not epsilon, leaves an error of order
    eps (d/d' - 1) / (S/d + eps) of the output, here ~40% of the largest logit."""
    dense = tiny_model(rms_norm_eps=1e-2)
    adapter = adapter_for(dense.config)
    kept = random_kept(24, seed=4)
    masked = apply_plan(copy.deepcopy(dense), adapter, hidden_plan(dense, kept), mode="mask")
    sliced = apply_plan(copy.deepcopy(dense), adapter, hidden_plan(dense, kept), mode="slice")
    ids = ids_for(128)
    scale = logits(masked, ids).abs().max().item()
    assert (logits(sliced, ids) - logits(masked, ids)).abs().max().item() <= 1e-5 * scale
    weights_only = copy.deepcopy(sliced)
    for norm in hidden_norms(adapter, weights_only):
        norm.variance_epsilon /= D / 24
    assert (logits(weights_only, ids) - logits(masked, ids)).abs().max().item() > 0.1 * scale


def test_a_plan_with_several_entries_keeps_their_union() -> None:
    dense = tiny_model()
    adapter = adapter_for(dense.config)
    a, b = random_kept(20, seed=5), random_kept(20, seed=6)
    plan = hidden_plan(dense, a)
    plan.keep[HC][3] = b
    sliced = apply_plan(copy.deepcopy(dense), adapter, plan, mode="slice")
    union = sorted(set(a) | set(b))
    assert sliced.config.hidden_size == len(union)
    assert torch.equal(sliced.model.embed_tokens.weight, dense.model.embed_tokens.weight[:, union])


# ---------------------------------------------------------------- planning, save and reload


def test_plan_is_one_model_wide_layout_and_counts_match(tmp_path, tokenizer) -> None:
    """l1 plan at 15%: one layout (first pruned layer), kept count rounded to round_to, the top-l1 channels
    kept, the sliced model has exactly the plan's parameters and reloads as stock Llama (40 % 8 heads == 0)."""
    dense = tiny_model(vocab_size=len(tokenizer))
    adapter = adapter_for(dense.config)
    lays = layouts(dense, adapter, [HC], prunable_layers(4, 1, 1))
    assert [(lay.unit, lay.layer, lay.count) for lay in lays] == [(HC, 0, D)]
    req = ScoreRequest(units=[HC], layers=[1, 2], calibration=torch.zeros(1, 4, dtype=torch.long), batch_size=1, seed=0)
    scores = CRITERIA.get("l1").score(dense, adapter, req)
    total = count_params(dense)
    plan = make_plan(scores, PlanRequest(0.15, total, lays, {HC: 8}, 0.03), "uniform", "l1")
    kept = plan.keep[HC][0]
    assert len(kept) == 40  # 48 * 0.85 = 40.8 -> a multiple of 8
    assert set(kept) == set(torch.argsort(scores[f"{HC}.0"], descending=True)[:40].tolist())
    assert plan.params_after == total - 8 * lays[0].params_per_unit
    masked = apply_plan(copy.deepcopy(dense), adapter, plan, mode="mask")
    sliced = apply_plan(copy.deepcopy(dense), adapter, plan, mode="slice")
    assert count_params(sliced) == plan.params_after
    loaded, cfg = save_and_reload(sliced, tokenizer, tmp_path)
    assert cfg["model_type"] == "llama" and "layer_sizes" not in cfg
    assert (cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"]) == (40, 8, 8)
    assert cfg["rms_norm_eps"] == pytest.approx(dense.config.rms_norm_eps * 48 / 40)
    stock = LlamaForCausalLM.from_pretrained(tmp_path).eval()  # no prunekit involved
    ids = tokenizer("def f(x):", return_tensors="pt")["input_ids"]
    assert (logits(stock, ids) - logits(masked, ids)).abs().max().item() <= 1e-5
    assert_generate_matches(stock, masked, ids)
    assert_generate_matches(loaded, masked, ids)


@pytest.mark.parametrize("allocation", ["global", "global_weighted"])
def test_threshold_allocations_plan_hidden_channels(model, allocation: str) -> None:
    """The threshold allocations see one layout like any other: the kept count is a multiple of round_to,
    the lowest-scored channels go, and the sliced model has the plan's parameter count."""
    adapter = adapter_for(model.config)
    lays = layouts(model, adapter, [HC], prunable_layers(4, 1, 1))
    scores = {f"{HC}.0": torch.linspace(0.0, 1.0, D, dtype=torch.float64).flip(0)}  # channel 0 most important
    plan = make_plan(scores, PlanRequest(0.15, count_params(model), lays, {HC: 8}, 0.03), allocation)
    assert plan.keep[HC][0] == list(range(40))
    sliced = apply_plan(copy.deepcopy(model), adapter, plan, mode="slice")
    assert count_params(sliced) == plan.params_after


def test_tied_uneven_width_runs_but_saving_needs_a_multiple_of_heads(tmp_path, tokenizer, caplog) -> None:
    """42 kept channels (not a multiple of 8 heads): the sliced model works in memory and keeps its tied
    lm_head; transformers refuses to save it (stock and prunekit configs alike), and slicing warns."""
    dense = tiny_model(vocab_size=len(tokenizer), tie_word_embeddings=True)
    adapter = adapter_for(dense.config)
    kept = random_kept(42, seed=7)
    masked = apply_plan(copy.deepcopy(dense), adapter, hidden_plan(dense, kept), mode="mask")
    sliced = apply_plan(copy.deepcopy(dense), adapter, hidden_plan(dense, kept), mode="slice")
    assert "round_to.hidden_channel" in caplog.text
    assert sliced.lm_head.weight is sliced.model.embed_tokens.weight
    ids = tokenizer("class A:", return_tensors="pt")["input_ids"]
    assert_generate_matches(sliced, masked, ids)
    with pytest.raises(StrictDataclassClassValidationError, match="not a multiple of the number of attention heads"):
        save_and_reload(sliced, tokenizer, tmp_path)


@pytest.mark.parametrize("units", [["attn_kv_group", "mlp_channel"], ["attn_query_head", "mlp_channel", "layer"]])
def test_hidden_channels_plan_with_per_layer_units(model, units: list[str]) -> None:
    """Hidden channels beside per-layer unit types (and whole layers) in one uniform plan: the parameters it
    removes are counted once where both cut the same tensor, so the sliced model has exactly the plan's count,
    the target is met, and it computes what the masked dense model computes."""
    adapter = adapter_for(model.config)
    lays = layouts(model, adapter, [HC, *units], prunable_layers(4, 1, 1))
    scores = CRITERIA.get("l2").score(model, adapter, ScoreRequest([HC, *units], [1, 2], ids_for(64), 2, seed=0))
    plan = make_plan(scores, PlanRequest(0.3, count_params(model), lays, {HC: 8}, 0.03), "uniform")
    assert len(plan.keep[HC][0]) < D or "layer" in units  # uniform removes whole layers first
    assert abs(plan.achieved - 0.3) <= 0.03
    masked = apply_plan(copy.deepcopy(model), adapter, plan, mode="mask")
    sliced = apply_plan(copy.deepcopy(model), adapter, plan, mode="slice")
    assert count_params(sliced) == plan.params_after
    ids = ids_for(64)
    assert (logits(sliced, ids) - logits(masked, ids)).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- the layer -> model link


def test_layer_link_is_invisible_and_follows_copies(model) -> None:
    adapter = adapter_for(model.config)
    keys = set(model.state_dict())
    n_params, n_modules = count_params(model), len(list(model.modules()))
    adapter.layers(model)  # sets the links
    assert set(model.state_dict()) == keys and count_params(model) == n_params
    assert len(list(model.modules())) == n_modules
    ut = UNITS.get(HC)
    clone = copy.deepcopy(model)
    path = ut.members(adapter, adapter.layers(model)[0])[0].path
    # Without calling adapter.layers(clone), a copied layer's link already names the copy.
    assert clone.model.layers[0].get_parameter(path) is clone.model.embed_tokens.weight
    buf = io.BytesIO()
    torch.save(model, buf)  # a weak link must not break pickling the whole module
    buf.seek(0)
    reloaded = torch.load(buf, weights_only=False)
    with pytest.raises(PrunekitError, match="adapter.layers"):
        ut.members(adapter, reloaded.model.layers[0])  # the pickled link is dead until relinked
    assert len(ut.members(adapter, adapter.layers(reloaded)[0])) == len(ut.members(adapter, model.model.layers[0]))
