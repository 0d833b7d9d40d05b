"""The code the pipeline runs is what DVC tracks, and the library is layered: no import circles, light imports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prunekit.pipeline.code_deps import covers, dependency_paths, import_cycles, stage_modules

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def dvc_stages() -> dict[str, dict]:
    """Every stage of dvc.yaml with its script and deps (a foreach stage: its ``do`` template)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        script = re.search(r"python (stages/\w+\.py)", body["cmd"]).group(1)
        out[name] = {"script": script, "deps": [d if isinstance(d, str) else next(iter(d)) for d in body["deps"]]}
    return out


@pytest.mark.parametrize("stage", sorted(dvc_stages()))
def test_each_stage_depends_on_exactly_the_code_it_runs(stage: str) -> None:
    """Every prunekit module the stage's script imports, transitively, is covered by its deps, and no other
    prunekit path is listed (so a change to code a stage does not run does not rerun it)."""
    info = dvc_stages()[stage]
    used = stage_modules(ROOT / info["script"], SRC)
    assert info["script"] in info["deps"]
    assert covers(info["deps"], used, SRC, ROOT) == []
    listed = [d for d in info["deps"] if d.startswith("src/")]
    assert listed == dependency_paths(used, SRC, ROOT), "rerun: python scripts/stage_deps.py --write"


def test_the_coverage_check_fails_on_a_missing_dependency() -> None:
    """The check above is not vacuous: without the criteria package, the score stage's deps miss bip.py."""
    info = dvc_stages()["score"]
    used = stage_modules(ROOT / info["script"], SRC)
    missing = covers([d for d in info["deps"] if d != "src/prunekit/pruning/criteria"], used, SRC, ROOT)
    assert "src/prunekit/pruning/criteria/bip.py" in missing


def test_a_code_change_reruns_only_what_runs_it() -> None:
    """Which stages list a module: bip.py the score stage and the prune stage after it (k-shot rescoring), the
    perplexity code only the evaluations, the model download code only the model's download, the text sources the
    text's download and the evaluations (they read the Hub's perplexity sets with them); the params checks
    (``validate``) read the registries, sources and shapes, so every one of these but the perplexity code."""

    def listing(path: str) -> set[str]:
        return {name for name, info in dvc_stages().items() if any((ROOT / path).is_relative_to(ROOT / d)
                                                                    for d in info["deps"])}  # fmt: skip

    assert listing("src/prunekit/pruning/criteria/bip.py") == {"validate", "score", "prune"}
    assert listing("src/prunekit/evaluation/perplexity.py") == {"evaluate", "evaluate_quantized"}
    assert listing("src/prunekit/models/sources/pypi.py") == {"validate", "download_model"}
    assert listing("src/prunekit/data/sources.py") == {"validate", "download_data", "evaluate", "evaluate_quantized"}


def test_no_import_circles() -> None:
    assert import_cycles(SRC) == []


def test_the_circle_check_finds_a_circle(tmp_path: Path) -> None:
    pkg = tmp_path / "prunekit"
    (pkg / "quant").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "quant" / "__init__.py").write_text("from prunekit.quant import backend\n")
    (pkg / "quant" / "backend.py").write_text("def f():\n    from prunekit.export import gguf\n")
    (pkg / "export").mkdir()
    (pkg / "export" / "__init__.py").write_text("")
    (pkg / "export" / "gguf.py").write_text("from prunekit.quant.backend import f\n")
    assert import_cycles(tmp_path) == [["prunekit.export.gguf", "prunekit.quant.backend"]]


def test_params_validation_and_the_command_line_import_no_torch() -> None:
    """Parsing params, importing their checks and the `prunekit` command's parser cost no torch or transformers."""
    code = (
        "import sys, prunekit.pipeline.params, prunekit.pipeline.validation, prunekit.cli, prunekit.pipeline.runtime\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'prefect') if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_ruff_lints_and_formats_the_whole_repository() -> None:
    """The house style (pyproject.toml's ruff settings) holds on every file: CI fails on a lint or format slip."""
    for args in (["check", "."], ["format", "--check", "."]):
        out = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]


def test_mypy_finds_no_type_errors_in_the_library(tmp_path) -> None:
    """src/prunekit type-checks (pyproject.toml's mypy settings): a call with the wrong argument types, a None not
    handled, a return of the wrong type fails CI."""
    cmd = [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]


def test_dvc_reads_the_pipeline(tmp_path: Path) -> None:
    """dvc.yaml as DVC reads it (its schema and rules: no dvc.yaml dependency, outputs of one stage each): every
    stage listed in the order of the DAG, validate first."""
    import shutil

    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-m", "dvc", "dag", "--md"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in stages:
        assert name in out.stdout, name
