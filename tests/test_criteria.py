"""Criteria against their formulas, computed independently of the unit/member machinery."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from prunekit.models.families import adapter_for
from prunekit.pruning.criteria import CRITERIA, ScoreRequest

N_REP, HD = 2, 8  # tiny model: 2 query heads per k/v head, head_dim 8


def unit_slices(model, layer_idx: int) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Per unit, the weight blocks it owns, cut by hand from the layer's tensors."""
    layer = model.model.layers[layer_idx]
    a, m = layer.self_attn, layer.mlp
    groups = []
    for j in range(a.k_proj.out_features // HD):
        q = slice(j * N_REP * HD, (j + 1) * N_REP * HD)
        kv = slice(j * HD, (j + 1) * HD)
        groups.append(
            {
                "q": a.q_proj.weight[q],
                "k": a.k_proj.weight[kv],
                "v": a.v_proj.weight[kv],
                "o": a.o_proj.weight[:, q],
            }
        )
    channels = [
        {"g": m.gate_proj.weight[c], "u": m.up_proj.weight[c], "d": m.down_proj.weight[:, c]}
        for c in range(m.gate_proj.out_features)
    ]
    return {"attn_kv_group": groups, "mlp_channel": channels}


def request(model, criterion_units=("attn_kv_group", "mlp_channel"), seed=0) -> ScoreRequest:
    calib = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(5))
    return ScoreRequest(list(criterion_units), [0, 2], calib, batch_size=4, seed=seed)


def test_param_first_equals_autograd() -> None:
    model = tiny_model()
    req = request(model)
    scores = CRITERIA.get("param_first").score(model, adapter_for(model.config), req)
    # Independent computation: one backward of the mean NLL over all windows at once.
    ref = tiny_model()
    ref.zero_grad()
    ref(input_ids=req.calibration, labels=req.calibration).loss.backward()
    for layer_idx in req.layers:
        for unit, blocks in unit_slices(ref, layer_idx).items():
            grads = unit_slices(_grads_as_model(ref), layer_idx)[unit]
            expected = torch.tensor(
                [
                    sum((w * g).abs().sum().item() for w, g in zip(b.values(), gb.values()))
                    for b, gb in zip(blocks, grads)
                ],
                dtype=torch.float64,
            )
            torch.testing.assert_close(scores[f"{unit}.{layer_idx}"], expected, rtol=1e-4, atol=1e-9)
    # Scoring leaves no gradients and the weights untouched.
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), tiny_model().parameters()))


def _grads_as_model(model):
    """A copy of ``model`` whose weights are its gradients, to cut gradient blocks with unit_slices."""
    import copy

    g = copy.deepcopy(model)
    with torch.no_grad():
        for p, src in zip(g.parameters(), model.parameters()):
            p.copy_(src.grad if src.grad is not None else torch.zeros_like(src))
    return g


@pytest.mark.parametrize("name,fn", [("l1", lambda w: w.abs().sum()), ("l2", lambda w: w.pow(2).sum())])
def test_magnitude_equals_formula(name, fn) -> None:
    model = tiny_model()
    scores = CRITERIA.get(name).score(model, adapter_for(model.config), request(model))
    for layer_idx in (0, 2):
        for unit, blocks in unit_slices(model, layer_idx).items():
            expected = torch.tensor([sum(fn(w).item() for w in b.values()) for b in blocks], dtype=torch.float64)
            torch.testing.assert_close(scores[f"{unit}.{layer_idx}"], expected, rtol=1e-5, atol=1e-9)


def test_random_is_seeded() -> None:
    model = tiny_model()
    crit, adapter = CRITERIA.get("random"), adapter_for(model.config)
    a = crit.score(model, adapter, request(model, seed=1))
    b = crit.score(model, adapter, request(model, seed=1))
    c = crit.score(model, adapter, request(model, seed=2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# block_influence scores whole layers only (its contract: tests/test_units_heads_layers.py).
@pytest.mark.parametrize("name", [n for n in CRITERIA.names() if n != "block_influence"])
def test_every_criterion_scores_every_unit(name) -> None:
    """Contract: one finite score per unit for every registered criterion, weights unchanged."""
    model = tiny_model()
    before = [p.clone() for p in model.parameters()]
    scores = CRITERIA.get(name).score(model, adapter_for(model.config), request(model))
    assert sorted(scores) == ["attn_kv_group.0", "attn_kv_group.2", "mlp_channel.0", "mlp_channel.2"]
    assert scores["attn_kv_group.0"].shape == (4,) and scores["mlp_channel.2"].shape == (64,)
    assert all(torch.isfinite(s).all() for s in scores.values())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_unknown_criterion_suggests() -> None:
    from prunekit.errors import PrunekitError

    with pytest.raises(PrunekitError, match=r"Unknown criterion 'param_frist'. Did you mean 'param_first'\?"):
        CRITERIA.get("param_frist")
