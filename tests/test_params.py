"""params.yaml validation: every error names the key, what was given, and the valid choices."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prunekit.errors import ParamsError
from prunekit.pipeline.params import LoraParams, Params, load_params, parse_params
from prunekit.pipeline.validation import check_choices

ROOT = Path(__file__).resolve().parents[1]


def documented_defaults() -> dict[str, str]:
    """docs/params.md's default column, by key (backticks removed)."""
    import re

    rows = {}
    for line in (ROOT / "docs" / "params.md").read_text().splitlines():
        m = re.match(r"^\| `([a-z_0-9.]+)` \| (.*?) \| ", line)
        if m:
            rows[m.group(1)] = m.group(2).replace("`", "").strip()
    return rows


def test_the_params_reference_names_every_key_with_its_default() -> None:
    """docs/params.md has a row for every key with its default (a LoRA section's keys in the shared table, one
    column per section)."""
    from pydantic import BaseModel

    from prunekit.pipeline.params import LoraTrainingParams
    from prunekit.pipeline.params_file import scalar

    rows = documented_defaults()
    missing, wrong = [], []

    def walk(model: BaseModel, prefix: str) -> None:
        for name in type(model).model_fields:
            value, key = getattr(model, name), prefix + name
            if isinstance(value, LoraTrainingParams):
                continue  # the shared table below
            if isinstance(value, BaseModel):
                walk(value, key + ".")
            elif key not in rows:
                missing.append(key)
            elif rows[key] != scalar(value):
                wrong.append((key, rows[key], scalar(value)))

    defaults = Params()
    walk(defaults, "")
    text = (ROOT / "docs" / "params.md").read_text()
    table = {line.split("|")[1].strip().strip("`"): [c.strip() for c in line.split("|")[3:7]]
             for line in text.split("## LoRA sections")[1].splitlines() if line.startswith("| `")}  # fmt: skip
    sections = [defaults.score.lora, defaults.schedule.lora, defaults.recover.lora, defaults.quantize.lora]
    for name, cells in table.items():
        for section, cell in zip(sections, cells, strict=True):
            value = getattr(section, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and float(cell) != value:
                wrong.append((f"<section>.lora.{name}", cell, value))
    missing += [f"<section>.lora.{n}" for n in LoraParams.model_fields if n not in table]
    assert missing == [] and wrong == []


def test_params_yaml_is_the_rendering_of_the_typed_defaults() -> None:
    """One home for every value: the committed params.yaml is rendered from the typed defaults (a key left out of a
    params file takes the value params.yaml shows); regenerate with python scripts/params_yaml.py --write."""
    from prunekit.pipeline.params_file import render

    assert (ROOT / "params.yaml").read_text() == render(Params())
    assert load_params(ROOT / "params.yaml") == parse_params({})
    check_choices(parse_params({}))


def test_repository_params_are_valid_and_complete() -> None:
    names = sorted(p.name for p in ROOT.glob("params*.yaml"))
    assert {"params.yaml", "params-paper.yaml", "params-flap.yaml", "params-gpu.yaml"} <= set(names)
    for name in names:
        params = load_params(ROOT / name)
        if params.model.device != "cpu":  # the GPU profile, checked here as it would be with its device
            params = params.model_copy(update={"model": params.model.model_copy(update={"device": "cpu"})})
        check_choices(params)
        # Every key the sections define is written in the file (no hidden defaults).
        raw = yaml.safe_load((ROOT / name).read_text())

        def same_keys(model: object, node: object, where: str) -> None:
            fields = type(model).model_fields
            assert isinstance(node, dict) and sorted(node) == sorted(fields), where
            for key in fields:
                value = getattr(model, key)
                if hasattr(type(value), "model_fields"):
                    same_keys(value, node[key], f"{where}.{key}")

        for section, model in params:
            if hasattr(type(model), "model_fields"):
                same_keys(model, raw[section], f"{name}: {section}")


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"prune": {"targte": 0.3}}, "params.yaml key 'prune.targte': unknown key. Did you mean 'target'?"),
        ({"prune": {"target": 1.5}}, "params.yaml key 'prune.target': Input should be less than 1 (given: 1.5)"),
        ({"prune": {"target": 0}}, "params.yaml key 'prune.target': Input should be greater than 0"),
        (
            {"recover": {"lora": {"steps": -1}}},
            "params.yaml key 'recover.lora.steps': Input should be greater than or equal to 0",
        ),
        ({"recover": {"rank": 4}}, "params.yaml key 'recover.rank' was renamed to 'recover.lora.rank'"),
        (
            {"quantize": {"qlora_steps": 4}},
            "params.yaml key 'quantize.qlora_steps' was renamed to 'quantize.lora.steps'",
        ),
        ({"score": {"lora_lr": 0.1}}, "params.yaml key 'score.lora_lr' was renamed to 'score.lora.learning_rate'"),
        (
            {"schedule": {"iterative_steps": 50}},
            "params.yaml key 'schedule.iterative_steps' was renamed to 'schedule.lora.steps'",
        ),
        ({"pruen": {}}, "params.yaml key 'pruen': unknown key. Did you mean 'prune'?"),
        ({"model": {"dtype": "fp8"}}, "params.yaml key 'model.dtype': Input should be 'float32', 'bfloat16' or"),
        ({"calibrate": {"samples": "ten"}}, "params.yaml key 'calibrate.samples': Input should be a valid integer"),
    ],
)
def test_bad_values_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "section,key,value,message",
    [
        ("score", "criterion", "tayler", "params.yaml key 'score.criterion': Unknown criterion 'tayler'."),
        (
            "prune",
            "units",
            ["mlp_chanel"],
            "params.yaml key 'prune.units[0]': Unknown unit type 'mlp_chanel'. Did you mean 'mlp_channel'? Available: ",
        ),
        (
            "prune",
            "allocation",
            "unifrom",
            "params.yaml key 'prune.allocation': Unknown allocation 'unifrom'. Did you mean 'uniform'?",
        ),
        ("model", "source", "/nonexistent/model", "params.yaml key 'model.source'"),
        ("data", "evaluation", "python-doc", "params.yaml key 'data.evaluation'"),
        ("prune", "units", [], "params.yaml key 'prune.units': empty"),
    ],
)
def test_registry_choices_name_the_key(section: str, key: str, value: object, message: str) -> None:
    params = parse_params({section: {key: value}})
    with pytest.raises(ParamsError) as err:
        check_choices(params)
    assert message in str(err.value)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="params file .* not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("prune: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="must be a mapping"):
        load_params(tmp_path / "list.yaml")


def test_combinations_that_cannot_work_are_refused() -> None:
    check_choices(parse_params({"prune": {"units": ["attn_query_head", "attn_qk_dim", "attn_vo_dim"]}}))  # planned
    params = parse_params({"prune": {"bias_compensation": True}, "score": {"criterion": "l1"}})
    with pytest.raises(ParamsError, match=r"prune.bias_compensation': needs the mean activations.*flap"):
        check_choices(params)
    check_choices(parse_params({"prune": {"bias_compensation": True}, "score": {"criterion": "flap"}}))
    # A lower-precision frozen base only for criteria that never differentiate the base weights.
    params = parse_params({"score": {"criterion": "param_first", "base_dtype": "bfloat16"}})
    with pytest.raises(ParamsError, match=r"score.base_dtype': criterion 'param_first' differentiates the base"):
        check_choices(params)
    check_choices(parse_params({"score": {"criterion": "lora", "base_dtype": "bfloat16"}}))
