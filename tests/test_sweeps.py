"""Sweeps on the engines users run them on: DVC's experiment queue and a Prefect work pool with workers.

Both run the real pipeline (`dvc exp run`) on the tiny model, two grid points at a time on this 2-core machine
with `runtime.threads: 1` each, and find every point's metrics in `dvc exp show`.

What Prefect (3.8) does when a worker dies mid-run (tested below): the flow-run process runs in its own session,
connected to its worker by a control channel; when the worker is gone it ends itself and reports the run Crashed
("Execution was aborted by Python system exit call."), taking its `dvc exp run` with it. Nothing retries it by
itself: `prefect flow-run retry <id>` schedules it again, another worker picks it up, and DVC's run cache restores
the stages whose outputs are all cached (download, calibrate, score) from any earlier run with the same inputs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run, stop_group

WAIT_S = 900


def experiments(repo: Path, env: dict[str, str]) -> dict[str, dict]:
    """name -> {"params": params.yaml data, "metrics": {file: data}} of every experiment in `dvc exp show`."""
    found = {}
    for commit in json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout):
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                params = ((data.get("params") or {}).get("params.yaml") or {}).get("data", {})
                metrics = {f: (m or {}).get("data", {}) for f, m in (data.get("metrics") or {}).items()}
                found[rev.get("name")] = {"params": params, "metrics": metrics}
    return found


def pruned_ppl(exp: dict) -> float:
    return next(iter(exp["metrics"]["metrics/eval/pruned.json"]["ppl"].values()))


@pytest.mark.slow
def test_dvc_queue_runs_a_grid_two_at_a_time(repo: Path, prefect_env: dict[str, str]) -> None:
    env = prefect_env
    names = {"q25": "0.25", "q30": "0.3"}
    for name, target in names.items():
        run(["dvc", "exp", "run", "--queue", "-S", f"prune.target={target}", "-S", "runtime.threads=1", "-n", name],
            repo, env)  # fmt: skip
    # The workers it starts keep its output streams: send them to a file, not to a pipe this test would wait on.
    with (repo / "queue.log").open("w") as log:
        subprocess.run(["dvc", "queue", "start", "--jobs", "2"], cwd=repo, env=env, stdout=log, stderr=log, check=True)
    most_running, deadline, seen = 0, time.time() + WAIT_S, []
    try:
        while True:
            status = run(["dvc", "queue", "status"], repo, env).stdout
            seen.append(status)
            most_running = max(most_running, status.count("Running"))
            if "Queued" not in status and "Running" not in status:
                break
            assert time.time() < deadline, f"the queue did not finish:\n{status}"
            time.sleep(3)
    finally:
        run(["dvc", "queue", "stop"], repo, env, check=False)
    assert status.count("Success") == 2, status
    assert most_running == 2, "the two experiments never ran at the same time:\n" + "\n".join(seen)
    found = experiments(repo, env)
    for name, target in names.items():
        assert found[name]["params"]["prune"]["target"] == float(target)
        assert found[name]["params"]["runtime"]["threads"] == 1
        achieved = found[name]["metrics"]["metrics/prune.json"]["achieved_fraction"]
        assert achieved == pytest.approx(float(target), abs=0.02)
        assert pruned_ppl(found[name]) > 1.0


def flow_runs(env: dict[str, str], deployment: str) -> dict[str, dict]:
    """name -> {id, state} of the deployment's flow runs, from the API."""
    code = f"""
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
async def main():
    async with get_client() as c:
        d = await c.read_deployment_by_name({deployment!r})
        runs = await c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id])))
        print(json.dumps({{r.name: {{"id": str(r.id), "state": r.state.name, "message": r.state.message}}
                          for r in runs}}))
asyncio.run(main())
"""
    return json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout)  # fmt: skip


def online_workers(env: dict[str, str], pool: str) -> set[str]:
    """Names of the pool's workers whose heartbeat the API has (status ONLINE)."""
    code = f"""
import asyncio, json
from prefect.client.orchestration import get_client
async def main():
    async with get_client() as c:
        workers = await c.read_workers_for_work_pool({pool!r})
        print(json.dumps([w.name for w in workers if str(getattr(w.status, "value", w.status)) == "ONLINE"]))
asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def wait_for(predicate, what: str, timeout: float = WAIT_S):  # noqa: ANN001, ANN201
    deadline = time.time() + timeout
    while not (value := predicate()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(2)
    return value


@pytest.mark.slow
def test_prefect_work_pool_sweep_on_two_workers_survives_a_killed_worker(
    repo: Path, prefect_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**prefect_env, "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}
    prefect = [sys.executable, "-m", "prefect"]
    run([*prefect, "work-pool", "create", "sweep-pool", "--type", "process"], repo, env)
    run(["git", "add", "-A"], repo, env, check=False)
    run(["git", "commit", "-q", "-m", "sweep base", "--allow-empty"], repo, env)
    run([sys.executable, "flows/pipeline.py", "deploy", "--pool", "sweep-pool", "--name", "pool"], repo, env)
    deployment = "prunekit-pipeline/pool"
    workers: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}

    def start_worker(name: str) -> None:
        logs[name] = tmp_path / f"{name}.log"
        workers[name] = subprocess.Popen(
            [*prefect, "worker", "start", "--pool", "sweep-pool", "--name", name, "--limit", "1"],
            cwd=repo, env=env, stdout=logs[name].open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    try:
        for name in ("w0", "w1"):
            start_worker(name)

        # Both workers polling before the sweep submits: a worker still starting would leave both runs to the other.
        def both_online() -> bool:
            for name, proc in workers.items():
                assert proc.poll() is None, f"worker {name} exited:\n{logs[name].read_text()[-3000:]}"
            return online_workers(env, "sweep-pool") >= {"w0", "w1"}

        wait_for(both_online, "both workers to be online", 180)
        # The sweep: two grid points, one flow run each, both at once (one per worker).
        out = run([sys.executable, "flows/pipeline.py", "sweep", "-G", "prune.target=0.25,0.3", "-G",
                   "runtime.threads=1", "--deployment", deployment, "--prefix", "ps"], repo, env)  # fmt: skip
        runs = flow_runs(env, deployment)
        assert sorted(r["state"] for r in runs.values()) == ["Completed", "Completed"], runs
        for name in ("w0", "w1"):  # each worker ran one
            # A worker logs "submitting" before it claims a run; one that loses the claim to the other worker then
            # logs "Aborted submission" and does not run it.
            text = logs[name].read_text()
            submitted = [r for r in runs.values() if f"submitting flow run '{r['id']}'" in text
                         and f"Aborted submission of flow run '{r['id']}'" not in text]  # fmt: skip
            assert len(submitted) == 1, "\n".join(f"{n}:\n{log.read_text()[-2000:]}" for n, log in logs.items())
        found = experiments(repo, env)
        assert found["ps-0"]["params"]["prune"]["target"] == 0.25 and found["ps-1"]["params"]["prune"]["target"] == 0.3
        assert pruned_ppl(found["ps-0"]) != pruned_ppl(found["ps-1"])
        artifacts = run([*prefect, "artifact", "inspect", "prunekit-metrics"], repo, env).stdout
        assert artifacts.count("metrics/eval/pruned.json") >= 2  # both runs published their metrics
        assert "Completed" in run([*prefect, "artifact", "inspect", "prunekit-sweep"], repo, env).stdout + out.stdout

        # A worker killed mid-run (with its flow-run process), the run retried on the other worker.
        out = run([*prefect, "deployment", "run", deployment, "--param", "experiment=pk", "--param", "temp=true",
                   "--param", 'overrides={"prune.target": "0.35", "runtime.threads": "1"}', "--param", f"repo={repo}"],
                  repo, env)  # fmt: skip
        pk = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)

        def owner() -> str | None:
            for name, log in logs.items():
                text = log.read_text()
                mark = f"submitting flow run '{pk}'"
                if mark in text and "Running stage 'prune'" in text[text.index(mark) :]:
                    return name
            return None

        killed = wait_for(owner, "the run to reach the prune stage (the first one not in the run cache)")
        os.killpg(workers[killed].pid, signal.SIGKILL)
        workers[killed].wait(timeout=60)

        def current() -> dict:
            return next(r for r in flow_runs(env, deployment).values() if r["id"] == pk)

        # The flow-run process (its own session) loses its worker's control channel and reports itself Crashed.
        crashed = wait_for(lambda: current()["state"] != "Running" and current(), "the killed run to end", 120)
        assert crashed["state"] == "Crashed", crashed
        run([*prefect, "flow-run", "retry", pk], repo, env)
        wait_for(lambda: current()["state"] in ("Completed", "Failed", "Crashed"), "the retried run to finish")
        assert current()["state"] == "Completed", current()
        survivor = next(n for n in workers if n != killed)
        retried = logs[survivor].read_text().split(f"submitting flow run '{pk}'", 1)[-1]
        # Stages whose outputs are all cached come back from DVC's run cache instead of running again.
        assert re.search(r"Stage 'calibrate' is cached|Restored stage 'calibrate'|Stage 'calibrate' didn't change",
                         retried), retried[-3000:]  # fmt: skip
        found = experiments(repo, env)["pk"]
        assert found["params"]["prune"]["target"] == 0.35 and pruned_ppl(found) > 1.0
    finally:
        for proc in workers.values():
            stop_group(proc)


@pytest.mark.slow
def test_a_pushed_run_lands_in_another_clones_experiment_table(
    repo: Path, prefect_env: dict[str, str], tmp_path: Path
) -> None:
    """Several machines: a run with `--push origin` (a Git remote, the outputs in the DVC default remote) is in
    the experiment table of any other clone after `dvc exp pull`, outputs included."""
    env = prefect_env
    origin, store, other = tmp_path / "origin.git", tmp_path / "dvc-store", tmp_path / "other"
    run(["git", "init", "-q", "--bare", str(origin)], tmp_path, env)
    run(["git", "remote", "add", "origin", str(origin)], repo, env)
    run(["dvc", "remote", "add", "-d", "store", str(store)], repo, env)
    run(["git", "add", ".dvc/config"], repo, env)
    run(["git", "commit", "-q", "-m", "remotes"], repo, env)
    run(["git", "push", "-q", "origin", "HEAD:main"], repo, env)
    run([sys.executable, "flows/pipeline.py", "run", "--temp", "--push", "origin", "-n", "pushed",
         "-S", "prune.target=0.25", "-S", "runtime.threads=1"], repo, env)  # fmt: skip
    run(["git", "clone", "-q", "-b", "main", str(origin), str(other)], tmp_path, env)
    assert "pushed" not in experiments(other, env)
    run(["dvc", "exp", "pull", "origin", "pushed"], other, env)
    found = experiments(other, env)["pushed"]
    assert found["params"]["prune"]["target"] == 0.25 and pruned_ppl(found) > 1.0
    run(["dvc", "exp", "apply", "pushed"], other, env)
    run(["dvc", "checkout", "models/pruned"], other, env)
    config = json.loads((other / "models/pruned/config.json").read_text())
    assert config["model_type"]
