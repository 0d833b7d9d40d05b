"""Perplexity protocols users can put next to the papers' tables (``evaluate.perplexity``).

Every dataset is read as the rows of one split, joined with a string and tokenized once, then cut into
non-overlapping chunks of each length in ``evaluate.seq_lens``; perplexity = exp(mean NLL of every token
but each chunk's first, predicted from the chunk's own start) (:func:`prunekit.evaluation.perplexity.perplexity`).
This is LLM-Pruner's ``PPLMetric`` protocol:

========== ================================== ========== ===================== ==========================
name        Hub dataset                        split      row field             join
========== ================================== ========== ===================== ==========================
wikitext2   ``wikitext`` / wikitext-2-raw-v1   test       ``text``              ``"\\n\\n"``
ptb         ``ptb_text_only``                  validation ``sentence``          ``evaluate.ptb_join``
c4          ``allenai/c4`` en, first shard     validation ``text``              ``"\\n\\n"``
default     the ``data.evaluation`` text       evaluation ``text``              ``"\\n\\n"``
========== ================================== ========== ===================== ==========================

PTB's join: LLM-Pruner joins its sentences with ``"\\n\\n"`` (the default); GPTQ, SparseGPT and Wanda join
them with ``" "``. The metric name carries the join whenever it is not the default, so two numbers under
one name were always computed the same way: ``<dataset>-<split>-<seq_len>[-join_space]``.

Offline, ``evaluate.local_files.<name>`` points at a local copy of the split in the Hub's own formats, read
with :func:`datasets.load_dataset`: ``.parquet`` (the Hub's files, e.g. ``wikitext-2-raw-v1/test-*.parquet``)
or ``.json`` / ``.jsonl`` / ``.json.gz`` (one row object per line, e.g. C4's
``c4-validation.00000-of-00008.json.gz``), the text in the field above; or ``.txt`` / ``.raw`` with one row
per line as the original loaders made them (``wiki.test.raw``: a non-empty line keeps its line end, an
empty one is an empty row; ``ptb.valid.txt``: each line stripped).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prunekit.data.tokens import JOIN
from prunekit.errors import PrunekitError
from prunekit.registry import suggest


@dataclass(frozen=True)
class PplDataset:
    """A perplexity dataset: its hub spec (see :mod:`prunekit.data.sources`), split and text field."""

    name: str
    spec: str
    split: str
    field: str
    strip_lines: bool  # .txt copies: strip each line (ptb) or keep the line end (wikitext2)


PPL_DATASETS = {
    "wikitext2": PplDataset("wikitext2", "hf:wikitext2", "test", "text", strip_lines=False),
    "ptb": PplDataset("ptb", "hf:ptb", "validation", "sentence", strip_lines=True),
    "c4": PplDataset("c4", "hf:c4", "validation", "text", strip_lines=False),
}
DEFAULT = "default"
PPL_NAMES = (DEFAULT, *PPL_DATASETS)
LOCAL_SUFFIXES = (".parquet", ".json", ".jsonl", ".json.gz", ".txt", ".raw")


def check_ppl_name(name: str) -> None:
    if name not in PPL_NAMES:
        raise PrunekitError(
            f"unknown perplexity dataset '{name}'.{suggest(name, list(PPL_NAMES))} Choose from " + ", ".join(PPL_NAMES)
        )


def _suffix(path: Path) -> str:
    return ".json.gz" if path.name.endswith(".json.gz") else path.suffix


def check_local_file(name: str, path: str | None) -> None:
    """Raise unless ``name`` is a dataset with local copies and ``path`` (None: the Hub) an existing file in
    one of the supported formats."""
    if name not in PPL_DATASETS:
        raise PrunekitError(
            f"no local copy is read for '{name}'.{suggest(name, list(PPL_DATASETS))} Keys: " + ", ".join(PPL_DATASETS)
        )
    if path is None:
        return
    p = Path(path)
    if _suffix(p) not in LOCAL_SUFFIXES:
        raise PrunekitError(f"'{path}': unsupported format; use one of {', '.join(LOCAL_SUFFIXES)} (see README)")
    if not p.is_file():
        raise PrunekitError(f"'{path}' not found (relative paths start at '{Path.cwd()}')")


def read_local_rows(dataset: PplDataset, path: str | Path) -> list[str]:
    """The rows of a local copy of ``dataset``'s split (formats: module docstring), in file order."""
    p = Path(path)
    check_local_file(dataset.name, str(p))
    suffix = _suffix(p)
    if suffix in (".txt", ".raw"):
        lines = p.read_text(encoding="utf-8").splitlines(keepends=True)
        if dataset.strip_lines:
            return [line.strip() for line in lines]
        return [line if line.strip() else "" for line in lines]
    import datasets

    builder = "parquet" if suffix == ".parquet" else "json"
    try:
        rows = datasets.load_dataset(builder, data_files=str(p), split="train")
    except Exception as exc:  # noqa: BLE001  (datasets raises many types for a malformed file)
        raise PrunekitError(f"'{p}' cannot be read as {builder} rows of {dataset.name} ({exc})") from exc
    if dataset.field not in rows.column_names:
        raise PrunekitError(
            f"'{p}' has no '{dataset.field}' column (got {rows.column_names}); {dataset.name} rows keep their text "
            f"in '{dataset.field}'"
        )
    return [text or "" for text in rows[dataset.field]]


def protocol_rows(name: str, local_files: dict[str, str | None]) -> list[str]:
    """The evaluation rows of hub dataset ``name``: its local copy when one is set, else the Hub."""
    from prunekit.data.sources import load_documents

    dataset = PPL_DATASETS[name]
    local = local_files.get(name)
    rows = read_local_rows(dataset, local) if local else load_documents(dataset.spec, "evaluation")
    if not any(row.strip() for row in rows):
        raise PrunekitError(f"perplexity dataset '{name}' ({local or dataset.spec}) has no text")
    return rows


def metric_name(dataset: str, split: str, seq_len: int, join: str = JOIN) -> str:
    """``<dataset>-<split>-<seq_len>``, with the join appended when it is not the default ``"\\n\\n"``."""
    base = f"{dataset}-{split}-{seq_len}"
    if join == JOIN:
        return base
    readable = {" ": "space", "\n": "newline", "": "none"}.get(join, join.encode("unicode_escape").decode())
    return f"{base}-join_{readable}"


@dataclass(frozen=True)
class PplText:
    """One dataset ready to evaluate: its name and split, its rows, and their join string."""

    name: str
    split: str
    rows: list[str]
    join: str = JOIN
