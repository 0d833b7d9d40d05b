"""Layer-by-layer scoring and perplexity (``model.offload: layerwise``) against the whole model in memory.

The layerwise path builds the model on the meta device, reads one decoder layer at a time from the
safetensors files and carries every batch through a layer before the next is read. Each layer receives the
arguments the model's own forward gives it, so scores and perplexities match the in-memory ones to float
rounding (rtol 1e-6; in practice they are bit-identical on one machine).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_families import tiny_family
from test_pruning import random_plan

from prunekit.errors import ParamsError, PrunekitError
from prunekit.evaluation.perplexity import perplexity, perplexity_layerwise
from prunekit.models.families import adapter_for
from prunekit.models.hidden import HiddenStates
from prunekit.models.layerwise import LayerwiseModel
from prunekit.models.saving import save_model
from prunekit.pipeline.params import parse_params
from prunekit.pipeline.validation import check_choices
from prunekit.pruning.criteria import CRITERIA, ScoreRequest
from prunekit.pruning.slicing import apply_plan

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 160
WIDTH = ["attn_kv_group", "mlp_channel"]
# criterion -> unit types it scores here (head dims and query heads ride along for the activation criteria)
FORWARD_CRITERIA = {
    "activation": ["attn_kv_group", "attn_query_head", "mlp_channel"],
    "flap": WIDTH,
    "wanda_sp": WIDTH,
    "bip": WIDTH,
    "block_influence": ["layer"],
    "l1": ["attn_kv_group", "attn_qk_dim", "mlp_channel"],
    "l2": WIDTH,
}


def calibration(n: int = 7, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(3))


def request(units: list[str], layers: list[int], batch_size: int = 3) -> ScoreRequest:
    return ScoreRequest(units=units, layers=layers, calibration=calibration(), batch_size=batch_size, seed=0)


def saved(family: str, tie: bool, tmp_path: Path, tokenizer, pruned: bool = False):
    """(model in memory, its directory); ``pruned``: per-layer widths and pruned head dims (rotary index buffers)."""
    model = tiny_family(family, tie, VOCAB)
    if pruned:
        apply_plan(model, adapter_for(model.config), random_plan(model, [*WIDTH, "attn_qk_dim"], seed=2))
    save_model(model, adapter_for(model.config), tokenizer, tmp_path / "model")
    return model, tmp_path / "model"


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-12, msg=key)


@pytest.mark.parametrize(
    ("family", "tie", "pruned"), [("llama", False, False), ("qwen2", True, False), ("mistral", False, True)]
)
@pytest.mark.parametrize("criterion", sorted(FORWARD_CRITERIA))
def test_layerwise_scores_equal_the_in_memory_scores(family, tie, pruned, criterion, tmp_path, tokenizer) -> None:
    model, path = saved(family, tie, tmp_path, tokenizer, pruned)
    units = FORWARD_CRITERIA[criterion]
    if pruned and criterion == "activation":
        units = WIDTH  # query heads of a pruned-head-dim layer are scored by the weight criteria only
    req = request(units, [0, 1, 2])
    dense, dense_aux = CRITERIA.get(criterion).score_with_aux(model, adapter_for(model.config), req)
    lw = LayerwiseModel(path)
    got, got_aux = CRITERIA.get(criterion).score_layerwise(lw, lw.adapter, req)
    assert_same(dense, got)
    assert dense_aux.keys() == got_aux.keys()
    if dense_aux:
        assert_same(dense_aux, got_aux)
    # Every weight is back on the meta device: nothing of the model is held after scoring.
    assert all(p.device.type == "meta" for p in lw.model.parameters())


def test_random_scores_a_model_whose_weights_stay_on_disk(tmp_path, tokenizer) -> None:
    model, path = saved("llama", False, tmp_path, tokenizer, pruned=True)
    req = request(WIDTH, [0, 1, 2])
    lw = LayerwiseModel(path)
    assert_same(
        CRITERIA.get("random").score(model, adapter_for(model.config), req),
        CRITERIA.get("random").score(lw.model, lw.adapter, req),
    )


def test_hidden_states_on_disk_give_the_same_scores_and_leave_nothing(tmp_path, tokenizer, monkeypatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    model, path = saved("qwen2", False, tmp_path, tokenizer)
    req = request(WIDTH, [0, 1, 2], batch_size=2)
    in_memory, _ = CRITERIA.get("bip").score_with_aux(model, adapter_for(model.config), req)
    lw = LayerwiseModel(path)
    spilled: list[Path] = []
    put = HiddenStates.put

    def spy(self: HiddenStates, i: int, t: torch.Tensor) -> None:
        put(self, i, t)
        if self._dir is not None:
            spilled.append(Path(self._dir.name))

    monkeypatch.setattr(HiddenStates, "put", spy)
    on_disk, _ = CRITERIA.get("bip").score_layerwise(lw, lw.adapter, req, activations_mib=0)
    assert_same(in_memory, on_disk)
    assert spilled, "with a 0 MiB budget the hidden states must go to disk"
    assert list((tmp_path / "tmp").iterdir()) == []  # the temporary folder is removed


def test_only_the_layers_up_to_the_last_scored_one_are_read(tmp_path, tokenizer, monkeypatch) -> None:
    _, path = saved("llama", False, tmp_path, tokenizer)
    lw = LayerwiseModel(path)
    read: list[str] = []
    original = LayerwiseModel.read
    monkeypatch.setattr(LayerwiseModel, "read", lambda self, name: read.append(name) or original(self, name))
    CRITERIA.get("activation").score_layerwise(lw, lw.adapter, request(WIDTH, [0, 1]))
    assert read and all(name.startswith(("model.layers.0.", "model.layers.1.")) for name in read)
    # The embedding is read by rows (safetensors slices), never as a whole matrix; the head is not read.
    assert not any("embed" in n or "lm_head" in n for n in read)


@pytest.mark.parametrize(
    ("family", "tie", "pruned"), [("llama", False, False), ("qwen2", True, True), ("mistral", True, False)]
)
def test_layerwise_perplexity_equals_the_in_memory_perplexity(family, tie, pruned, tmp_path, tokenizer) -> None:
    model, path = saved(family, tie, tmp_path, tokenizer, pruned)
    chunks = calibration(9, 16)
    expected = perplexity(model, chunks, batch_size=4)
    got = perplexity_layerwise(LayerwiseModel(path), chunks, batch_size=4)
    assert got["tokens"] == expected["tokens"]
    assert got["nll"] == pytest.approx(expected["nll"], rel=1e-6)


def load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_score_stage_writes_the_same_file_in_both_modes(tmp_path, tokenizer) -> None:
    _, path = saved("qwen2", False, tmp_path, tokenizer)
    save_file({"input_ids": calibration()}, str(tmp_path / "calib.safetensors"))
    files = {}
    for offload in ("none", "layerwise"):
        params = parse_params({"model": {"offload": offload}, "score": {"criterion": "flap", "batch_size": 3}})
        files[offload] = tmp_path / f"{offload}.safetensors"
        load_stage("score").score(
            params, model_dir=path, calibration_file=tmp_path / "calib.safetensors", out=files[offload]
        )
    assert_same(load_file(str(files["none"])), load_file(str(files["layerwise"])))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"score": {"criterion": "param_first"}}, "score.criterion"),
        ({"score": {"criterion": "lora"}}, "score.criterion"),
        ({"model": {"device_map": "auto"}}, "model.device_map"),
        ({"evaluate": {"zero_shot": {"tasks": ["auto_mc"]}}}, "evaluate.zero_shot.tasks"),
        ({"prune": {"units": ["hidden_channel"]}}, "prune.units"),
        ({"prune": {"schedule": "kshot"}}, "prune.schedule"),
        ({"prune": {"schedule": "iterative"}}, "prune.schedule"),
        ({"prune": {"allocation": "search"}}, "prune.allocation"),
    ],
)
def test_what_layerwise_cannot_do_is_refused_by_params(overrides, key) -> None:
    raw = {"model": {"offload": "layerwise"}, "evaluate": {"zero_shot": {"tasks": []}}, "score": {"criterion": "bip"}}
    for section, values in overrides.items():
        raw[section] = raw.get(section, {}) | values
    with pytest.raises(ParamsError, match=rf"'{key}'.*layerwise"):
        check_choices(parse_params(raw))


def test_a_model_missing_a_layer_tensor_is_refused_before_any_work(tmp_path, tokenizer) -> None:
    _, path = saved("llama", False, tmp_path, tokenizer)
    weights = load_file(str(path / "model.safetensors"))
    del weights["model.layers.2.mlp.up_proj.weight"]
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(PrunekitError, match=r"lacks 1 weight.*model.layers.2.mlp.up_proj.weight"):
        LayerwiseModel(path)


def test_evaluate_stage_measures_the_same_perplexity_in_both_modes(tiny_model_dir, tmp_path) -> None:
    import json

    text = tmp_path / "text"
    text.mkdir()
    rows = [f"line {i} of some evaluation text with words and more words" for i in range(60)]
    (text / "evaluation.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    got = {}
    for offload in ("none", "layerwise"):
        params = parse_params({
            "model": {"offload": offload},
            "evaluate": {"seq_lens": [16], "max_chunks": 6, "zero_shot": {"tasks": []},
                         "speed": {"batch_sizes": [1], "prompt_len": 4, "new_tokens": 2, "repeats": 1}},
        })  # fmt: skip
        load_stage("evaluate").evaluate(
            params, model_dir=tiny_model_dir, text=text, out=tmp_path / f"{offload}.json", made_from="dense"
        )
        got[offload] = json.loads((tmp_path / f"{offload}.json").read_text())
    assert got["layerwise"]["offload"] == "layerwise" and got["layerwise"]["params"] == got["none"]["params"]
    assert got["layerwise"]["ppl"].keys() == got["none"]["ppl"].keys()
    for key, value in got["none"]["ppl"].items():
        assert got["layerwise"]["ppl"][key] == pytest.approx(value, rel=1e-5)
