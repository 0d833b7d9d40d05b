"""Prefect flow: run the DVC pipeline (`dvc repro`, or `dvc exp run -S key=value ...`) and publish its metrics.

python flows/pipeline.py run                           # dvc repro
python flows/pipeline.py run -S prune.target=0.5       # dvc exp run -S prune.target=0.5
python flows/pipeline.py run --profile params-paper.yaml -n paper   # every key that differs, as -S overrides
python flows/pipeline.py serve --cron "0 3 * * *"      # a deployment the Prefect UI can schedule and trigger
python flows/pipeline.py deploy --pool prunekit        # a deployment whose runs `prefect worker start` processes pull
python flows/pipeline.py sweep -G prune.target=0.2,0.3 -G score.criterion=bip,activation   # one run per grid point
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from prunekit.errors import PrunekitError
from prunekit.evaluation.report import flatten
from prunekit.pipeline.runtime import configure_logging, quiet_bad_input

log = logging.getLogger("prunekit.flows.pipeline")
POLL_S = 2  # seconds between a sweep's checks of its runs' states


class CommandFailed(PrunekitError):
    """dvc failed; the stage that failed printed why (exit code 1, not a params problem)."""


def apply_overrides(raw: dict[str, Any], overrides: dict[str, str]) -> dict[str, Any]:
    """params.yaml contents with dotted-key overrides applied; values are parsed as YAML, like `dvc -S`."""
    out = json.loads(json.dumps(raw))
    for key, value in overrides.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise PrunekitError(f"override '{key}': '{part}' is not a section of params.yaml")
        node[leaf] = yaml.safe_load(value)
    return out


def profile_overrides(base: dict[str, Any], profile: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``-S`` overrides that turn params ``base`` into ``profile``: every leaf key whose value differs (values
    as flow-style YAML, which `dvc exp run -S` parses back)."""
    out: dict[str, str] = {}
    for key in sorted(set(base) | set(profile)):
        a, b = base.get(key), profile.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out |= profile_overrides(a, b, f"{prefix}{key}.")
        elif a != b:
            out[f"{prefix}{key}"] = (
                yaml.safe_dump(b, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
            )
    return out


def check_params(repo: Path, overrides: dict[str, str]) -> None:
    """Fail before any work if params.yaml with the overrides is invalid."""
    from prunekit.pipeline.params import parse_params, read_params_file
    from prunekit.pipeline.validation import check_choices

    raw = read_params_file(repo / "params.yaml") or {}
    check_choices(parse_params(apply_overrides(raw, overrides)))


def dvc_command(overrides: dict[str, str], experiment: str | None, temp: bool = False) -> list[str]:
    """`dvc repro`, or `dvc exp run` with the overrides; ``temp``: in a temporary workspace (``--temp``), so
    several runs share one repository at once."""
    if not overrides and not experiment and not temp:
        return ["dvc", "repro"]
    cmd = ["dvc", "exp", "run"] + (["--temp"] if temp else [])
    for key, value in overrides.items():
        cmd += ["-S", f"{key}={value}"]
    return cmd + (["-n", experiment] if experiment else [])


def experiment_rows(repo: Path, name: str) -> list[dict[str, Any]]:
    """The metrics of experiment ``name`` from `dvc exp show --json`, flattened to rows of (file, metric, value)."""
    from prunekit.evaluation.report import dvc_json

    for commit in dvc_json(repo, "exp", "show") or []:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name") == name:
                    metrics = (rev.get("data") or {}).get("metrics") or {}
                    return [
                        {"file": file, "metric": k, "value": v}
                        for file, entry in metrics.items()
                        for k, v in flatten(entry.get("data", {})).items()
                    ]
    raise PrunekitError(f"experiment '{name}' is not in `dvc exp show` of '{repo}'")


def metrics_rows(repo: Path) -> list[dict[str, Any]]:
    """`dvc metrics show --json` flattened to rows of (file, metric, value)."""
    from prunekit.evaluation.report import dvc_json

    rows: list[dict[str, Any]] = []
    for rev in (dvc_json(repo, "metrics", "show") or {}).values():
        for file, entry in (rev.get("data") or {}).items():
            flat = flatten(entry.get("data", {}))
            rows.extend({"file": file, "metric": k, "value": v} for k, v in flat.items())
    return rows


def _pipeline(
    overrides: dict[str, str] | None = None,
    experiment: str | None = None,
    repo: str = ".",
    temp: bool = False,
    push: str | None = None,
) -> list:
    """Run the pipeline in ``repo`` and publish its metrics. ``temp``: as an experiment in a temporary workspace
    (`dvc exp run --temp`: runs on one machine share the repository; ``experiment`` names it); ``push``: then
    `dvc exp push PUSH NAME` (a Git remote; the outputs go to the DVC default remote), so runs on several
    machines land in one experiment table."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from prunekit.cli import REPORT, cmd_report
    from prunekit.evaluation.report import with_plot_path

    root = Path(repo).resolve()
    overrides = dict(overrides or {})
    if (temp or push) and not experiment:
        raise PrunekitError("a run in a temporary workspace or pushed to a remote needs an experiment name (-n)")
    check_params(root, overrides)
    cmd = dvc_command(overrides, experiment, temp)
    log.info("running %s in %s", " ".join(cmd), root)
    result = subprocess.run(cmd, cwd=root)
    if result.returncode:
        raise CommandFailed(f"{' '.join(cmd)} failed with exit code {result.returncode} (its output says why)")
    if push:
        push_cmd = ["dvc", "exp", "push", push, str(experiment)]
        if subprocess.run(push_cmd, cwd=root).returncode:
            raise CommandFailed(f"{' '.join(push_cmd)} failed (its output says why)")
    rows = experiment_rows(root, str(experiment)) if temp else metrics_rows(root)
    create_table_artifact(
        key="prunekit-metrics",
        table=rows,
        description=f"Metrics after `{' '.join(cmd)}`",
    )
    # The comparison of every experiment so far (reports/experiments.md + .png), also as a Prefect artifact (which
    # cannot show the PNG beside the file: it names its path instead).
    report = cmd_report(None, repo=str(root))
    png = (root / REPORT).with_suffix(".png")
    create_markdown_artifact(
        key="prunekit-report", markdown=with_plot_path(report, png), description="prunekit experiments"
    )
    return rows


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values (keys in the order given), as -S overrides."""
    import itertools

    if not grid or any(not values for values in grid.values()):
        raise PrunekitError("a sweep needs at least one key with at least one value (-G key=v1,v2)")
    return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]


def _sweep(
    grid: dict[str, list[str]],
    deployment: str = "prunekit-pipeline/prunekit-pool",
    repo: str = ".",
    prefix: str = "sweep",
    push: str | None = None,
) -> list[dict[str, Any]]:
    """One flow run of ``deployment`` per grid point (experiment ``<prefix>-<i>``, in a temporary workspace),
    picked up by the work pool's workers; waits for all and publishes their states (`prunekit-sweep`)."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    root = Path(repo).resolve()
    points = grid_points({k: [str(v) for v in values] for k, values in grid.items()})
    for point in points:
        check_params(root, point)  # every point valid before the first run is submitted
    submitted = []
    for i, point in enumerate(points):
        name = f"{prefix}-{i}"
        run = run_deployment(
            deployment,
            parameters={"overrides": point, "experiment": name, "repo": str(root), "temp": True, "push": push},
            flow_run_name=f"{name}: " + " ".join(f"{k}={v}" for k, v in point.items()),
            timeout=0,  # submit only; the workers run them
        )
        submitted.append((name, point, run.id))
    table = []
    with get_client(sync_client=True) as client:
        for name, point, run_id in submitted:
            while not (state := client.read_flow_run(run_id).state).is_final():
                time.sleep(POLL_S)
            log.info("%s: %s", name, state.name)
            table.append({"experiment": name, **point, "flow_run": str(run_id), "state": state.name})
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in table]
    create_markdown_artifact(key="prunekit-sweep", markdown="\n".join(lines), description="prunekit sweep")
    failed = [row["experiment"] for row in table if row["state"] != "Completed"]
    if failed:
        raise CommandFailed(f"sweep runs did not complete: {', '.join(failed)} (their flow runs' logs say why)")
    return table


def make_flow() -> Any:
    from prefect import flow

    return flow(name="prunekit-pipeline", log_prints=False)(_pipeline)


def make_sweep_flow() -> Any:
    from prefect import flow

    return flow(name="prunekit-sweep", log_prints=False)(_sweep)


def __getattr__(name: str) -> Any:
    """``pipeline`` and ``sweep``: the flows, for deployment entrypoints (``flows/pipeline.py:pipeline``); built on
    first use so the command line checks its input before importing Prefect."""
    if name == "pipeline":
        return make_flow()
    if name == "sweep":
        return make_sweep_flow()
    raise AttributeError(name)


def parse_set(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PrunekitError(f"-S expects key=value, got '{item}'")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline once")
    run.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="param override")
    run.add_argument("-n", "--name", default=None, help="experiment name (implies dvc exp run)")
    run.add_argument("--profile", help="a params file (e.g. params-paper.yaml): run with every key that differs")
    run.add_argument("--temp", action="store_true", help="dvc exp run --temp (needs -n): runs share the repository")
    run.add_argument("--push", metavar="REMOTE", help="then dvc exp push REMOTE NAME (needs -n)")
    serve = sub.add_parser("serve", help="serve the flow as a deployment with a cron schedule")
    serve.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: daily at 03:00)")
    serve.add_argument("--name", default="prunekit-scheduled", help="deployment name")
    deploy = sub.add_parser("deploy", help="a deployment of the flow on a work pool (`prefect worker start` runs it)")
    deploy.add_argument("--pool", required=True, help="work pool (prefect work-pool create NAME --type process)")
    deploy.add_argument("--name", default="prunekit-pool", help="deployment name")
    deploy.add_argument("--limit", type=int, default=None, help="flow runs of this deployment at once (all workers)")
    sweep = sub.add_parser("sweep", help="one run of a work-pool deployment per grid point; waits for all")
    sweep.add_argument("-G", "--grid", action="append", default=[], metavar="KEY=V1,V2", help="a grid axis")
    sweep.add_argument("--deployment", default="prunekit-pipeline/prunekit-pool", help="FLOW/DEPLOYMENT to run")
    sweep.add_argument("--prefix", default="sweep", help="experiments are named PREFIX-0, PREFIX-1, ...")
    sweep.add_argument("--push", metavar="REMOTE", help="each run pushes its experiment to this Git remote")
    args = parser.parse_args(argv)
    quiet_bad_input()
    try:
        if args.command == "sweep":
            grid = {k: v.split(",") for k, v in parse_set(args.grid).items()}
            for point in grid_points(grid):
                check_params(Path.cwd(), point)
            make_sweep_flow()(grid=grid, deployment=args.deployment, repo=str(Path.cwd()), prefix=args.prefix,
                              push=args.push)  # fmt: skip
            return 0
        pipeline = make_flow()
        if args.command == "deploy":
            source = pipeline.from_source(source=str(Path.cwd()), entrypoint="flows/pipeline.py:pipeline")
            deployment_id = source.deploy(
                name=args.name,
                work_pool_name=args.pool,
                parameters={"repo": str(Path.cwd())},
                concurrency_limit=args.limit,
                print_next_steps=False,
            )
            print(f"deployment prunekit-pipeline/{args.name} ({deployment_id}) on work pool '{args.pool}'")
            return 0
        if args.command == "run":
            overrides = parse_set(args.set)
            if args.profile:
                from prunekit.pipeline.params import read_params_file

                base = read_params_file(Path.cwd() / "params.yaml") or {}
                overrides = profile_overrides(base, read_params_file(args.profile) or {}) | overrides
            check_params(Path.cwd(), overrides)  # before any work, and before Prefect starts
            pipeline(overrides=overrides, experiment=args.name, repo=str(Path.cwd()), temp=args.temp, push=args.push)
        else:
            pipeline.serve(name=args.name, cron=args.cron, parameters={"repo": str(Path.cwd())})
    except PrunekitError as e:
        log.error("%s", e)
        return 1 if isinstance(e, CommandFailed) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
