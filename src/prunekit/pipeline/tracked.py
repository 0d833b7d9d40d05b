"""The params keys dvc.yaml's stages track, which params.yaml must spell out.

A stage that tracks a key DVC cannot find in params.yaml fails in DVC, after DVC deleted that stage's outputs;
the typed defaults would fill the key for prunekit, not for DVC. The validate stage refuses such a file first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from prunekit.errors import ParamsError


def tracked_keys(dvc_yaml: Path, params_file: str) -> dict[str, list[str]]:
    """Each dotted key of ``params_file`` (its name as dvc.yaml writes it; bare keys belong to DVC's default params
    file, which the stage passes) a stage of ``dvc_yaml`` lists under ``params``, with the stages."""
    stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages", {})
    keys: dict[str, list[str]] = {}
    for name, stage in stages.items():
        for entry in stage.get("params", []) or []:
            names = [entry] if isinstance(entry, str) else entry.get(params_file, []) if isinstance(entry, dict) else []
            for key in names:
                keys.setdefault(str(key), []).append(name)
    return keys


def has_key(raw: Any, key: str) -> bool:
    """Whether the mapping ``raw`` holds the dotted ``key``."""
    node = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_tracked(raw: Any, dvc_yaml: Path, params_file: str) -> None:
    """Refuse a params mapping that lacks a key dvc.yaml tracks (one line naming them and the stages)."""
    keys = tracked_keys(dvc_yaml, params_file)
    missing = [key for key in keys if not has_key(raw, key)]
    if not missing:
        return
    if len(missing) == len(keys):
        raise ParamsError(
            f"params.yaml holds none of the {len(keys)} keys dvc.yaml's stages track ({', '.join(sorted(keys))}); "
            "restore it (git checkout params.yaml) or start from the committed one"
        )
    raise ParamsError(
        "\n".join(
            f"params.yaml key '{key}': missing, and dvc.yaml's stage {', '.join(keys[key])} tracks it; add it (its "
            "default is in docs/params.md) or restore the file (git checkout params.yaml)"
            for key in missing
        )
    )
