"""Tests for prunekit.data.sources: role splits, local files, hub specs (network faked) and validation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import datasets
import pytest

from prunekit.data import sources as data
from prunekit.data.sources import (
    CALIBRATION_FRACTION,
    DATA_SOURCES,
    EVALUATION_FRACTION,
    ROLES,
    TRAINING_FRACTION,
    describe_sources,
    load_documents,
    validate_spec,
)
from prunekit.errors import PrunekitError

FRACTIONS = {
    "evaluation": EVALUATION_FRACTION,
    "calibration": CALIBRATION_FRACTION,
    "training": TRAINING_FRACTION,
}


def all_roles(spec: str, **kwargs: Any) -> dict[str, list[str]]:
    return {role: load_documents(spec, role, **kwargs) for role in ROLES}


def assert_partition(split: dict[str, list[str]], pool: list[str]) -> None:
    """Every document of ``pool`` is in exactly one role, and nothing else is."""
    together = Counter(doc for docs in split.values() for doc in docs)
    assert together == Counter(pool)
    for a in ROLES:
        for b in ROLES:
            if a < b:
                assert not set(split[a]) & set(split[b]), f"{a} and {b} share documents"


# --- python-docs --------------------------------------------------------------------------------


def test_fractions_sum_to_one() -> None:
    assert sum(FRACTIONS.values()) == pytest.approx(1.0)


def test_python_docs_roles_partition_the_non_empty_topics() -> None:
    split = all_roles("python-docs")
    pool = [topics[key] for key in sorted(topics) if topics[key].strip()]
    assert_partition(split, pool)
    # Sorted key order is kept within a role.
    for docs in split.values():
        assert [doc for doc in pool if doc in set(docs)] == docs


def test_python_docs_split_is_identical_across_calls() -> None:
    assert all_roles("python-docs") == all_roles("python-docs")


def test_python_docs_shares_are_near_their_fractions() -> None:
    split = all_roles("python-docs")
    total = sum(len(docs) for docs in split.values())
    for role, docs in split.items():
        # ~80 topics: a hash split's share has a binomial spread of ~3-4.5 points, so 6 points is
        # "near"; the split is deterministic, so this cannot flake.
        assert abs(len(docs) / total - FRACTIONS[role]) < 0.06, (role, len(docs), total)


def test_role_of_uses_a_stable_hash_not_python_hash() -> None:
    # Fixed expectations: Python's hash() is salted per process and would change these.
    assert data.role_of("specialnames") == "calibration"
    assert data.role_of("compound") == "training"
    shares = Counter(data.role_of(f"doc-{i}") for i in range(20000))
    for role, fraction in FRACTIONS.items():
        assert abs(shares[role] / 20000 - fraction) < 0.01


def test_unknown_role_is_an_error() -> None:
    with pytest.raises(PrunekitError, match="Unknown data role 'train'.*Did you mean 'training'"):
        load_documents("python-docs", "train")


# --- local files --------------------------------------------------------------------------------


def make_docs(n: int) -> list[str]:
    return [f"Document number {i}.\nIt has a second line about topic {i % 7}." for i in range(n)]


def test_repeated_documents_stay_in_one_role(tmp_path: Path) -> None:
    # pydoc's 'if' and 'else' topics are the same text; a file may repeat a paragraph too. Keyed by
    # index alone, 60 copies would scatter over all three roles.
    assert topics["if"] == topics["else"]
    path = tmp_path / "repeats.txt"
    path.write_text("\n\n".join(["boilerplate"] * 60 + make_docs(60)))
    split = all_roles(str(path))
    holders = [role for role, docs in split.items() if "boilerplate" in docs]
    assert len(holders) == 1 and split[holders[0]].count("boilerplate") == 60


def test_txt_file_splits_on_blank_lines_and_partitions(tmp_path: Path) -> None:
    docs = make_docs(200)
    path = tmp_path / "corpus.txt"
    # Vary the separators: one blank line, several, and whitespace-only lines all separate documents.
    seps = ["\n\n", "\n\n\n\n", "\n   \n", "\r\n\r\n"]
    path.write_text("".join(doc + seps[i % len(seps)] for i, doc in enumerate(docs)), newline="")
    split = all_roles(str(path))
    assert_partition(split, docs)
    for role, got in split.items():
        assert abs(len(got) / 200 - FRACTIONS[role]) < 0.08
    assert all_roles(f"file:{path}") == split


def test_jsonl_file_partitions_and_uses_text_field(tmp_path: Path) -> None:
    docs = make_docs(150)
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"body": doc, "id": i}) for i, doc in enumerate(docs)]
    path.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is not a document
    split = all_roles(str(path), text_field="body")
    assert_partition(split, docs)
    assert all_roles(str(path), text_field="body") == split


def test_jsonl_bad_json_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(PrunekitError) as err:
        load_documents(str(path), "training")
    msg = str(err.value)
    assert str(path) in msg and "line 2" in msg and "invalid JSON" in msg and "'text'" in msg


def test_jsonl_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "nofield.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"content": "c"}\n')
    with pytest.raises(PrunekitError) as err:
        load_documents(str(path), "evaluation")
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and "no 'text' field" in msg and "content" in msg


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.txt"
    with pytest.raises(PrunekitError, match="absent.txt.*not found"):
        load_documents(str(path), "training")


def test_empty_file_gives_empty_role_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("\n\n  \n")
    with pytest.raises(PrunekitError, match=r"'.*empty.txt' gave no documents for role 'evaluation'"):
        load_documents(str(path), "evaluation")


# --- hub specs (load_dataset faked) ------------------------------------------------------------


@pytest.fixture(autouse=True)
def answering_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub answers prunekit's probe (check_hub_reachable); datasets.load_dataset is faked where a test needs it."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, repo_id, **kwargs: {"id": repo_id})


class FakeHub:
    """Stands in for datasets.load_dataset: records each call and serves small in-memory splits."""

    def __init__(self, tables: dict[tuple[str, str | None, str], list[dict[str, Any]]]) -> None:
        self.tables = tables
        self.calls: list[dict[str, Any]] = []

    def __call__(self, path: str, name: str | None = None, *, split: str, **kwargs: Any) -> Any:
        self.calls.append({"path": path, "name": name, "split": split, **kwargs})
        return datasets.Dataset.from_list(self.tables[(path, name, split)])


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub(
        {
            ("wikitext", "wikitext-2-raw-v1", "test"): [{"text": t} for t in ["", " = A = \n", "x y\n"]],
            ("wikitext", "wikitext-2-raw-v1", "train"): [{"text": t} for t in ["", " tr 1\n", "  ", "tr 2"]],
            ("ptb_text_only", "penn_treebank", "validation"): [
                {"sentence": "val one"},
                {"sentence": "val two"},
            ],
            ("ptb_text_only", "penn_treebank", "train"): [{"sentence": "train one"}],
            ("allenai/c4", None, "validation"): [{"text": "c4 val", "url": "u"}],
            ("allenai/c4", None, "train"): [{"text": "c4 train", "url": "u"}, {"text": ""}],
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", fake)
    return fake


def test_wikitext2_eval_is_raw_test_rows_and_train_drops_empty(hub: FakeHub) -> None:
    assert load_documents("hf:wikitext2", "evaluation") == ["", " = A = \n", "x y\n"]
    assert load_documents("hf:wikitext2", "training") == [" tr 1\n", "tr 2"]
    assert load_documents("hf:wikitext2", "calibration") == [" tr 1\n", "tr 2"]
    assert [(c["path"], c["name"], c["split"]) for c in hub.calls] == [
        ("wikitext", "wikitext-2-raw-v1", "test"),
        ("wikitext", "wikitext-2-raw-v1", "train"),
        ("wikitext", "wikitext-2-raw-v1", "train"),
    ]


def test_ptb_eval_reads_validation_sentences(hub: FakeHub) -> None:
    assert load_documents("hf:ptb", "evaluation") == ["val one", "val two"]
    assert load_documents("hf:ptb", "calibration") == ["train one"]
    assert [(c["path"], c["name"], c["split"]) for c in hub.calls] == [
        ("ptb_text_only", "penn_treebank", "validation"),
        ("ptb_text_only", "penn_treebank", "train"),
    ]


def test_c4_reads_first_shard_of_the_right_split(hub: FakeHub) -> None:
    assert load_documents("hf:c4", "evaluation") == ["c4 val"]
    assert load_documents("hf:c4", "training") == ["c4 train"]
    assert hub.calls == [
        {
            "path": "allenai/c4",
            "name": None,
            "split": "validation",
            "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
        },
        {
            "path": "allenai/c4",
            "name": None,
            "split": "train",
            "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"},
        },
    ]


ALPACA_ROWS = [
    {"instruction": f"Do task {i}.", "input": f"context {i}" if i % 2 else "", "output": f"Done {i}."}
    for i in range(120)
]


def test_alpaca_rendering() -> None:
    with_input = data.render_alpaca({"instruction": "Add.", "input": "2 and 3", "output": "5"})
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n5"
    )
    no_input = data.render_alpaca({"instruction": "Say hi.", "input": "  ", "output": "Hi"})
    assert no_input == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nSay hi.\n\n### Response:\nHi"
    )
    assert "### Input:" not in no_input


def test_alpaca_rows_are_rendered_and_split_by_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHub({("yahma/alpaca-cleaned", None, "train"): ALPACA_ROWS})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    split = all_roles("hf:alpaca-cleaned")
    assert_partition(split, [data.render_alpaca(row) for row in ALPACA_ROWS])
    assert {c["split"] for c in fake.calls} == {"train"}
    assert {c["path"] for c in fake.calls} == {"yahma/alpaca-cleaned"}
    assert all(doc.startswith("Below is an instruction") for doc in split["training"])


def test_unreachable_hub_becomes_prunekit_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PrunekitError) as err:
        load_documents("hf:wikitext2", "evaluation")
    msg = str(err.value)
    assert "Hugging Face Hub was unreachable" in msg
    assert "data.evaluation" in msg and ".jsonl" in msg and ".txt" in msg
    assert isinstance(err.value.__cause__, ConnectionError)


def test_other_hub_bugs_are_not_disguised(monkeypatch: pytest.MonkeyPatch) -> None:
    def buggy(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("unexpected keyword")

    monkeypatch.setattr(datasets, "load_dataset", buggy)
    with pytest.raises(TypeError):
        load_documents("hf:c4", "training")


def test_hub_empty_role_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHub({("ptb_text_only", "penn_treebank", "train"): [{"sentence": " "}]})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    with pytest.raises(PrunekitError, match="'hf:ptb' gave no documents for role 'training'"):
        load_documents("hf:ptb", "training")


# --- validate_spec / describe_sources ----------------------------------------------------------


def test_validate_spec_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(PrunekitError, match="Unknown data source 'python-doc'. Did you mean 'python-docs'"):
        validate_spec("python-doc")
    with pytest.raises(PrunekitError, match="Did you mean 'hf:wikitext2'"):
        validate_spec("hf:wikitext")


def test_validate_spec_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(PrunekitError, match="nothere.jsonl.*not found"):
        validate_spec(str(tmp_path / "nothere.jsonl"))
    with pytest.raises(PrunekitError, match="unsupported extension '.csv'"):
        validate_spec("data/table.csv")


def test_validate_spec_accepts_valid_specs_without_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("validate_spec must not download")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    path = tmp_path / "ok.txt"
    path.write_text("some text\n")
    for spec in [*DATA_SOURCES.names(), str(path), f"file:{path}"]:
        assert validate_spec(spec) is None


def test_describe_sources_lists_every_registered_source() -> None:
    rows = describe_sources()
    names = [name for name, _ in rows]
    assert set(DATA_SOURCES.names()) <= set(names)
    assert {"python-docs", "hf:wikitext2", "hf:ptb", "hf:c4", "hf:alpaca-cleaned"} <= set(names)
    assert all(desc and "\n" not in desc for _, desc in rows)


def test_an_unreachable_hub_is_refused_before_datasets_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """One request to the Hub first: when it cannot be reached, datasets is not called (it retries for tens of
    seconds); in offline mode (HF_HUB_OFFLINE=1) datasets serves its cache without the request."""
    import huggingface_hub

    class TransportError(Exception):  # httpx's, recognised by name (the Hub client's HTTP library may vary)
        pass

    class ConnectError(TransportError):
        pass

    def unreachable(self: Any, repo_id: str, **kwargs: Any) -> Any:
        raise ConnectError("[Errno -2] Name or service not known")

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("datasets.load_dataset must not run")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    monkeypatch.setattr(datasets, "load_dataset", never)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(
        PrunekitError, match=r"data.training 'hf:c4': the Hugging Face Hub is unreachable \(ConnectError"
    ):
        load_documents("hf:c4", "training")
    fake = FakeHub({("allenai/c4", None, "train"): [{"text": "cached"}]})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_documents("hf:c4", "training") == ["cached"]
