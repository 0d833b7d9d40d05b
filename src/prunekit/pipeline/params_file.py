"""params.yaml as rendered from the typed params: their defaults are its values, their descriptions its comments.

The committed params.yaml is ``render(Params())`` (``python scripts/params_yaml.py --write`` writes it;
tests/test_params.py fails when it differs), so the first-look profile has one home: the defaults in
:mod:`prunekit.pipeline.params`. A key a user deletes takes the value the file showed.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

import yaml
from pydantic import BaseModel

from prunekit.pipeline.params import Params

HEADER = """\
Every hyper-parameter of the pipeline; paths live in dvc.yaml. `prunekit list` prints the valid names.
This is the first-look profile (about 10 minutes on 2 CPU cores); params-paper.yaml has the budgets of the
README's comparison tables (see README "Profiles"). Rendered from the typed defaults of prunekit.pipeline.params
(python scripts/params_yaml.py --write); edit values freely, a key left out takes the value shown here."""
WIDTH = 120  # characters a line may take
COMMENT_AT = 36  # the column comments start at, where the key and value leave room


def scalar(value: Any) -> str:
    """``value`` as YAML flow text: plain where YAML reads it back as it is, else double-quoted."""
    if isinstance(value, str) and ("\n" in value or value != value.strip() or value == ""):
        return json.dumps(value)  # a double-quoted YAML string (JSON's escapes are YAML's)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _line(indent: int, text: str, comment: str | None) -> list[str]:
    if not comment:
        return [" " * indent + text]
    at = max(COMMENT_AT, indent + len(text) + 1)
    wrapped = textwrap.wrap(comment, WIDTH - at - 2, break_on_hyphens=False) or [""]
    out = [f"{' ' * indent}{text}".ljust(at) + f"# {wrapped[0]}"]
    out += [" " * at + f"# {rest}" for rest in wrapped[1:]]
    return out


def _section(model: BaseModel, indent: int) -> list[str]:
    lines: list[str] = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            if indent == 0 and lines:
                lines.append("")
            lines += _line(indent, f"{name}:", field.description)
            lines += _section(value, indent + 2)
        elif isinstance(value, dict):
            lines += _line(indent, f"{name}:", field.description)
            lines += [f"{' ' * (indent + 2)}{key}: {scalar(v)}" for key, v in value.items()]
        else:
            lines += _line(indent, f"{name}: {scalar(value)}", field.description)
    return lines


def render(params: Params) -> str:
    """The text of a params file holding ``params``, every key with its description."""
    header = [f"# {line}" for line in HEADER.splitlines()]
    return "\n".join([*header, *_section(params, 0)]) + "\n"
