"""The validate stage's checks against the inputs (prunekit.pipeline.preflight, prunekit.pipeline.tracked): what a
stage would refuse once it reads the model or the text is refused before any stage runs."""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, downloaded_base, tiny_params
from test_criteria_activation import load_stage

from prunekit.errors import ParamsError
from prunekit.models.loading import model_shapes
from prunekit.pipeline.params import parse_params
from prunekit.pipeline.preflight import input_problems, most_removable, token_needs
from prunekit.pipeline.tracked import check_tracked, tracked_keys
from prunekit.pruning.allocations import make_plan
from prunekit.pruning.plan import PlanRequest
from prunekit.pruning.slicing import layouts

VALIDATE = load_stage("validate")


def params_with(model_dir: Path, **sections: dict) -> object:
    raw = tiny_params(model_dir)
    for section, values in sections.items():
        node = raw
        *path, last = section.split(".")
        for part in path:
            node = node[part]
        node[last] = {**node[last], **values} if isinstance(values, dict) else values
    return parse_params(raw)


def problems(model_dir: Path, text_dir: Path | None = None, **sections: dict) -> list[str]:
    return input_problems(params_with(model_dir, **sections), None, text_dir)


def test_the_target_bound_is_what_a_plan_can_remove(tiny_model_dir: Path) -> None:
    """The most a cut removes (every pruned layer at its fewest units) is reached by a plan, and a target above it
    (plus the tolerance) is refused before scoring, as the prune stage would refuse it after."""
    params = params_with(tiny_model_dir)
    model, adapter = model_shapes(tiny_model_dir)
    units = list(params.prune.units)
    most = most_removable(params, model, adapter, units)
    lays = layouts(model, adapter, units, list(range(1, 3)))
    scores = {f"{lay.unit}.{lay.layer}": torch.rand(lay.count) for lay in lays}
    req = PlanRequest(most, sum(p.numel() for p in model.parameters()), lays, dict(params.prune.round_to), 0.001)
    assert abs(make_plan(scores, req, "uniform").achieved - most) < 1e-9
    over = round(most + params.prune.tolerance + 0.01, 3)
    with pytest.raises(Exception, match="cannot be met"):
        make_plan(scores, PlanRequest(over, req.total_params, lays, req.round_to, params.prune.tolerance), "uniform")
    [line] = problems(tiny_model_dir, prune={"target": over})
    assert line.startswith("params.yaml key 'prune.target'") and f"{most:.3f}" in line
    assert problems(tiny_model_dir, prune={"target": round(most - 0.01, 3)}) == []


def test_skipping_every_layer_is_refused(tiny_model_dir: Path) -> None:
    [line] = problems(tiny_model_dir, prune={"skip_first": 3, "skip_last": 1})
    assert "'prune.skip_first' / 'prune.skip_last'" in line and "4 decoder layers" in line


def test_types_the_kept_widths_cannot_hold_are_refused(tiny_model_dir: Path) -> None:
    """Hidden width 48: llama.cpp's 32-wide blocks fit no weight that reads the hidden state; the search choice,
    the export's one type and the embedding's type are each refused under their own key."""
    found = problems(
        tiny_model_dir, search={"choices": ["rtn4", "q4_0"]}, export={"types": "q8_0", "embedding": "q5_0"}
    )
    assert len(found) == 3
    assert found[0].startswith("params.yaml key 'search.choices[1]': 'q4_0' for model.")
    assert "48 input columns" in found[0]
    assert found[1].startswith("params.yaml key 'export.embedding': model.embed_tokens has 48 input columns")
    assert found[2].startswith("params.yaml key 'export.types'")
    assert problems(tiny_model_dir, search={"choices": ["rtn4", "rtn8"]}, export={"types": "f16"}) == []


def test_head_dim_units_and_per_layer_widths_the_export_cannot_write(tiny_model_dir: Path, tmp_path: Path) -> None:
    [line] = problems(tiny_model_dir, prune={"units": ["attn_kv_group", "attn_vo_dim", "mlp_channel"]})
    assert "prune.units" in line and "attn_vo_dim" in line and "dvc repro evaluate_quantized" in line
    # Qwen3: llama.cpp's graph reads one width for all layers; the tiny params skip the first and last layers.
    from test_families import tiny_family

    from prunekit.models.families import adapter_for

    dense = tiny_family("qwen3", False, 128)
    dense.save_pretrained(tmp_path / "qwen3")
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "qwen3")
    shutil.copy(tiny_model_dir / "tokenizer_config.json", tmp_path / "qwen3")
    assert adapter_for(dense.config).llama_cpp_per_layer_arch is None
    units = {"units": ["attn_kv_group", "mlp_channel"]}
    [line] = problems(tmp_path / "qwen3", prune=units)
    assert "'prune.skip_first' / 'prune.skip_last' / 'prune.allocation'" in line and "qwen3" in line
    uniform = {**units, "skip_first": 0, "skip_last": 0, "allocation": "uniform"}
    assert problems(tmp_path / "qwen3", prune=uniform) == []


def test_lengths_longer_than_the_text_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Token counts from the stages' own tokenization of data/text, when made from the current data params."""
    from prunekit.data.sources import SOURCE_RECORD
    from prunekit.data.tokens import token_stream

    params = params_with(tiny_model_dir)
    text = tmp_path / "text"
    text.mkdir()
    docs = {"calibration": ["def f(x):\n    return x"] * 20, "training": ["class A: pass"] * 30,
            "evaluation": ["import os"] * 40}  # fmt: skip
    for role, rows in docs.items():
        (text / f"{role}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in rows))
    (text / SOURCE_RECORD).write_text(json.dumps(params.data.model_dump()))
    from transformers import AutoTokenizer

    n = token_stream(AutoTokenizer.from_pretrained(tiny_model_dir), docs["calibration"]).numel()
    # The base model of the current source (its record says so) gives the tokenizer.
    base = downloaded_base(tiny_model_dir, tmp_path / "base")
    [line] = input_problems(params_with(tiny_model_dir, calibrate={"seq_len": n + 1}), base, text)
    assert line.startswith("params.yaml key 'calibrate.seq_len'") and f"({n} tokens" in line
    assert input_problems(params_with(tiny_model_dir, calibrate={"seq_len": n}), base, text) == []
    # Texts made from other data params are not read.
    (text / SOURCE_RECORD).write_text(json.dumps({**params.data.model_dump(), "text_field": "other"}))
    assert all("calibrate.seq_len" not in p for p in input_problems(
        params_with(tiny_model_dir, calibrate={"seq_len": n + 1}), base, text))  # fmt: skip
    keys = {need.key for need in token_needs(params)}
    assert {"calibrate.seq_len", "recover.lora.seq_len", "quantize.lora.seq_len"} <= keys


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"\n\n", "gave no documents"), (b'{"body": "x"}\n', "text"), (b"\xff\xfe\x00bad", "not valid UTF-8")],
)
def test_bad_local_text_files_are_refused(tiny_model_dir: Path, tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / ("t.jsonl" if content.startswith(b"{") else "t.txt")
    path.write_bytes(content)
    found = problems(tiny_model_dir, data={"calibration": str(path)})
    assert len(found) == 1 and found[0].startswith("params.yaml key 'data.calibration'") and message in found[0]


def test_an_unreachable_hub_is_refused_in_seconds(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hf: data and model sources while the Hub cannot be reached (this machine: no route to it)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    found = problems(tiny_model_dir, data={"training": "hf:wikitext2"})
    assert len(found) == 1 and found[0].startswith("params.yaml key 'data.training': data.training 'hf:wikitext2'")
    assert "unreachable" in found[0] and "HF_HUB_OFFLINE=1" in found[0]
    [line] = input_problems(params_with(tiny_model_dir, model={"source": "hf:org/missing-model"}), None, None)
    assert line.startswith("params.yaml key 'model.source'") and "unreachable" in line
    assert time.perf_counter() - start < 30


def test_tracked_keys_must_be_in_params_yaml() -> None:
    keys = tracked_keys(ROOT / "dvc.yaml", "params.yaml")
    assert keys["model.source"] == ["download_model"] and "seed" in keys and "data" in keys
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    check_tracked(committed, ROOT / "dvc.yaml", "params.yaml")
    with pytest.raises(ParamsError, match=r"^params.yaml holds none of the \d+ keys"):
        check_tracked(None, ROOT / "dvc.yaml", "params.yaml")
    partial = copy.deepcopy(committed)
    del partial["model"]["source"]
    with pytest.raises(ParamsError) as e:
        check_tracked(partial, ROOT / "dvc.yaml", "params.yaml")
    assert str(e.value).splitlines() == [
        "params.yaml key 'model.source': missing, and dvc.yaml's stage download_model tracks it; add it (its default "
        "is in docs/params.md) or restore the file (git checkout params.yaml)"
    ]


def test_the_validate_stage_runs_every_check(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The stage's check: the tracked keys, the registries and the inputs, every problem at once."""
    raw = tiny_params(tiny_model_dir)
    raw["prune"]["target"] = 0.9
    raw["score"]["criterion"] = "tayler"
    del raw["seed"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    args = argparse.Namespace(params=tmp_path / "params.yaml", model=tmp_path / "none", text=tmp_path / "none",
                              dvcfile=ROOT / "dvc.yaml")  # fmt: skip
    with pytest.raises(ParamsError, match="'seed': missing"):
        VALIDATE.check(parse_params(raw), args)
    raw["seed"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError) as e:
        VALIDATE.check(parse_params(raw), args)
    lines = str(e.value).splitlines()
    assert any("'score.criterion'" in line for line in lines) and any("'prune.target'" in line for line in lines)
