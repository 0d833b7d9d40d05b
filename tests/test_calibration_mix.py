"""Calibration from several texts (``data.calibration`` a list): the windows split evenly over the sources, every
source is checked like one, and a single source gives what it always gave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import downloaded_base, tiny_params
from test_criteria_activation import load_stage
from transformers import AutoTokenizer

from prunekit.data.sources import load_documents
from prunekit.data.tokens import mixed_windows, random_windows, token_stream
from prunekit.errors import ParamsError
from prunekit.pipeline.inputs import read_document_groups
from prunekit.pipeline.params import parse_params
from prunekit.pipeline.preflight import input_problems
from prunekit.pipeline.validation import check_choices


def rows(windows: torch.Tensor) -> list[tuple[int, ...]]:
    return sorted(tuple(w.tolist()) for w in windows)


def test_windows_split_evenly_over_the_sources_in_a_seeded_order() -> None:
    a, b = torch.arange(0, 1000), torch.arange(10_000, 10_500)
    mixed = mixed_windows([a, b], 9, 8, seed=3)
    assert mixed.shape == (9, 8)
    assert bool((mixed[:, 1:] - mixed[:, :-1] == 1).all())  # each window is a run of one stream
    from_b = (mixed[:, 0] >= 10_000).tolist()
    assert sum(from_b) == 4  # 9 over 2 sources: 5 and 4, the first source takes the remainder
    # Each source's windows are random_windows' of that source, with the seed moved by its index ...
    assert rows(mixed[[not x for x in from_b]]) == rows(random_windows(a, 5, 8, seed=3))
    assert rows(mixed[from_b]) == rows(random_windows(b, 4, 8, seed=4))
    # ... in a seeded order that mixes them (not one source's block after the other's) ...
    assert from_b != sorted(from_b)
    # ... the same for the same seed.
    assert torch.equal(mixed, mixed_windows([a, b], 9, 8, seed=3))
    # One source: random_windows itself, so a single-text calibration keeps its windows.
    assert torch.equal(mixed_windows([a], 9, 8, seed=3), random_windows(a, 9, 8, seed=3))


def write_text(path: Path, word: str, n: int) -> Path:
    path.write_text("\n\n".join(f"{word} {i} " * 6 for i in range(n)))
    return path


def test_the_stages_calibrate_on_each_source_evenly(tiny_model_dir: Path, tmp_path: Path) -> None:
    """download_data keeps each source's documents apart, and calibrate draws its windows with mixed_windows
    from them; with one source the text file holds no source index (the files of earlier runs stay as they were)."""
    a, b = write_text(tmp_path / "a.txt", "alpha", 200), write_text(tmp_path / "b.txt", "omega", 200)
    raw = tiny_params(tiny_model_dir)
    raw["data"]["calibration"] = [str(a), str(b)]
    raw["calibrate"].update(samples=6, seq_len=8)
    params = parse_params(raw)
    text, calib = tmp_path / "text", tmp_path / "calib.safetensors"
    load_stage("download_data").download_data(params, text)
    groups = read_document_groups(text, "calibration")
    assert groups == [load_documents(str(a), "calibration"), load_documents(str(b), "calibration")]
    load_stage("calibrate").calibrate(params, tiny_model_dir, text, calib)
    from safetensors.torch import load_file

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    streams = [token_stream(tokenizer, g) for g in groups]
    assert torch.equal(load_file(str(calib))["input_ids"], mixed_windows(streams, 6, 8, params.seed))

    one = parse_params({**raw, "data": {**raw["data"], "calibration": str(a)}})
    load_stage("download_data").download_data(one, tmp_path / "one")
    lines = (tmp_path / "one" / "calibration.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"text": d} for d in load_documents(str(a), "calibration")]


def test_every_source_is_checked(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A misspelled source in the list, an empty list, and a source too short for the windows: one line each,
    naming the key and the source."""
    raw = tiny_params(tiny_model_dir)
    raw["data"]["calibration"] = ["python-docs", "python-dcos"]
    with pytest.raises(ParamsError, match=r"key 'data.calibration'.*python-dcos.*python-docs"):
        check_choices(parse_params(raw))
    raw["data"]["calibration"] = []
    with pytest.raises(ParamsError, match=r"key 'data.calibration'") as e:
        parse_params(raw)
    assert len(str(e.value).splitlines()) == 1
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(str(i) for i in range(100)))  # about ten short documents for calibration
    raw["data"]["calibration"] = ["python-docs", str(short)]
    raw["calibrate"]["seq_len"] = 64
    base = downloaded_base(tiny_model_dir, tmp_path / "base")
    found = [line for line in input_problems(parse_params(raw), base, None) if "calibrate.seq_len" in line]
    assert len(found) == 1 and f"data.calibration '{short}'" in found[0]
