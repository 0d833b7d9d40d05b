"""A schedule's state folder (DVC ``persist``): checkpoints that let a killed run resume.

A state belongs to the params and inputs it was made with (its fingerprint); a state left by others is
discarded. A resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prunekit.pipeline.outputs import atomic_dir

log = logging.getLogger(__name__)


def fingerprint(payload: dict[str, Any]) -> str:
    """A stable hash of the params and inputs a state belongs to."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_state(state_dir: Path, key: str) -> dict[str, Any] | None:
    """The state folder's record if it belongs to ``key``; else None (and the folder is cleared)."""
    record = state_dir / "state.json"
    if not record.is_file():
        return None
    try:
        state = json.loads(record.read_text())
    except json.JSONDecodeError:
        state = {}
    if state.get("fingerprint") != key:
        log.info("schedule state in %s belongs to other params or inputs: starting over", state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
        return None
    return state


def write_state(state_dir: Path, key: str, record: dict[str, Any], write: Callable[[Path], None]) -> None:
    """Replace the checkpoint atomically: ``write(tmp)`` fills the folder, then the record is added."""
    with atomic_dir(state_dir) as tmp:
        write(tmp)
        (tmp / "state.json").write_text(json.dumps({"fingerprint": key, **record}, indent=2) + "\n")


def digest(path: Path) -> str:
    """sha256 of a file, or of every file in a folder (relative names and contents): an input's fingerprint."""
    h = hashlib.sha256()
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            h.update(f.read_bytes())
    return h.hexdigest()
