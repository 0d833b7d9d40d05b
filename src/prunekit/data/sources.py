"""Text documents for the three data roles: calibration, training and evaluation.

A *spec* is the string a user writes in params.yaml (``data.calibration``, ``data.training``,
``data.evaluation``). Three forms are accepted:

``python-docs`` (the embedded default)
    The values of :data:`pydoc_data.topics.topics`, the help texts shipped with Python's standard
    library (~465 kB of English prose), so the pipeline runs with no download at all.

``PATH.txt`` / ``PATH.jsonl`` (optionally written ``file:PATH``)
    A local file. ``.txt``: documents separated by one or more blank lines. ``.jsonl``: one JSON
    object per line, the text in ``text_field`` (``"text"`` unless told otherwise).

``hf:wikitext2``, ``hf:ptb``, ``hf:c4``, ``hf:alpaca-cleaned``
    Hugging Face Hub datasets loaded with :func:`datasets.load_dataset`, with the splits of the
    pruning papers: evaluation reads the held-out split (wikitext2: test; ptb and c4: validation)
    and returns its rows as-is, because the evaluator joins them (the LLM-Pruner protocol);
    calibration and training both read the train split, with empty rows dropped. Alpaca has only a
    train split, so it is divided like a local file.

Role split. ``python-docs``, local files and ``hf:alpaca-cleaned`` hold one pool of documents for all
three roles. Each document goes to exactly one role, chosen by a SHA-256 hash of a stable key (the
topic name for ``python-docs``; index and text for files and Alpaca rows): the hash, read as a number
in [0, 1), falls into the evaluation share (:data:`EVALUATION_FRACTION`), then the calibration share
(:data:`CALIBRATION_FRACTION`), then the training share (:data:`TRAINING_FRACTION`). The split never
changes between runs or machines (unlike :func:`hash`, which is salted per process). A text that
occurs more than once in a pool (pydoc's ``if`` and ``else`` topics are identical) follows its first
occurrence, so no text is in two roles. Shares are exact only on average: a pool of n documents gets
about ``fraction * n`` of them, give or take the binomial spread ``sqrt(n * f * (1 - f))``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError, is_network_error
from prunekit.registry import Registry, suggest

log = logging.getLogger(__name__)

ROLES = ("calibration", "training", "evaluation")
SOURCE_RECORD = "source.json"  # beside a text directory's <role>.jsonl files: the ``data`` params they come from

EVALUATION_FRACTION = 0.10
"""Share of a pooled source's documents that go to evaluation."""
CALIBRATION_FRACTION = 0.10
"""Share of a pooled source's documents that go to calibration."""
TRAINING_FRACTION = 1.0 - EVALUATION_FRACTION - CALIBRATION_FRACTION
"""Share of a pooled source's documents that go to training (the rest, 0.80)."""

# Order matters: a hash value u in [0, 1) is matched against these cumulative bounds in turn.
_ROLE_BOUNDS = (
    ("evaluation", EVALUATION_FRACTION),
    ("calibration", EVALUATION_FRACTION + CALIBRATION_FRACTION),
    ("training", 1.0),
)

FILE_PREFIX = "file:"
FILE_SUFFIXES = (".txt", ".jsonl")
_FILE_FORMATS = (
    "a .txt file (documents separated by blank lines) or a .jsonl file "
    "(one JSON object per line, the text in a '{field}' field)"
)

# One or more blank (whitespace-only) lines separate the documents of a .txt file.
_BLANK_LINES = re.compile(r"\n\s*\n")

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

Loader = Callable[[str, str], list[str]]
"""``load(role, text_field) -> documents`` for one registered source."""


@dataclass(frozen=True)
class DataSource:
    """A registered data source: its spec name, a one-line description and its loader."""

    name: str
    description: str
    load: Loader


DATA_SOURCES: Registry[DataSource] = Registry("data source")


def _source(name: str, description: str) -> Callable[[Loader], Loader]:
    """Register the decorated loader as data source ``name``."""

    def add(load: Loader) -> Loader:
        DATA_SOURCES.register(name)(DataSource(name, description, load))
        return load

    return add


# ---------------------------------------------------------------------------------------------------
# Public API


def load_documents(spec: str, role: str, *, text_field: str = "text") -> list[str]:
    """The documents of ``role`` from the source ``spec``; never empty.

    ``text_field`` names the text field of a ``.jsonl`` file; the other sources have fixed fields.
    Raises :class:`PrunekitError` for an unknown spec or role, an unreadable file, an unreachable
    hub, or a role that gets no documents.
    """
    _check_role(role)
    path = _local_path(spec)
    if path is not None:
        _check_file(path, spec)
        docs = _pick_role(_indexed(_read_file(path, text_field)), role)
    else:
        docs = DATA_SOURCES.get(spec).load(role, text_field)
    if not any(doc.strip() for doc in docs):
        raise PrunekitError(f"Data source '{spec}' gave no documents for role '{role}'. " + _empty_hint(path, role))
    log.info(
        "data %s: %d documents, %d characters from '%s'",
        role,
        len(docs),
        sum(len(doc) for doc in docs),
        spec,
    )
    return docs


def validate_spec(spec: str, *, text_field: str = "text") -> None:
    """Check ``spec`` cheaply (syntax, registered name, local file exists) without loading data.

    Raises :class:`PrunekitError` with a did-you-mean suggestion for an unknown name, or naming the
    path of a missing file or one with an unsupported extension.
    """
    path = _local_path(spec)
    if path is None:
        DATA_SOURCES.get(spec)
        return
    _check_file(path, spec)
    if path.suffix == ".jsonl" and (not isinstance(text_field, str) or not text_field):
        raise PrunekitError(
            f"The text field for '{spec}' must be a non-empty string; got {text_field!r}. "
            "Set it to the JSON key that holds each document's text, e.g. 'text'."
        )


def describe_sources() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every registered source, then of the local-file form."""
    rows = [(name, source.description) for name, source in DATA_SOURCES.items()]
    rows.append(
        (
            "PATH.txt | PATH.jsonl",
            "local file (or file:PATH): .txt documents separated by blank lines, "
            ".jsonl one object per line with a 'text' field; split 80/10/10 by hash",
        )
    )
    return rows


# ---------------------------------------------------------------------------------------------------
# Role split


def role_of(key: str) -> str:
    """The role a document with stable ``key`` belongs to (see the module docstring)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    # The top 53 bits, so that the float is exact and strictly below 1.0.
    u = (int.from_bytes(digest[:8], "big") >> 11) / 2.0**53
    for role, bound in _ROLE_BOUNDS:
        if u < bound:
            return role
    return _ROLE_BOUNDS[-1][0]  # not reached (u < 1.0); satisfies the type checker


def _pick_role(pool: Iterable[tuple[str, str]], role: str) -> list[str]:
    """The documents of ``role`` from ``(key, document)`` pairs, in pool order.

    A document already seen under another key keeps its first key's role: hashing each copy on its
    own could put the same text in training and evaluation.
    """
    first_role: dict[str, str] = {}
    picked = []
    for key, doc in pool:
        if doc not in first_role:
            first_role[doc] = role_of(key)
        if first_role[doc] == role:
            picked.append(doc)
    return picked


def _indexed(docs: Sequence[str]) -> list[tuple[str, str]]:
    """Key each document of a file or an index-only dataset by its position and text."""
    return [(f"{i}:{doc}", doc) for i, doc in enumerate(docs)]


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise PrunekitError(
            f"Unknown data role '{role}'.{suggest(str(role), list(ROLES))} Available: {', '.join(ROLES)}"
        )


def _empty_hint(path: Path | None, role: str) -> str:
    """How to fix a role that got no documents."""
    if path is not None:
        share = {"evaluation": EVALUATION_FRACTION, "calibration": CALIBRATION_FRACTION}.get(role, TRAINING_FRACTION)
        return (
            f"The file '{path}' is split by hash, about {share:.0%} of its documents going to "
            f"'{role}'; it needs more (non-empty) documents, e.g. at least 30 so every role gets some."
        )
    return "Check the source, or point this role at a local .txt or .jsonl file with more text."


# ---------------------------------------------------------------------------------------------------
# Embedded default


@_source(
    "python-docs",
    "Python's built-in help topics (pydoc_data, ~465 kB of English prose); no download; split 80/10/10 by hash",
)
def _python_docs(role: str, text_field: str) -> list[str]:
    """The non-empty pydoc topics of ``role``, in sorted key order, keyed by the topic name."""
    from pydoc_data.topics import topics

    return _pick_role(((key, topics[key]) for key in sorted(topics) if topics[key].strip()), role)


# ---------------------------------------------------------------------------------------------------
# Local files


def _local_path(spec: str) -> Path | None:
    """The file ``spec`` names, or None when it names (or tries to name) a registered source."""
    if not isinstance(spec, str) or not spec.strip():
        raise PrunekitError(
            f"A data source must be a non-empty string; got {spec!r}. "
            f"Use one of {', '.join(DATA_SOURCES.names())} or a path to a .txt or .jsonl file."
        )
    if spec.startswith(FILE_PREFIX):
        return Path(spec[len(FILE_PREFIX) :])
    if spec in DATA_SOURCES or spec.startswith("hf:"):
        return None
    # A path separator or an extension marks a path; registered names have neither.
    if "/" in spec or "\\" in spec or Path(spec).suffix or Path(spec).exists():
        return Path(spec)
    return None


def _check_file(path: Path, spec: str) -> None:
    """Raise unless ``path`` is an existing file with a supported extension."""
    if path.suffix not in FILE_SUFFIXES:
        raise PrunekitError(
            f"Data file '{path}' (from '{spec}') has unsupported extension '{path.suffix or '(none)'}'. "
            f"Use {_FILE_FORMATS.format(field='text')}."
        )
    if not path.is_file():
        raise PrunekitError(
            f"Data file '{path}' (from '{spec}') not found (relative paths start at '{Path.cwd()}'). "
            "Fix the path in params.yaml, or use the embedded default 'python-docs'."
        )


def _read_file(path: Path, text_field: str) -> list[str]:
    """All non-empty documents of a .txt or .jsonl file, in file order."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PrunekitError(f"Data file '{path}' is not valid UTF-8 ({exc}). Re-save it as UTF-8 text.") from exc
    if path.suffix == ".jsonl":
        return _parse_jsonl(text, path, text_field)
    return _parse_txt(text)


def _parse_txt(text: str) -> list[str]:
    """Documents separated by one or more blank lines, stripped; empty ones dropped."""
    text = text.replace("\r\n", "\n")
    return [doc.strip() for doc in _BLANK_LINES.split(text) if doc.strip()]


def _parse_jsonl(text: str, path: Path, field: str) -> list[str]:
    """``field`` of each JSON object line; blank lines skipped, empty texts dropped."""
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PrunekitError(
                f"{where}: invalid JSON ({exc.msg}). Expected one JSON object per line with a "
                f'\'{field}\' field, e.g. {{"{field}": "some text"}}.'
            ) from exc
        if not isinstance(obj, dict) or field not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise PrunekitError(
                f"{where}: no '{field}' field (got {keys}). Each line must be a JSON object with "
                f"the text in '{field}'; set the data text field to the key your file uses."
            )
        value = obj[field]
        if not isinstance(value, str):
            raise PrunekitError(f"{where}: field '{field}' must be a string; got {type(value).__name__}.")
        if value.strip():
            docs.append(value)
    return docs


# ---------------------------------------------------------------------------------------------------
# Hugging Face Hub datasets

C4_DATA_FILES = {
    "validation": "en/c4-validation.00000-of-00008.json.gz",
    "train": "en/c4-train.00000-of-01024.json.gz",
}
"""The first shard of each C4 split, as in SparseGPT/Wanda/LLM-Pruner."""


@dataclass(frozen=True)
class HubDataset:
    """Where a hub source lives: ``load_dataset(path, config, split=...)`` and its text field."""

    path: str
    config: str | None
    field: str
    eval_split: str
    train_split: str = "train"
    data_files: dict[str, str] | None = None

    def split_for(self, role: str) -> str:
        """Evaluation reads the held-out split; calibration and training read the train split."""
        return self.eval_split if role == "evaluation" else self.train_split


WIKITEXT2 = HubDataset("wikitext", "wikitext-2-raw-v1", "text", eval_split="test")
PTB = HubDataset("ptb_text_only", "penn_treebank", "sentence", eval_split="validation")
C4 = HubDataset("allenai/c4", None, "text", eval_split="validation", data_files=C4_DATA_FILES)
# Alpaca has only a train split; its rows are rendered (see render_alpaca) and split by hash.
ALPACA_CLEANED = HubDataset("yahma/alpaca-cleaned", None, "output", eval_split="train")
HUB_DATASETS = {"hf:wikitext2": WIKITEXT2, "hf:ptb": PTB, "hf:c4": C4, "hf:alpaca-cleaned": ALPACA_CLEANED}


def _hub_loader(dataset: HubDataset, spec: str) -> Loader:
    """A loader for a hub dataset with a held-out split (wikitext2, ptb, c4)."""

    def load(role: str, text_field: str) -> list[str]:
        rows = _load_hub(dataset, dataset.split_for(role), spec, role)
        texts = _column(rows, dataset.field, spec)
        if role == "evaluation":
            # As-is, empty rows included: the evaluator joins them with "\n\n" (LLM-Pruner protocol).
            return texts
        return [text for text in texts if text.strip()]

    return load


_source("hf:wikitext2", "WikiText-2 raw (hub): eval = test split, calib/train = train split")(
    _hub_loader(WIKITEXT2, "hf:wikitext2")
)
_source("hf:ptb", "Penn Treebank text (hub): eval = validation split, calib/train = train split")(
    _hub_loader(PTB, "hf:ptb")
)
_source("hf:c4", "C4 en, first shard (hub): eval = validation split, calib/train = train split")(
    _hub_loader(C4, "hf:c4")
)


@_source(
    "hf:alpaca-cleaned",
    "Alpaca-cleaned instructions (hub), rendered with the Alpaca prompt; split 80/10/10 by hash",
)
def _alpaca_cleaned(role: str, text_field: str) -> list[str]:
    """Every row rendered as an Alpaca prompt plus its output, then split like a local file."""
    rows = _load_hub(ALPACA_CLEANED, "train", "hf:alpaca-cleaned", role)
    rendered = [render_alpaca(row, "hf:alpaca-cleaned") for row in rows]
    return _pick_role(_indexed([text for text in rendered if text.strip()]), role)


def render_alpaca(row: dict[str, Any], spec: str = "alpaca") -> str:
    """The standard Alpaca prompt for ``row`` followed by its output.

    The input section appears only when the row's input is non-empty, as in Stanford Alpaca.
    """
    for key in ("instruction", "output"):
        if key not in row:
            raise PrunekitError(
                f"A row of '{spec}' has no '{key}' field (got {sorted(row)}); "
                "Alpaca rows need 'instruction', 'input' (may be empty) and 'output'."
            )
    user_input = row.get("input") or ""
    if user_input.strip():
        prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=row["instruction"], input=user_input)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"])
    return prompt + row["output"]


HUB_PROBE_TIMEOUT_S = 10.0


def _offline() -> bool:
    """Whether the user asked for cached hub files only (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))  # fmt: skip


def needs_network(spec: str) -> bool:
    """Whether the source ``spec`` is downloaded from the Hub (the others are read from this machine)."""
    return spec in HUB_DATASETS


def check_hub_reachable(spec: str, role: str) -> None:
    """For a hub data source: one request to the Hub (seconds), so that an unreachable Hub is refused at once
    instead of after ``datasets``' retries; nothing for local sources or in offline mode (the cache serves)."""
    dataset = HUB_DATASETS.get(spec)
    if dataset is None or _offline():
        return
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    try:
        huggingface_hub.HfApi().dataset_info(dataset.path, timeout=HUB_PROBE_TIMEOUT_S)
    except HfHubHTTPError:
        return  # the Hub answered: datasets says what is wrong with this dataset
    except Exception as exc:
        if not (is_network_error(exc) or isinstance(exc, OSError)):
            raise
        raise PrunekitError(
            f"data.{role} '{spec}': the Hugging Face Hub is unreachable ({type(exc).__name__}: {exc}). With the "
            f"dataset in the local cache, set HF_HUB_OFFLINE=1 to use it; else point data.{role} at a local file: "
            f"{_FILE_FORMATS.format(field='text')}."
        ) from None


def _load_hub(dataset: HubDataset, split: str, spec: str, role: str) -> Any:
    """``datasets.load_dataset`` for one split, turning a failed download into a PrunekitError."""
    check_hub_reachable(spec, role)
    import datasets  # lazy: importing datasets is slow and only hub specs need it
    from datasets.exceptions import DatasetsError

    kwargs: dict[str, Any] = {"split": split}
    if dataset.data_files is not None:
        # Only this split's file: datasets prepares every split listed in data_files, and the C4
        # train shard is ~300 MB that an evaluation run does not need.
        kwargs["data_files"] = {split: dataset.data_files[split]}
    args = (dataset.path,) if dataset.config is None else (dataset.path, dataset.config)
    try:
        return datasets.load_dataset(*args, **kwargs)
    except (OSError, DatasetsError) as exc:  # ConnectionError, hub HTTP errors, missing files
        raise PrunekitError(
            f"Could not load '{spec}' for {role} ({dataset.path}, split '{split}'): the Hugging Face "
            f"Hub was unreachable or refused the download ({type(exc).__name__}: {exc}). "
            f"Point data.{role} at a local file instead: {_FILE_FORMATS.format(field='text')}."
        ) from exc
    except RuntimeError as exc:
        if "Dataset scripts" not in str(exc):
            raise
        raise PrunekitError(
            f"Could not load '{spec}' ({dataset.path}): it needs a loading script, which this "
            f"version of 'datasets' no longer runs ({exc}). Point data.{role} at a local file "
            f"instead: {_FILE_FORMATS.format(field='text')}."
        ) from exc


def _column(rows: Any, field: str, spec: str) -> list[str]:
    """The ``field`` of every row, from a ``datasets.Dataset`` or any iterable of dicts."""
    names = getattr(rows, "column_names", None)
    if names is not None:
        if field not in names:
            raise PrunekitError(
                f"Hub data for '{spec}' has no '{field}' column (got {names}); the dataset's layout "
                "changed. Use a local .txt or .jsonl file instead."
            )
        return [text or "" for text in rows[field]]  # column access: far faster than per-row
    return [_field(row, field, spec) for row in rows]


def _field(row: dict[str, Any], field: str, spec: str) -> str:
    if field not in row:
        raise PrunekitError(
            f"A row of '{spec}' has no '{field}' field (got {sorted(row)}). Use a local .txt or .jsonl file instead."
        )
    return row[field] or ""


def data_name(spec: str) -> str:
    """A short name for a data spec in metric names: the registered name, or a local file's stem."""
    path = _local_path(spec)
    return path.stem if path is not None else spec.removeprefix("hf:")
