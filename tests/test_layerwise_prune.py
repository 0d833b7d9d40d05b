"""The prune stage one decoder layer at a time (``model.offload: layerwise``) against the whole model in memory.

The layerwise cut reads, compensates or refits, slices and writes one layer before it reads the next. What it
writes is the model the in-memory cut saves: the same tensors (to float rounding: the refit layers see hidden
states computed by the same layers, batch by batch, in the same order; rtol 1e-5), the same config, and the
same logits, for plain slicing, FLAP's bias compensation and least-squares reconstruction, on the three families,
a model with per-layer widths, whole layers removed and head dims.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_layerwise import WIDTH, calibration, load_stage, saved

from prunekit.errors import ParamsError, PrunekitError
from prunekit.models.families import adapter_for
from prunekit.models.layerwise import LayerwiseModel
from prunekit.models.loading import load_model
from prunekit.models.saving import save_model
from prunekit.models.shards import INDEX_FILE
from prunekit.pipeline.params import parse_params
from prunekit.pruning.criteria import CRITERIA, ScoreRequest
from prunekit.pruning.layerwise import prune_layerwise
from prunekit.pruning.schedules import Cut, PruneJob, prune_model, split_scores

CASES = {
    # name: (family, tied, source already pruned, criterion, units, bias compensation, reconstruct)
    "llama_plain": ("llama", False, False, "l2", [*WIDTH, "attn_query_head"], False, "none"),
    "llama_bias": ("llama", False, False, "activation", WIDTH, True, "none"),
    "qwen2_bias": ("qwen2", True, False, "flap", WIDTH, True, "none"),
    "qwen2_refit": ("qwen2", True, False, "activation", WIDTH, False, "least_squares"),
    "mistral_pruned_refit": (
        "mistral",
        False,
        True,
        "l1",
        [*WIDTH, "attn_qk_dim", "attn_vo_dim"],
        False,
        "least_squares",
    ),
    "llama_layers_refit": ("llama", False, False, "random", ["mlp_channel", "layer"], False, "least_squares"),
}


def cut_and_job(case: str, model, adapter, tokenizer, calib: torch.Tensor) -> PruneJob:
    _, _, _, criterion, units, bias, reconstruct = CASES[case]
    req = ScoreRequest(units=units, layers=[1, 2], calibration=calib, batch_size=3, seed=0)
    scorer = CRITERIA.get(criterion)
    scores, aux = (
        scorer.score_with_aux(model, adapter, req) if criterion != "random" else (scorer.score(model, adapter, req), {})
    )
    layers = "layer" in units  # whole layers: coarse steps, a global allocation and a wider tolerance
    # The refit model is not judged as a whole: model.offload: layerwise cannot (refused otherwise, tested below).
    cut = Cut(0.2, units, "global" if layers else "uniform", criterion, 1, 1, {}, 0.1 if layers else 0.06,
              bias_compensation=bias, reconstruct=reconstruct, reconstruct_ridge=(0.01, 0.3),
              reconstruct_standard_errors=None)  # fmt: skip
    return PruneJob(model, tokenizer, adapter, scores, cut, seed=0, side=aux, calibration=lambda: calib,
                    score_batch_size=3)  # fmt: skip


def state(path: Path) -> tuple[dict[str, torch.Tensor], dict, torch.nn.Module]:
    model, _, _ = load_model(path)
    return model.state_dict(), json.loads((path / "config.json").read_text()), model


@pytest.mark.parametrize("case", sorted(CASES))
def test_layerwise_prune_writes_the_model_the_in_memory_prune_saves(case, tmp_path, tokenizer) -> None:
    family, tie, pruned = CASES[case][:3]
    model, path = saved(family, tie, tmp_path, tokenizer, pruned)
    model.eval()
    calib = calibration(7, 12)
    job = cut_and_job(case, copy.deepcopy(model), adapter_for(model.config), tokenizer, calib)
    dense = prune_model(job, "oneshot")
    save_model(dense.model, job.adapter, tokenizer, tmp_path / "memory")

    lw = LayerwiseModel(path)
    job_lw = PruneJob(lw.model, tokenizer, lw.adapter, job.scores, job.cut, seed=0, side=job.side,
                      calibration=lambda: calib, score_batch_size=3)  # fmt: skip
    (tmp_path / "layerwise").mkdir()
    got = prune_layerwise(lw, job_lw, tmp_path / "layerwise", activations_mib=0 if "refit" in case else 64)

    assert got.plan.keep == dense.plan.keep and got.plan.params_after == dense.plan.params_after
    metrics, expected = got.metrics(0.2, "oneshot"), dense.metrics(0.2, "oneshot")
    assert metrics.pop("reconstruction", {}) == pytest.approx(expected.pop("reconstruction", {}), rel=1e-4)
    assert metrics == expected
    a, config_a, model_a = state(tmp_path / "memory")
    b, config_b, model_b = state(tmp_path / "layerwise")
    assert config_b == config_a
    assert b.keys() == a.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    ids = calibration(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(model_b(ids).logits, model_a(ids).logits, rtol=1e-4, atol=1e-5)
    index = json.loads((tmp_path / "layerwise" / INDEX_FILE).read_text())
    n_layers = config_b["num_hidden_layers"]
    shards: dict[str, list[str]] = {}
    for name, shard in index["weight_map"].items():
        shards.setdefault(shard, []).append(name)
    # A shard per layer, holding that layer alone; then one per tensor outside the layers (embedding, norm, head).
    per_layer = {
        s: {n.split(".")[2] for n in names} for s, names in shards.items() if names[0].startswith("model.layers.")
    }
    assert len(per_layer) == n_layers and all(len(layers) == 1 for layers in per_layer.values())
    assert all(len(names) == 1 for s, names in shards.items() if s not in per_layer)
    if "layers" in case:
        assert n_layers < model.config.num_hidden_layers  # the case removes whole layers


def test_layerwise_prune_holds_one_decoder_layer_at_a_time(tmp_path, tokenizer, monkeypatch) -> None:
    """At most one decoder layer of the source is materialized at any moment (two with the refit's masked copy,
    which is not read from disk), and every layer is read exactly once."""
    model, path = saved("llama", False, tmp_path, tokenizer)
    calib = calibration()
    lw = LayerwiseModel(path)
    reads, most = [], 0
    materialize = LayerwiseModel._materialize

    def spy(self, module, prefix):  # noqa: ANN001
        nonlocal most
        materialize(self, module, prefix)
        if prefix.startswith("model.layers."):
            reads.append(prefix)
            loaded = [
                i for i, layer in enumerate(self.layers) if any(p.device.type != "meta" for p in layer.parameters())
            ]
            most = max(most, len(loaded))

    monkeypatch.setattr(LayerwiseModel, "_materialize", spy)
    job = cut_and_job("qwen2_refit", copy.deepcopy(model), lw.adapter, tokenizer, calib)
    job = PruneJob(lw.model, tokenizer, lw.adapter, job.scores, job.cut, seed=0, calibration=lambda: calib,
                   score_batch_size=3)  # fmt: skip
    (tmp_path / "out").mkdir()
    prune_layerwise(lw, job, tmp_path / "out")
    assert most == 1
    assert reads == [f"model.layers.{i}." for i in range(model.config.num_hidden_layers)]


def test_prune_stage_layerwise_writes_what_the_in_memory_stage_writes(tmp_path, tokenizer) -> None:
    """The stage end to end in both modes: same plan, metrics and weights; the layerwise output is read back by
    the layerwise evaluation."""
    _, path = saved("mistral", False, tmp_path, tokenizer)
    save_file({"input_ids": calibration()}, str(tmp_path / "calib.safetensors"))
    text = tmp_path / "text"
    text.mkdir()
    (text / "training.jsonl").write_text(json.dumps({"text": "unused"}) + "\n")
    outputs = {}
    for offload in ("none", "layerwise"):
        params = parse_params({
            "model": {"offload": offload},
            "score": {"criterion": "flap", "batch_size": 3},
            "prune": {"target": 0.2, "units": WIDTH, "allocation": "uniform", "skip_first": 1, "skip_last": 1,
                      "bias_compensation": True,
                      "round_to": {"attn_kv_group": 1, "mlp_channel": 8}},
        })  # fmt: skip
        scores = tmp_path / f"scores_{offload}.safetensors"
        load_stage("score").score(params, model_dir=path, calibration_file=tmp_path / "calib.safetensors", out=scores)
        out = tmp_path / offload
        load_stage("prune").prune(
            params, model_dir=path, scores_file=scores, out=out / "model", plan_file=out / "plan.json",
            metrics_file=out / "metrics.json", trials_file=out / "trials.json", text=text,
            calibration=tmp_path / "calib.safetensors", state=out / "state",
        )  # fmt: skip
        outputs[offload] = out
    for name in ("plan.json", "metrics.json", "trials.json"):
        assert (outputs["layerwise"] / name).read_text() == (outputs["none"] / name).read_text(), name
    a, config_a, _ = state(outputs["none"] / "model")
    b, config_b, _ = state(outputs["layerwise"] / "model")
    assert config_b == config_a and config_a["output_bias"] is True
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)
    record = json.loads((outputs["layerwise"] / "model" / "prunekit.json").read_text())
    assert record["plan"] == json.loads((outputs["none"] / "plan.json").read_text())


def test_missing_compensation_means_are_refused_before_a_layer_is_read(tmp_path, tokenizer, monkeypatch) -> None:
    model, path = saved("llama", False, tmp_path, tokenizer)
    lw = LayerwiseModel(path)
    job = cut_and_job("llama_bias", copy.deepcopy(model), lw.adapter, tokenizer, calibration())
    scores, _ = split_scores(job.scores)
    job = PruneJob(lw.model, tokenizer, lw.adapter, scores, job.cut, side={})
    monkeypatch.setattr(LayerwiseModel, "_materialize", lambda *a: pytest.fail("read a layer"))
    (tmp_path / "out").mkdir()
    with pytest.raises(PrunekitError, match="bias_compensation needs the mean activations"):
        prune_layerwise(lw, job, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def test_a_refit_judged_as_a_whole_is_refused_layerwise_before_a_layer_is_read(
    tmp_path, tokenizer, monkeypatch
) -> None:
    """prune.reconstruct_standard_errors needs the whole model: the params check names the key, and the library
    call refuses it before it reads a layer or writes a file."""
    from prunekit.pipeline.validation import check_choices

    raw: dict = {"model": {"offload": "layerwise"}, "score": {"criterion": "activation"},
                 "evaluate": {"zero_shot": {"tasks": []}},
           "prune": {"reconstruct": "least_squares", "allocation": "uniform"}}  # fmt: skip
    refused = r"key 'prune.reconstruct_standard_errors': model.offload: layerwise never holds the whole model"
    with pytest.raises(ParamsError, match=refused + r".*set prune.reconstruct_standard_errors: null"):
        check_choices(parse_params(raw))
    raw["prune"]["reconstruct_standard_errors"] = None
    check_choices(parse_params(raw))

    model, path = saved("llama", False, tmp_path, tokenizer)
    lw = LayerwiseModel(path)
    job = cut_and_job("qwen2_refit", copy.deepcopy(model), lw.adapter, tokenizer, calibration())
    job = PruneJob(lw.model, tokenizer, lw.adapter, job.scores, dataclasses.replace(job.cut,
                   reconstruct_standard_errors=2.0), calibration=lambda: calibration())  # fmt: skip
    monkeypatch.setattr(LayerwiseModel, "_materialize", lambda *a: pytest.fail("read a layer"))
    (tmp_path / "out").mkdir()
    with pytest.raises(PrunekitError, match="prune.reconstruct_standard_errors: model.offload: layerwise"):
        prune_layerwise(lw, job, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())
