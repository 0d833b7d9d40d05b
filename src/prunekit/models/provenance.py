"""What a saved model directory may hold, and where the rest of its provenance goes.

A model directory is a DVC output whose hash every later stage depends on, so it holds only what determines
the model: weights, config, tokenizer, plan and the params that made it. What depends on the machine (library
versions, absolute paths) would change that hash from one machine or install to the next and rerun the whole
pipeline; :func:`make_reproducible` strips it after saving, and :func:`library_versions` goes into the
evaluation metrics and `prunekit info` instead.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

# Keys transformers and peft write into the JSON files they save, naming the installed release.
VERSION_KEYS = ("transformers_version", "peft_version")
# peft records where the base model was loaded from (a path on this machine).
PATH_KEYS = ("base_model_name_or_path",)
# peft keeps these as sets and writes them in the process's hash order, which changes from run to run.
SET_KEYS = ("target_modules", "exclude_modules")
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "lm_eval")


def make_reproducible(out_dir: Path) -> None:
    """Remove version and path records from the JSON files of a saved model directory (and its adapter
    folders), sort the lists peft writes from sets, and delete peft's generated model card, which repeats them."""
    for f in sorted(Path(out_dir).rglob("*.json")):
        try:
            data = json.loads(f.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict) or not set(data) & {*VERSION_KEYS, *PATH_KEYS, *SET_KEYS}:
            continue
        for key in VERSION_KEYS:
            data.pop(key, None)
        for key in PATH_KEYS:
            if key in data:
                data[key] = None
        for key in SET_KEYS:
            if isinstance(data.get(key), list):
                data[key] = sorted(data[key])
        f.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for card in Path(out_dir).rglob("README.md"):
        if (card.parent / "adapter_config.json").is_file():
            card.unlink()


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose releases can move prunekit's numbers."""
    import platform

    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


def write_model_record(out_dir: Path, record: dict) -> None:
    """``prunekit.json``: the model's source, plan and params, written canonically (sorted keys), so that the
    same record always gives the same bytes."""
    (Path(out_dir) / "prunekit.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
