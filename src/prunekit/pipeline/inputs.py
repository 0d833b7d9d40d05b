"""Reading the files stages hand each other (JSONL texts, safetensors tensors), with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prunekit.errors import PrunekitError


def read_documents(text_dir: Path, role: str) -> list[str]:
    """Documents of one role from ``<text_dir>/<role>.jsonl`` (written by the download stage), of every source."""
    return [doc for group in read_document_groups(text_dir, role) for doc in group]


def read_document_groups(text_dir: Path, role: str) -> list[list[str]]:
    """Documents of one role from ``<text_dir>/<role>.jsonl``, one list per source (the ``source`` index the
    download stage writes when a role has several; without it, one source)."""
    path = text_dir / f"{role}.jsonl"
    if not path.is_file():
        raise PrunekitError(f"{role} texts not found at '{path}'; run the download stage (dvc repro)")
    groups: dict[int, list[str]] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                groups.setdefault(int(row.get("source", 0)), []).append(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
                raise PrunekitError(f"'{path}' line {n} is not a JSON object with 'text' ({e})") from e
    if not groups:
        raise PrunekitError(f"'{path}' holds no documents; check data.{role} in params.yaml")
    if sorted(groups) != list(range(len(groups))):
        raise PrunekitError(f"'{path}' numbers its sources {sorted(groups)}, not 0..{len(groups) - 1}; rerun the "
                            "download stage (dvc repro)")  # fmt: skip
    return [groups[i] for i in range(len(groups))]


def read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or an error naming ``what`` and how to regenerate it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise PrunekitError(f"{what} not found at '{path}'; run the stage that writes it (dvc repro)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise PrunekitError(f"{what} at '{path}' is corrupt ({e}); delete it and rerun its stage") from e
