"""Activation criteria (TransAct, Wanda-sp, FLAP) and FLAP bias compensation, against independent computations.

The references recompute the o_proj / down_proj inputs by hand from the layer weights (attention with
rotary embeddings and a causal mask; act(gate(y)) * up(y)) and apply each paper's formula per unit with
explicit loops, in float64.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from prunekit.errors import PrunekitError
from prunekit.models.families import adapter_for
from prunekit.models.loading import load_pretrained
from prunekit.models.saving import save_model
from prunekit.models.size import count_params
from prunekit.pipeline.params import parse_params
from prunekit.pruning.compensation import compensate
from prunekit.pruning.criteria import CRITERIA, ScoreRequest
from prunekit.pruning.criteria.activations import collect_input_stats
from prunekit.pruning.plan import Plan
from prunekit.pruning.slicing import apply_plan
from prunekit.pruning.units import UNITS

ROOT = Path(__file__).resolve().parents[1]
HEADS, KV, HD = 8, 4, 8  # tiny model: 8 query heads, 4 k/v heads, head_dim 8
N_REP = HEADS // KV
ACTIVATION_CRITERIA = ["activation", "flap", "wanda_sp"]


def calibration(vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (6, 16), generator=torch.Generator().manual_seed(5))


def request(units=("attn_kv_group", "mlp_channel"), layers=(0, 2), vocab: int = 128) -> ScoreRequest:
    # batch_size 4 over 6 windows: two uneven batches, so the streaming accumulation is exercised.
    return ScoreRequest(list(units), list(layers), calibration(vocab), batch_size=4, seed=0)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.no_grad()
def reference_inputs(model, ids: torch.Tensor, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_proj input, down_proj input) of layer ``idx`` as (tokens, channels), recomputed by hand."""
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    h, layer = hidden[idx], model.model.layers[idx]
    a, mlp = layer.self_attn, layer.mlp
    b, t, _ = h.shape
    x = layer.input_layernorm(h)
    q = a.q_proj(x).view(b, t, HEADS, HD).transpose(1, 2)
    k = a.k_proj(x).view(b, t, KV, HD).transpose(1, 2)
    v = a.v_proj(x).view(b, t, KV, HD).transpose(1, 2)
    cos, sin = model.model.rotary_emb(h, torch.arange(t).unsqueeze(0))
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = k.repeat_interleave(N_REP, dim=1), v.repeat_interleave(N_REP, dim=1)  # query head h uses kv h // N_REP
    logits = q @ k.transpose(-1, -2) / HD**0.5
    logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    o_in = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, HEADS * HD)
    r = h + a.o_proj(o_in)
    y = layer.post_attention_layernorm(r)
    d_in = torch.nn.functional.silu(mlp.gate_proj(y)) * mlp.up_proj(y)
    # The recomputation is the model's own forward: the layer output matches the next hidden state.
    torch.testing.assert_close(r + mlp.down_proj(d_in), hidden[idx + 1], rtol=1e-10, atol=1e-10)
    return o_in.reshape(b * t, -1), d_in.reshape(b * t, -1)


def expected_scores(name: str, unit: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The paper formulas, per unit, with explicit loops over heads and channels.

    ``unit``: "mlp_channel" (x, w of down_proj), "attn_kv_group" or "attn_query_head" (x, w of o_proj).
    """
    n_channels = x.shape[1]
    norm = [x[:, j].pow(2).sum().sqrt() for j in range(n_channels)]
    if name == "activation":
        channel = norm
    elif name == "wanda_sp":
        channel = [(w[:, j].abs() * norm[j]).sum() for j in range(n_channels)]
    else:  # flap: unbiased variance over all tokens times the squared column norm
        channel = [x[:, j].var(unbiased=True) * w[:, j].pow(2).sum() for j in range(n_channels)]
    if unit == "mlp_channel":
        return torch.stack(channel)
    if unit == "attn_query_head":
        heads = [torch.stack(channel[h * HD : (h + 1) * HD]) for h in range(HEADS)]
        if name == "activation":
            return torch.stack([d.mean() + (10.0 / HD) * d.max() for d in heads])
        return torch.stack([d.sum() for d in heads])
    groups = []
    for g in range(KV):
        heads = range(g * N_REP, (g + 1) * N_REP)
        if name == "activation":
            total = 0.0
            for h in heads:
                dims = torch.stack(channel[h * HD : (h + 1) * HD])
                total = total + dims.mean() + (10.0 / HD) * dims.max()
            groups.append(total)
        else:
            groups.append(sum(channel[g * N_REP * HD : (g + 1) * N_REP * HD]))
    return torch.stack(groups)


@pytest.mark.parametrize("name", ACTIVATION_CRITERIA)
def test_criterion_equals_formula(name: str) -> None:
    model = tiny_model().double()
    adapter = adapter_for(model.config)
    req = request()
    scores, aux = CRITERIA.get(name).score_with_aux(model, adapter, req)
    assert sorted(aux) == sorted(f"aux.mean.{p}.{i}" for p in ("o_proj", "down_proj") for i in req.layers)
    for idx in req.layers:
        o_in, d_in = reference_inputs(model, req.calibration, idx)
        layer = model.model.layers[idx]
        for unit, x, w in (
            ("attn_kv_group", o_in, layer.self_attn.o_proj.weight),
            ("mlp_channel", d_in, layer.mlp.down_proj.weight),
        ):
            got = scores[f"{unit}.{idx}"]
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, expected_scores(name, unit, x, w.detach()), rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(aux[f"aux.mean.o_proj.{idx}"], o_in.mean(dim=0), rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(aux[f"aux.mean.down_proj.{idx}"], d_in.mean(dim=0), rtol=1e-6, atol=1e-12)


def test_channel_stats_streamed_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uneven updates split into row chunks give the all-at-once mean, sample variance and L2 norm."""
    from prunekit.pruning.criteria import activations

    monkeypatch.setattr(activations, "CHUNK_VALUES", 100)  # 100 // 24 = 4 rows per chunk
    x = torch.randn(3, 11, 24, generator=torch.Generator().manual_seed(0)) + 3.0
    stats = activations.ChannelStats()
    stats.update(x[:1])
    stats.update(x[1:].float())
    flat = x.reshape(-1, 24).double()
    assert stats.count == 33
    torch.testing.assert_close(stats.mean, flat.mean(dim=0), rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.variance, flat.var(dim=0, unbiased=True), rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.l2, flat.norm(dim=0), rtol=1e-6, atol=0)


def test_criteria_rank_differently() -> None:
    """Guard against the three criteria silently computing the same thing."""
    model = tiny_model()
    adapter = adapter_for(model.config)
    orders = {
        name: torch.argsort(CRITERIA.get(name).score(model, adapter, request())["mlp_channel.2"]).tolist()
        for name in ACTIVATION_CRITERIA
    }
    assert len({tuple(o) for o in orders.values()}) == 3


@pytest.mark.skipif("attn_query_head" not in UNITS, reason="unit type attn_query_head not registered")
@pytest.mark.parametrize("name", ACTIVATION_CRITERIA)
def test_query_head_scores_equal_formula(name: str) -> None:
    model = tiny_model().double()
    req = request(units=("attn_query_head",), layers=(1,))
    scores = CRITERIA.get(name).score(model, adapter_for(model.config), req)
    o_in, _ = reference_inputs(model, req.calibration, 1)
    w = model.model.layers[1].self_attn.o_proj.weight.detach()
    expected = expected_scores(name, "attn_query_head", o_in, w)
    torch.testing.assert_close(scores["attn_query_head.1"], expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", ACTIVATION_CRITERIA)
def test_unsupported_unit_type_names_criterion_and_unit(name: str) -> None:
    model = tiny_model()
    with pytest.raises(PrunekitError, match=f"criterion '{name}' does not support unit type 'attn_head_dim_x'"):
        CRITERIA.get(name).score(model, adapter_for(model.config), request(units=("attn_head_dim_x",)))


def test_hooks_removed_on_error() -> None:
    model = tiny_model()
    bad = torch.full((2, 4), 10_000)  # out of the vocabulary: the embedding raises mid-forward
    with pytest.raises(IndexError):
        collect_input_stats(model, adapter_for(model.config), [0, 1], bad, batch_size=2)
    assert all(not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------- bias compensation

PLANS = {
    # same kept counts in every layer -> stock Llama config
    "uniform": {
        "attn_kv_group": {0: [0, 3], 1: [1, 2], 2: [0, 1], 3: [2, 3]},
        "mlp_channel": {i: [c for c in range(64) if (c * 7 + i) % 5 != 0][:40] for i in range(4)},
    },
    # counts differ per layer (layer 3 keeps everything) -> prunekit config
    "heterogeneous": {
        "attn_kv_group": {0: [0, 2, 3], 1: [1], 2: [0, 1, 2, 3], 3: [0, 1, 2, 3]},
        "mlp_channel": {0: list(range(0, 64, 2)), 1: list(range(20, 64)), 2: list(range(48)), 3: list(range(64))},
    },
    # query heads and KV groups of the same layers, both numbered in the dense layer: the union goes
    "query_heads": {
        "attn_query_head": {0: [0, 3, 4, 7], 1: list(range(8)), 2: [1, 3, 5, 7], 3: list(range(8))},
        "attn_kv_group": {0: [0, 2, 3], 1: [1, 3], 2: [0, 1, 2, 3], 3: [0, 1, 2, 3]},
        "mlp_channel": {i: list(range(8 * i, 64)) for i in range(4)},
    },
}


def make_plan(model, keep: dict[str, dict[int, list[int]]]) -> Plan:
    total = count_params(model)
    return Plan(keep=copy.deepcopy(keep), params_before=total, params_after=total, target=0.0, allocation="test")


def removed(keep: dict[str, dict[int, list[int]]], role: str, idx: int) -> list[int]:
    """Input columns of o_proj or down_proj the plan removes, by hand."""
    if role == "down_proj":
        return [c for c in range(64) if c not in keep["mlp_channel"][idx]]
    gone_heads = {h for h in range(HEADS) if h // N_REP not in keep["attn_kv_group"][idx]}
    if "attn_query_head" in keep:
        gone_heads |= {h for h in range(HEADS) if h not in keep["attn_query_head"][idx]}
    return [h * HD + d for h in sorted(gone_heads) for d in range(HD)]


@torch.no_grad()
def mean_replaced_logits(dense, keep, means, ids: torch.Tensor) -> torch.Tensor:
    """Dense model whose removed o_proj / down_proj input channels are overwritten by their means."""

    def replace(cols: list[int], mean: torch.Tensor):
        def hook(_module, args):
            x = args[0].clone()
            x[..., cols] = mean[cols].to(x.dtype)
            return (x,)

        return hook

    handles = []
    try:
        for idx, layer in enumerate(dense.model.layers):
            for proj, role in ((layer.self_attn.o_proj, "o_proj"), (layer.mlp.down_proj, "down_proj")):
                cols = removed(keep, role, idx)
                if cols:
                    handles.append(proj.register_forward_pre_hook(replace(cols, means[f"aux.mean.{role}.{idx}"])))
        return dense(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("layout", sorted(PLANS))
def test_compensated_pruned_equals_mean_replaced_dense(layout: str, tmp_path: Path, tokenizer) -> None:
    keep = PLANS[layout]
    if any(unit not in UNITS for unit in keep):
        pytest.skip(f"unit types {sorted(keep)} not all registered")
    dense = tiny_model(vocab_size=len(tokenizer)).double()
    adapter = adapter_for(dense.config)
    ids = calibration(len(tokenizer))
    req = ScoreRequest(["attn_kv_group", "mlp_channel"], [0, 1, 2, 3], ids, batch_size=4, seed=0)
    _, means = CRITERIA.get("flap").score_with_aux(dense, adapter, req)

    pruned = copy.deepcopy(dense)
    compensate(pruned, adapter, make_plan(dense, keep), means)
    apply_plan(pruned, adapter, make_plan(dense, keep), mode="slice")
    reference = mean_replaced_logits(dense, keep, means, ids)
    assert (logits(pruned, ids) - reference).abs().max().item() <= 1e-5
    # Not vacuous: pruning without compensation gives other logits.
    plain = apply_plan(copy.deepcopy(dense), adapter, make_plan(dense, keep), mode="slice")
    assert (logits(plain, ids) - reference).abs().max().item() > 1e-3
    # Layers the plan leaves whole get zero o_proj / down_proj biases (nothing to fold).
    if layout == "heterogeneous":
        assert not pruned.model.layers[3].self_attn.o_proj.bias.any()
        assert not pruned.model.layers[3].mlp.down_proj.bias.any()
        assert pruned.model.layers[0].self_attn.o_proj.bias.abs().max() > 0

    save_model(pruned, adapter, tokenizer, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["attention_bias"] is True and cfg["mlp_bias"] is True
    assert cfg["model_type"] == "llama" and ("layer_sizes" in cfg) == (layout != "uniform")
    if layout == "query_heads":  # layer 0 loses heads 1, 2, 5, 6 (query heads) and 2, 3 (KV group 1)
        assert cfg["layer_sizes"][0]["num_attention_heads"] == 3 and len(removed(keep, "o_proj", 0)) == 5 * HD
    loaded = load_pretrained(tmp_path, dtype=torch.float64).eval()
    assert torch.equal(logits(loaded, ids), logits(pruned, ids))
    assert not loaded.model.layers[0].self_attn.q_proj.bias.any()  # the zero biases Llama's switch adds
    if layout == "uniform":  # stock transformers alone reloads it
        stock = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
        assert type(stock) is LlamaForCausalLM
        assert torch.equal(logits(stock, ids), logits(pruned, ids))


def test_missing_means_error_says_rescore() -> None:
    model = tiny_model()
    adapter = adapter_for(model.config)
    before = [p.clone() for p in model.parameters()]
    scores = CRITERIA.get("l1").score(model, adapter, request(layers=(0, 1, 2, 3)))
    with pytest.raises(PrunekitError, match=r"scores lack 'aux\.mean\.o_proj\.0': rescore with an activation-based"):
        compensate(model, adapter, make_plan(model, PLANS["uniform"]), scores)
    # The model is left untouched: no biases added, config unchanged.
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert model.model.layers[0].self_attn.o_proj.bias is None and not model.config.attention_bias


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
@pytest.mark.parametrize("layout", ["uniform", "heterogeneous"])
def test_compensation_in_families_without_a_bias_switch(family: str, layout: str, tmp_path: Path, tokenizer) -> None:
    """Mistral and Qwen2 have no stock o_proj / down_proj bias: compensation gives those two projections biases
    (no others), records ``output_bias`` in a prunekit config, and the reloaded model equals the dense model with
    the removed channels' inputs replaced by their means."""
    from test_families import tiny_family

    dense = tiny_family(family, False, len(tokenizer)).double()
    adapter = adapter_for(dense.config)
    keep = {u: {i: k for i, k in per.items() if i < 3} for u, per in PLANS[layout].items()}  # 3 layers
    ids = calibration(len(tokenizer))
    req = ScoreRequest(["attn_kv_group", "mlp_channel"], [0, 1, 2], ids, batch_size=4, seed=0)
    _, means = CRITERIA.get("flap").score_with_aux(dense, adapter, req)
    pruned = copy.deepcopy(dense)
    q_bias = pruned.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's own q/k/v biases
    compensate(pruned, adapter, make_plan(dense, keep), means)
    apply_plan(pruned, adapter, make_plan(dense, keep), mode="slice")
    assert (pruned.model.layers[0].self_attn.q_proj.bias is not None) == q_bias  # only o_proj / down_proj
    assert pruned.model.layers[0].mlp.gate_proj.bias is None
    reference = mean_replaced_logits(dense, keep, means, ids)
    assert (logits(pruned, ids) - reference).abs().max().item() <= 1e-5
    plain = apply_plan(copy.deepcopy(dense), adapter, make_plan(dense, keep), mode="slice")
    assert (logits(plain, ids) - reference).abs().max().item() > 1e-3
    save_model(pruned, adapter, tokenizer, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == dense.config.model_type and cfg["output_bias"] is True  # uniform widths too
    loaded = load_pretrained(tmp_path, dtype=torch.float64).eval()
    assert loaded.model.layers[1].self_attn.o_proj.bias.abs().max() > 0
    assert torch.equal(logits(loaded, ids), logits(pruned, ids))


# ---------------------------------------------------------------- stages: score writes means, prune folds them


def load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_score_and_prune_stages_compensate(tiny_model_dir: Path, tmp_path: Path) -> None:
    params = parse_params(
        {
            "score": {"criterion": "flap", "batch_size": 4},
            "prune": {
                "target": 0.2,
                "allocation": "uniform",
                "skip_first": 1,
                "skip_last": 1,
                "round_to": {"attn_kv_group": 1, "mlp_channel": 1},
                "bias_compensation": True,
            },
        }
    )
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    save_file({"input_ids": calibration(cfg["vocab_size"])}, str(tmp_path / "calib.safetensors"))
    scores_path = tmp_path / "scores.safetensors"
    load_stage("score").score(
        params, model_dir=tiny_model_dir, calibration_file=tmp_path / "calib.safetensors", out=scores_path
    )
    stored = load_file(str(scores_path))
    assert {f"aux.mean.down_proj.{i}" for i in range(4)} <= set(stored) and "mlp_channel.1" in stored

    out = tmp_path / "pruned"
    load_stage("prune").prune(
        params,
        model_dir=tiny_model_dir,
        scores_file=scores_path,
        out=out,
        plan_file=tmp_path / "plan.json",
        metrics_file=tmp_path / "metrics.json",
        trials_file=tmp_path / "trials.json",
        text=None,
        calibration=None,
        state=tmp_path / "state",
    )
    loaded = load_pretrained(out)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # The reported size is the saved model's, compensation biases included.
    assert metrics["params_after"] == count_params(loaded)
    assert metrics["achieved_fraction"] == round(1 - count_params(loaded) / metrics["params_before"], 6)
    layers = loaded.model.layers
    assert layers[1].mlp.down_proj.bias.abs().max() > 0  # a pruned layer got its means folded in
    assert not layers[0].mlp.down_proj.bias.any() and not layers[3].self_attn.o_proj.bias.any()  # skipped layers
