"""A criterion and a unit type added the way docs/extending.md shows: one module each, one registration line,
then score -> plan -> slice like the built-in ones (the schedule, quantization format and model source examples
are tested beside their registries: test_schedules, test_quant, test_sources)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from prunekit.models.families import adapter_for
from prunekit.models.size import count_params
from prunekit.pipeline.params import parse_params
from prunekit.pipeline.validation import check_choices
from prunekit.pruning.allocations import make_plan
from prunekit.pruning.criteria import CRITERIA, ScoreRequest
from prunekit.pruning.plan import PlanRequest
from prunekit.pruning.slicing import apply_plan, layouts
from prunekit.pruning.units import UNITS

TOY_CRITERION = '''
"""A toy criterion: the sum over a unit's weights of w^4 (a magnitude that favours large weights)."""

import torch

from prunekit.pruning.criteria.base import CRITERIA, Criterion, reduce_elementwise


class L4(Criterion):
    name = "l4"

    @torch.no_grad()
    def score(self, model, adapter, req):
        return reduce_elementwise(model, adapter, req, lambda p: p.detach().pow(4))


CRITERIA.register(L4.name)(L4())
'''

TOY_UNIT = '''
"""A toy unit type: two neighbouring MLP channels removed together (gate/up rows 2i, 2i+1, down columns)."""

from prunekit.pruning.units.base import UNITS, Member, UnitType


class MLPPair(UnitType):
    name = "mlp_pair"
    description = "two neighbouring MLP channels"
    input_of = "down_proj"  # it owns down_proj input columns 2i, 2i+1: activation criteria can read it

    def count(self, adapter, layer):
        return getattr(adapter.mlp(layer), adapter.gate).out_features // 2

    def members(self, adapter, layer):
        m = adapter.mlp_path
        return [Member(f"{m}.{adapter.gate}.weight", 0, 2), Member(f"{m}.{adapter.up}.weight", 0, 2),
                Member(f"{m}.{adapter.down}.weight", 1, 2)]


UNITS.register(MLPPair.name)(MLPPair())
'''


def _load(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / f"{name}.py").write_text(text)
    spec = importlib.util.spec_from_file_location(name, tmp_path / f"{name}.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


@pytest.fixture
def registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The toy criterion and unit type, registered for the length of one test."""
    monkeypatch.setattr(CRITERIA, "_items", dict(CRITERIA._items))
    monkeypatch.setattr(UNITS, "_items", dict(UNITS._items))
    _load(tmp_path, "toy_criterion", TOY_CRITERION)
    _load(tmp_path, "toy_unit", TOY_UNIT)


def _cut(model, units: list[str], scores: dict[str, torch.Tensor]):
    adapter = adapter_for(model.config)
    req = PlanRequest(0.2, count_params(model), layouts(model, adapter, units, [1, 2]), {}, 0.05)
    return make_plan(scores, req, "uniform", "toy"), adapter


def test_toy_criterion_and_unit_run_through_score_plan_slice(registered: None) -> None:
    check_choices(parse_params({"score": {"criterion": "l4"}, "prune": {"units": ["mlp_pair", "attn_kv_group"]}}))
    model = tiny_model()
    adapter = adapter_for(model.config)
    calibration = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    req = ScoreRequest(["mlp_pair", "mlp_channel", "attn_kv_group"], [1, 2], calibration, 2, seed=0)
    scores = CRITERIA.get("l4").score(model, adapter, req)
    # The criterion is its formula: sum of w^4 over the gate and up rows and the down column of each channel.
    mlp = model.model.layers[1].mlp
    by_hand = (mlp.gate_proj.weight**4).sum(1) + (mlp.up_proj.weight**4).sum(1) + (mlp.down_proj.weight**4).sum(0)
    torch.testing.assert_close(scores["mlp_channel.1"], by_hand.double())
    # The unit's score is its two channels' scores together.
    torch.testing.assert_close(scores["mlp_pair.1"], scores["mlp_channel.1"].view(-1, 2).sum(1))
    # A gradient criterion reads the new unit through its members too.
    taylor = CRITERIA.get("param_first").score(model, adapter, req)
    torch.testing.assert_close(taylor["mlp_pair.2"], taylor["mlp_channel.2"].view(-1, 2).sum(1))
    # The activation criteria read it through the down_proj input block it declares (input_of).
    for name in ("activation", "wanda_sp", "flap"):
        act = CRITERIA.get(name).score(model, adapter, req)
        torch.testing.assert_close(act["mlp_pair.1"], act["mlp_channel.1"].view(-1, 2).sum(1))
    units = ["mlp_pair", "attn_kv_group"]
    plan, adapter = _cut(model, units, {k: v for k, v in scores.items() if not k.startswith("mlp_channel")})
    assert set(plan.keep) == set(units) and len(plan.keep["mlp_pair"][1]) < 32
    ids = calibration
    masked = apply_plan(tiny_model(), adapter, plan, mode="mask")
    sliced = apply_plan(tiny_model(), adapter, plan, mode="slice")
    assert count_params(sliced) == plan.params_after
    assert sliced.model.layers[1].mlp.gate_proj.out_features == 2 * len(plan.keep["mlp_pair"][1])
    with torch.no_grad():
        torch.testing.assert_close(sliced(ids).logits, masked(ids).logits, rtol=1e-5, atol=1e-5)
