"""Atomic outputs: write into a temporary sibling, then rename, so that an interrupted stage leaves
nothing half-written where DVC (or a user) would look for a finished output."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Delete what a killed writer of ``final`` left beside it (``.<name>.tmp-<pid>-*`` of a dead pid)."""
    removed = []
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        pid = tmp.name[len(f".{final.name}.tmp-") :].split("-", 1)[0]
        if pid.isdigit() and _pid_alive(int(pid)) and int(pid) != os.getpid():
            continue  # another live process is writing it
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def temporary_prefix(final: Path) -> str:
    """The name prefix of this process's temporary siblings of ``final`` (see remove_stale_temporaries)."""
    return f".{final.name}.tmp-{os.getpid()}-"


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``path`` only if the block succeeds.

    The temporary name carries the writer's pid, so the next writer removes what a killed one left.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(final), dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path that replaces ``path`` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    fd, name = tempfile.mkstemp(prefix=temporary_prefix(final), dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """Read a JSON file, or raise an error naming ``what`` was expected there."""
    from prunekit.errors import PrunekitError

    p = Path(path)
    if not p.is_file():
        raise PrunekitError(f"{what} not found at '{p}'. Run the stage that produces it (dvc repro).")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PrunekitError(f"{what} at '{p}' is not valid JSON ({e}); delete it and rerun its stage.") from e
