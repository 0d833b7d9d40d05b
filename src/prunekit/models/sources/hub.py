"""Hugging Face model directories: a local one (``model.source`` is its path) or a Hub repository
(``hf:<repo_id>[@<revision>]``) downloaded with ``snapshot_download``. Either way the model files are
checked (complete, unquantized, safetensors only) and copied into the output directory."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError, is_network_error
from prunekit.models.checkpoint_files import (
    HF_ALLOW_PATTERNS,
    MODEL_FILE_PATTERNS,
    PICKLE_PATTERNS,
    TOKENIZER_PATTERNS,
    matches,
)
from prunekit.models.sources.hashing import _copy_with_sha256
from prunekit.models.sources.spec import SOURCES, ModelSource, SourceSpec, _source_help

log = logging.getLogger(__name__)

# --- local Hugging Face directories (also what hf: downloads into) --------------------------------------


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
    weights = [n for n in names if matches(n, ("*.safetensors",))]
    if not weights:
        pickles = sorted(n for n in names if matches(n, PICKLE_PATTERNS))
        found = f"it has only pickle weights ({', '.join(pickles)})" if pickles else "it has no weights"
        raise PrunekitError(
            f"model.source '{source}': safetensors weights are required, but {found} in '{model_dir}'. "
            "Pickled checkpoints can run code when loaded, so prunekit does not read them; convert the model "
            "with `model.save_pretrained(dir, safe_serialization=True)` in a trusted environment, or use a "
            "repository that publishes .safetensors."
        )
    _check_shards(model_dir, names, source)
    if not any(matches(n, TOKENIZER_PATTERNS) for n in names):
        raise PrunekitError(
            f"model.source '{source}': '{model_dir}' has no tokenizer files (tokenizer.json, "
            "tokenizer.model, vocab.json + merges.txt, ...). Copy the tokenizer of the base model into it."
        )
    return [p for p in files if matches(p.name, MODEL_FILE_PATTERNS)]


def _check_config(path: Path, source: str) -> None:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrunekitError(f"model.source '{source}': '{path}' is not valid JSON ({e}).") from e
    if not isinstance(config, dict) or "model_type" not in config:
        raise PrunekitError(
            f"model.source '{source}': '{path}' has no 'model_type', so it is not a transformers config."
        )
    check_model_type(str(config["model_type"]), f"model.source '{source}'")
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        # Dropping the key would not dequantize the weights, so a quantized checkpoint cannot be used as is.
        raise PrunekitError(
            f"model.source '{source}': '{path}' describes a quantized checkpoint (quant_method={method}); "
            "prunekit starts from full-precision weights. Use the unquantized model, or a .gguf file "
            "(which is dequantized on conversion)."
        )


def check_model_type(model_type: str, what: str) -> None:
    """Refuse a config ``model_type`` that no registered model family reads (from config.json alone)."""
    from prunekit.models.families import supported_model_types

    supported = supported_model_types()
    if model_type.removeprefix("prunekit_") not in supported:  # a pruned directory: its family's pruned config
        raise PrunekitError(
            f"{what}: unsupported architecture '{model_type}' (from config.json). Supported model types: "
            f"{', '.join(supported)}."
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
    # No absolute path: the record is part of the model directory's DVC hash (same files, same hash).
    return {"source": spec.raw, "kind": "dir", "files": files}


# --- hf: ----------------------------------------------------------------------------------------------


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
    if isinstance(e, (LocalEntryNotFoundError, ConnectionError, TimeoutError)) or is_network_error(e):
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

    assert spec.repo_id is not None, "an hf: spec names its repository (_parse_hf)"

    log.info("downloading %s (revision %s) from the Hugging Face Hub", spec.repo_id, spec.revision or "main")
    try:
        # config.json first: an architecture no family reads is refused before any weight is downloaded.
        head = Path(
            huggingface_hub.snapshot_download(spec.repo_id, revision=spec.revision, allow_patterns=["config.json"])
        )
        if (head / "config.json").is_file():
            _check_config(head / "config.json", spec.raw)
        snapshot = Path(
            huggingface_hub.snapshot_download(
                spec.repo_id, revision=spec.revision, allow_patterns=list(HF_ALLOW_PATTERNS)
            )
        )
    except Exception as e:
        # The hub's own errors are OSErrors (HfHubHTTPError included); anything else is a bug: keep it.
        if isinstance(e, (HfHubHTTPError, OSError)) or is_network_error(e):
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


_REPO_PART_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")


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


class HubSource(ModelSource):
    """``hf:<repo_id>[@<revision>]``: a Hugging Face Hub repository with safetensors weights."""

    kind = prefix = "hf"
    syntax = "'hf:<org>/<name>[@<revision>]'"

    def parse(self, source: str, rest: str) -> SourceSpec:
        return _parse_hf(source, rest)

    def check(self, spec: SourceSpec) -> None:
        """Nothing to look at before the download (the syntax was checked when parsing)."""

    def materialize(self, spec: SourceSpec, out_dir: Path, cache_dir: Path | None) -> dict[str, Any]:
        return _materialize_hf(spec, out_dir)

    def preview(self, spec: SourceSpec) -> Path | None:
        """The repository's config.json alone (one small download, or the cache in offline mode); an unreachable
        Hub is refused here, in seconds."""
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError

        assert spec.repo_id is not None, "an hf: spec names its repository (_parse_hf)"
        try:
            head = Path(
                huggingface_hub.snapshot_download(
                    spec.repo_id, revision=spec.revision, allow_patterns=["config.json"], etag_timeout=10
                )
            )
        except Exception as e:
            if isinstance(e, (HfHubHTTPError, OSError)) or is_network_error(e):
                raise _hub_error(spec, e) from None
            raise
        if not (head / "config.json").is_file():
            raise PrunekitError(f"model.source '{spec.raw}': the repository has no config.json")
        _check_config(head / "config.json", spec.raw)
        return head


class DirSource(ModelSource):
    """A local Hugging Face model directory (it has ``config.json``) with safetensors weights."""

    kind = "dir"
    syntax = "a local Hugging Face model directory"
    fallback = True  # any local path no other kind claims

    def check(self, spec: SourceSpec) -> None:
        assert spec.path is not None
        _model_files(spec.path, spec.raw)

    def materialize(self, spec: SourceSpec, out_dir: Path, cache_dir: Path | None) -> dict[str, Any]:
        return _materialize_dir(spec, out_dir)

    def architecture(self, spec: SourceSpec) -> str | None:
        assert spec.path is not None
        return str(json.loads((spec.path / "config.json").read_text())["model_type"])

    def preview(self, spec: SourceSpec) -> Path | None:
        return spec.path


SOURCES.register(HubSource.kind)(HubSource())
SOURCES.register(DirSource.kind)(DirSource())
