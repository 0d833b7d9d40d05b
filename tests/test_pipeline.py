"""The pipeline through real `dvc repro` / `dvc exp run` and Prefect, on a tiny model (a few minutes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import copy_pipeline, run, stop_group, tiny_params

from prunekit.models.loading import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
ALL_STAGES = {
    "validate",
    "download_model",
    "download_data",
    "calibrate",
    "score",
    "prune",
    "recover",
    "evaluate@dense",
    "evaluate@pruned",
    "evaluate@recovered",
    "search",
    "quantize",
    "evaluate_quantized",
    "export",
}


def stages_run(out: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", out.stdout + out.stderr))


def set_param(repo: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def assert_export_runs_in_llama_cpp(repo: Path) -> None:
    """models/export/model.gguf: the recovered model in F16 (tiny_params), per-layer widths as llama.cpp's deci
    architecture; llama.cpp's logits are those of the recovered model with float16-rounded weights to 2e-3."""
    import torch

    import prunekit.models.families  # noqa: F401  (the pruned classes)
    from prunekit.export.llamacpp import open_gguf
    from prunekit.export.tensor_types import TensorTypes, rounded

    summary = json.loads((repo / "metrics/export.json").read_text())
    assert summary["architecture"] == "deci" and summary["bytes"] == (repo / "models/export/model.gguf").stat().st_size
    assert set(summary["tensor_types"]) == {"F16", "F32"}
    model = load_pretrained(repo / "models/recovered").eval()
    reference = rounded(model, TensorTypes(default="F16"))
    ids = [5, 17, 33, 60, 2, 99, 140, 7, 8, 9]
    llm = open_gguf(repo / "models/export/model.gguf", n_ctx=32, logits_all=True, verbose=False, n_threads=1,
                    type_k=0, type_v=0)  # fmt: skip
    try:
        llm.eval(ids)
        got = torch.tensor(llm.scores[: len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    assert (got - expected).abs().max().item() <= 2e-3


@pytest.mark.slow
def test_incremental_reruns(repo: Path, prefect_env: dict[str, str]) -> None:
    env = prefect_env
    first = run(["dvc", "repro"], repo, env)
    assert stages_run(first) == ALL_STAGES
    metrics = {k: json.loads((repo / f"metrics/eval/{k}.json").read_text()) for k in ("dense", "pruned", "recovered")}
    prune = json.loads((repo / "metrics/prune.json").read_text())
    assert abs(prune["achieved_fraction"] - 0.2) <= 0.01
    assert metrics["pruned"]["params"] == prune["params_after"] < metrics["dense"]["params"] == prune["params_before"]
    assert all(set(m["ppl"]) == {"python-docs-evaluation-16", "python-docs-evaluation-32"} for m in metrics.values())
    assert all(v > 1 for m in metrics.values() for v in m["ppl"].values())
    for m in metrics.values():
        assert set(m["zero_shot"]) == {"auto_mc", "average"} and 0 <= m["zero_shot"]["auto_mc"]["acc"] <= 1
        eff = m["efficiency"]
        assert eff["batch_2"]["decode_tokens_per_s"] > 0 and eff["batch_1"]["peak_memory_mib"] > 0
    dense_eff, pruned_eff = metrics["dense"]["efficiency"], metrics["pruned"]["efficiency"]
    assert pruned_eff["linear_macs_per_token"] < dense_eff["linear_macs_per_token"]
    assert len(json.loads((repo / "metrics/recover_loss.json").read_text())) == 2
    assert (repo / "metrics/recover_loss.png").read_bytes()[:4] == b"\x89PNG"
    search = json.loads((repo / "metrics/search.json").read_text())
    trials = json.loads((repo / "metrics/search_trials.json").read_text())
    assert len(trials) == search["trials"] >= 4 and all(t["avg_bits"] <= 5.0 for t in trials)
    assert search["best"]["loss"] == min(t["loss"] for t in trials) <= search["uniform"]["loss"]
    quantized = json.loads((repo / "metrics/eval/quantized.json").read_text())
    assert quantized["avg_bits"] == search["best"]["avg_bits"] and quantized["ppl"]["python-docs-evaluation-16"] > 1
    assert quantized["params"] == metrics["recovered"]["params"] and quantized["adapter_params"] > 0
    # fp32 embeddings dominate this tiny model, so the ratio itself is not below 1 here; check its definition.
    assert quantized["bytes_vs_dense_16bit"] == round(quantized["weight_bytes"] / (2 * metrics["dense"]["params"]), 4)
    assert quantized["weight_bytes"] < metrics["recovered"]["weight_bytes"]
    assert len(json.loads((repo / "metrics/qlora_loss.json").read_text())) == 2
    assert_export_runs_in_llama_cpp(repo)

    assert stages_run(run(["dvc", "repro"], repo, env)) == set()

    # A change to the params checks runs them again on the params they passed, and its stamp reruns nothing else.
    with (repo / "src/prunekit/pipeline/validation.py").open("a", encoding="utf-8") as f:
        f.write("\n# a changed check\n")
    assert stages_run(run(["dvc", "repro"], repo, env)) == {"validate"}

    set_param(repo, "evaluate", "max_chunks", 4)
    assert stages_run(run(["dvc", "repro"], repo, env)) == {
        "validate",  # every change to params.yaml is checked first; its unchanged stamp reruns nothing
        "evaluate@dense",
        "evaluate@pruned",
        "evaluate@recovered",
        "evaluate_quantized",
    }

    set_param(repo, "prune", "target", 0.3)
    assert stages_run(run(["dvc", "repro"], repo, env)) == {
        "validate",
        "prune",
        "recover",
        "evaluate@pruned",
        "evaluate@recovered",
        "search",
        "quantize",
        "evaluate_quantized",
        "export",
    }
    assert abs(json.loads((repo / "metrics/prune.json").read_text())["achieved_fraction"] - 0.3) <= 0.02

    shown = run(["dvc", "metrics", "show", "--json"], repo, env).stdout
    assert "metrics/eval/recovered.json" in shown and "ppl" in shown


@pytest.mark.slow
def test_flow_runs_experiment(repo: Path, prefect_env: dict[str, str]) -> None:
    env = prefect_env
    run(["dvc", "repro"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "baseline"], repo, env)
    out = run([sys.executable, "flows/pipeline.py", "run", "-S", "prune.target=0.25", "-n", "t25"], repo, env)
    assert "Completed" in out.stdout + out.stderr
    exps = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    found = {}
    for commit in exps:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                name = rev.get("name")
                data = (rev.get("data") or {}).get("params", {}).get("params.yaml", {}).get("data", {})
                found[name] = data.get("prune", {}).get("target")
    assert found.get("t25") == 0.25
    # The comparison report: a row per run (the baseline commit and t25), written and published to Prefect.
    report = (repo / "reports/experiments.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    assert "| prune.target |" in rows[0] and any(r.startswith("| t25 | 0.25 |") for r in rows)
    assert (repo / "reports/experiments.png").read_bytes()[:4] == b"\x89PNG"
    artifact = run(["prefect", "artifact", "inspect", "prunekit-report"], repo, env).stdout
    assert "t25" in artifact and "prune.target" in artifact


@pytest.mark.slow
def test_schedules_run_as_experiments(repo: Path, prefect_env: dict[str, str]) -> None:
    """`dvc exp run -S prune.schedule=...` runs the schedule inside the prune stage, with a persisted state folder."""
    env = prefect_env
    run(["dvc", "repro"], repo, env)
    # prune.target explicitly: an earlier test of this module leaves it at 0.3.
    small = ["-S", "schedule.lora.seq_len=16", "-S", "schedule.lora.batch_size=2", "-S", "prune.tolerance=0.03"]
    small += ["-S", "prune.target=0.2"]
    for schedule, extra in (
        ("kshot", ["-S", "schedule.shots=2", "-S", "schedule.steps_per_shot=1"]),
        ("iterative", ["-S", "schedule.lora.steps=6", "-S", "schedule.prune_freq=1"]),
    ):
        out = run(["dvc", "exp", "run", "-S", f"prune.schedule={schedule}", *small, *extra], repo, env)
        assert {"prune", "recover", "evaluate@recovered"} <= stages_run(out)
        prune = json.loads((repo / "metrics/prune.json").read_text())
        assert prune["schedule"] == schedule and abs(prune["achieved_fraction"] - 0.2) <= 0.03
        assert len(prune["schedule_log"]) == (2 if schedule == "kshot" else 6)
        assert (repo / "models/prune_state").is_dir()
        run(["git", "checkout", "params.yaml"], repo, env)


@pytest.mark.slow
def test_bad_params_fail_before_work(repo: Path, prefect_env: dict[str, str], tmp_path: Path) -> None:
    bad = yaml.safe_load((repo / "params.yaml").read_text())

    def download_data_with(params: dict) -> subprocess.CompletedProcess:
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        cmd = [sys.executable, str(repo / "stages/download_data.py"), "--out", str(tmp_path / "text"),
               "--params", str(tmp_path / "params.yaml")]  # fmt: skip
        return run(cmd, repo, prefect_env, check=False)

    bad["prune"]["target"] = 1.5
    bad["score"]["criterion"] = "tayler"
    out = download_data_with(bad)
    assert out.returncode == 2
    assert "params.yaml key 'prune.target': Input should be less than 1" in out.stderr
    assert not (tmp_path / "text").exists()
    bad["prune"]["target"] = 0.2
    # Registry names are checked by the validate stage, which DVC runs before every other stage.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    cmd = [sys.executable, str(repo / "stages/validate.py"), "--out", str(tmp_path / "text"),
           "--params", str(tmp_path / "params.yaml"), "--model", str(repo / "models/base"),
           "--text", str(repo / "data/text"), "--dvcfile", str(repo / "dvc.yaml")]  # fmt: skip
    out = run(cmd, repo, prefect_env, check=False)
    assert out.returncode == 2
    assert "params.yaml key 'score.criterion': Unknown criterion 'tayler'" in out.stderr
    assert "Available: " in out.stderr and "param_first" in out.stderr.split("Available: ")[1]
    assert not (tmp_path / "text").exists()
    flow = run(
        [sys.executable, "flows/pipeline.py", "run", "-S", "prune.units=[attn_head]"],
        repo,
        prefect_env,
        check=False,
    )
    assert flow.returncode == 2 and "prune.units[0]" in flow.stderr


def output_digests(repo: Path) -> dict[str, str]:
    """sha256 of every file of every output dvc.lock records (DVC-cached or not)."""
    import hashlib

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    digests = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            path = repo / out["path"]
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for f in files:
                digests[str(f.relative_to(repo))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return digests


@pytest.mark.slow
def test_a_bad_params_change_costs_no_output(repo: Path, prefect_env: dict[str, str], tmp_path: Path) -> None:
    """Every kind of bad change stops `dvc repro` in the validate stage, before DVC deletes any output: the values,
    the keys dvc.yaml tracks, and what the base model and the texts refuse (one line each, printed once)."""
    env = prefect_env
    run(["dvc", "repro"], repo, env)
    before = output_digests(repo)
    assert len(before) > 20 and "models/pruned/model.safetensors" in before
    good = (repo / "params.yaml").read_text()
    empty, fieldless, binary = tmp_path / "empty.txt", tmp_path / "fieldless.jsonl", tmp_path / "binary.txt"
    empty.write_text("\n\n")
    fieldless.write_text('{"body": "a document"}\n')
    binary.write_bytes(b"\xff\xfe\x00 not utf-8")
    unreachable = {**env, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}  # nothing listens there
    bad_changes = {  # what: (change, the key its line names, environment)
        "misspelled key": (lambda p: p["prune"].update(taget=0.3), "prune.taget"),
        "ratio out of range": (lambda p: p["prune"].update(target=1.5), "prune.target"),
        "unknown top-level key": (lambda p: p.update(pruning={"target": 0.3}), "pruning"),
        "unknown source": (lambda p: p["model"].update(source="hf:"), "model.source"),
        "unknown criterion": (lambda p: p["score"].update(criterion="tayler"), "score.criterion"),
        "unreachable target": (lambda p: p["prune"].update(target=0.99), "prune.target"),
        "no layer left": (lambda p: p["prune"].update(skip_first=3, skip_last=1),
                          "prune.skip_first' / 'prune.skip_last"),
        "calibration longer than the text": (lambda p: p["calibrate"].update(seq_len=10**6), "calibrate.seq_len"),
        "training block longer than the text": (lambda p: p["recover"]["lora"].update(seq_len=10**7),
                                                "recover.lora.seq_len"),
        "a scheme the widths cannot hold": (lambda p: p["search"].update(choices=["rtn4", "q4_k"]),
                                            "search.choices[1]"),
        "an export type the widths cannot hold": (lambda p: p["export"].update(types="q4_k"), "export.types"),
        "head dims with the export": (lambda p: p["prune"].update(units=["attn_kv_group", "attn_qk_dim"]),
                                      "prune.units"),
        "empty text file": (lambda p: p["data"].update(calibration=str(empty)), "data.calibration"),
        "field-less jsonl": (lambda p: p["data"].update(training=str(fieldless)), "data.training"),
        "non-UTF-8 text": (lambda p: p["data"].update(evaluation=str(binary)), "data.evaluation"),
        "hub model offline": (lambda p: p["model"].update(source="hf:org/model"), "model.source", unreachable),
        "hub data offline": (lambda p: p["data"].update(training="hf:wikitext2"), "data.training", unreachable),
        "no model.source": (lambda p: p["model"].pop("source"), "model.source"),
        "empty params.yaml": (lambda p: p.clear(), None),
    }  # fmt: skip
    for what, (change, key, *case_env) in bad_changes.items():
        bad = yaml.safe_load(good)
        change(bad)
        (repo / "params.yaml").write_text(yaml.safe_dump(bad, sort_keys=False) if bad else "")
        out = run(["dvc", "repro"], repo, case_env[0] if case_env else env, check=False)
        said = out.stdout + out.stderr
        assert out.returncode != 0, what
        assert stages_run(out) == {"validate"}, (what, said[-3000:])
        assert "Traceback" not in said, (what, said[-3000:])
        line = (
            (f"params.yaml key '{key}'" if "/" not in key else f"params.yaml keys '{key}'")
            if key
            else ("params.yaml holds none of the")
        )
        assert line in out.stderr, (what, out.stderr[-3000:])
        refusal = next(x for x in out.stderr.splitlines() if line in x).split(line, 1)[1]
        assert said.count(refusal) == 1, (what, said[-3000:])  # printed once
        assert output_digests(repo) == before, what
    (repo / "params.yaml").unlink()
    out = run(["dvc", "repro"], repo, env, check=False)
    assert out.returncode != 0 and output_digests(repo) == before
    (repo / "params.yaml").write_text(good + "# a comment: the file changed, its params did not\n")
    assert stages_run(run(["dvc", "repro"], repo, env)) == {"validate"}  # back to valid: nothing else reruns
    assert output_digests(repo) == before


@pytest.mark.slow
def test_refused_inputs_end_with_one_line_and_no_output(repo: Path, prefect_env: dict[str, str], tmp_path) -> None:
    """Bad input found inside a stage's flow: exit code 2, prunekit's line last, no traceback, nothing written."""
    run(["dvc", "repro"], repo, prefect_env)
    good = yaml.safe_load((repo / "params.yaml").read_text())
    broken_model = tmp_path / "broken_model"
    shutil.copytree(repo / "models/base", broken_model)
    weights = broken_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out_dir = tmp_path / "out"
    cases = [
        ("calibrate", {"calibrate": {"seq_len": 10**7}}, ["--model", "models/base", "--text", "data/text"],
         "calibration"),
        ("prune", {"prune": {"target": 0.95}},
         ["--model", "models/base", "--scores", "data/scores.safetensors", "--plan", f"{out_dir}/plan.json",
          "--metrics", f"{out_dir}/m.json", "--trials", f"{out_dir}/t.json", "--text", "data/text",
          "--calibration", "data/calibration.safetensors",
          "--state", f"{out_dir}/state"], "prune.target"),
        ("score", {}, ["--model", str(broken_model), "--calibration", "data/calibration.safetensors"], "dvc checkout"),
        ("download_data", {"data": {"calibration": str(empty)}}, [], "no documents"),
    ]  # fmt: skip
    for stage, change, args, message in cases:
        params = json.loads(json.dumps(good))
        for section, values in change.items():
            params[section].update(values)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        cmd = [sys.executable, f"stages/{stage}.py", *args, "--out", str(out_dir / "result"), "--params",
               str(tmp_path / "params.yaml")]  # fmt: skip
        out = run(cmd, repo, prefect_env, check=False)
        assert out.returncode == 2, (stage, out.stderr[-2000:])
        assert "Traceback" not in out.stderr + out.stdout, (stage, out.stderr[-3000:])
        last = out.stderr.strip().splitlines()[-1]
        assert "ERROR prunekit" in last and message in last, (stage, last)
        said = last.split("ERROR prunekit: ", 1)[1].split(" failed: ", 1)[-1]
        assert (out.stdout + out.stderr).count(said) == 1, (stage, out.stderr[-3000:])  # once, not Prefect's too
        assert not (out_dir / "result").exists() and not list(out_dir.glob(".result.tmp-*")), stage


def prefect_processes(home: Path) -> list[int]:
    """pids of live processes (not zombies) started with this PREFECT_HOME that serve the Prefect API."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        serving = b"prunekit_prefect_server" in cmdline or b"prefect.server" in cmdline or b"uvicorn" in cmdline
        if serving and f"PREFECT_HOME={home}".encode() in environ.split(b"\0") and state not in ("Z", "X"):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_a_killed_stage_leaves_no_server_and_no_temporaries(
    tmp_path_factory: pytest.TempPathFactory, block_model_dir: Path
) -> None:
    """SIGKILL a stage mid-run with no Prefect server configured: the next `dvc repro` finishes and leaves no
    temporary folder, and once idle the shared server stops: no Prefect process of this PREFECT_HOME lives on."""
    path = tmp_path_factory.mktemp("killrepo")
    home = tmp_path_factory.mktemp("prefect_home_kill")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PRUNEKIT_PREFECT_IDLE_S="3", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    copy_pipeline(path)
    params = tiny_params(block_model_dir)
    params["recover"]["lora"]["steps"] = 40  # long enough to be killed mid-training
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        run(cmd, path, env)
    clients = home / "prunekit-server" / "clients"
    repro = subprocess.Popen(["dvc", "repro"], cwd=path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)  # fmt: skip
    try:
        victim, deadline = None, time.time() + 600
        while victim is None and time.time() < deadline and repro.poll() is None:
            for reg in clients.glob("*") if clients.is_dir() else []:
                try:
                    if b"stages/recover.py" in Path(f"/proc/{reg.name}/cmdline").read_bytes():
                        victim = int(reg.name)
                except OSError:
                    continue
            time.sleep(0.2)
        assert victim is not None, "the recover stage never registered with the shared server"
        time.sleep(3)  # into training
        os.kill(victim, signal.SIGKILL)
        assert repro.wait(timeout=300) != 0
    finally:
        stop_group(repro)
    assert len(prefect_processes(home)) == 1  # the shared server, nothing the killed stage started
    again = run(["dvc", "repro"], path, env)
    assert "recover" in stages_run(again)
    left = [p for p in path.rglob(".*.tmp-*") if ".dvc" not in p.parts and ".git" not in p.parts]
    assert left == []
    deadline = time.time() + 90
    while prefect_processes(home) and time.time() < deadline:
        time.sleep(1)
    assert prefect_processes(home) == []
