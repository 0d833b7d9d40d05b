"""params.yaml validation: every error names the key, what was given, and the valid choices."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prunekit.errors import ParamsError
from prunekit.pipeline.params import LoraParams, Params, load_params, parse_params
from prunekit.pipeline.validation import check_choices

ROOT = Path(__file__).resolve().parents[1]


def test_the_params_reference_names_every_key() -> None:
    """docs/params.md has a row for every key (a LoRA section's keys once, in the shared table)."""
    from pydantic import BaseModel

    text = (ROOT / "docs" / "params.md").read_text()
    missing = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            kind, key = field.annotation, prefix + name
            if isinstance(kind, type) and issubclass(kind, BaseModel) and not issubclass(kind, LoraParams):
                walk(kind, key + ".")
            elif f"| `{key}` |" not in text:
                missing.append(key)

    walk(Params, "")
    missing += [f"<section>.lora.{name}" for name in LoraParams.model_fields if f"| `{name}` |" not in text]
    assert missing == []


def test_repository_params_are_valid_and_complete() -> None:
    params = load_params(ROOT / "params.yaml")
    check_choices(params)
    # Every key the dataclasses define is written in params.yaml (no hidden defaults).
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, model in params:
        if hasattr(type(model), "model_fields"):
            assert sorted(raw[section]) == sorted(type(model).model_fields), section


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
