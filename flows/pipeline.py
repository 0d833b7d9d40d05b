"""Prefect flow: run the DVC pipeline (`dvc repro`, or `dvc exp run -S key=value ...`) and publish its metrics.

python flows/pipeline.py run                           # dvc repro
python flows/pipeline.py run -S prune.target=0.5       # dvc exp run -S prune.target=0.5
python flows/pipeline.py run --profile params-paper.yaml -n paper   # every key that differs, as -S overrides
python flows/pipeline.py serve --cron "0 3 * * *"      # a deployment the Prefect UI can schedule and trigger
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from prunekit.errors import PrunekitError
from prunekit.evaluation.report import flatten
from prunekit.pipeline.runtime import configure_logging, quiet_bad_input

log = logging.getLogger("prunekit.flows.pipeline")


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


def dvc_command(overrides: dict[str, str], experiment: str | None) -> list[str]:
    if not overrides and not experiment:
        return ["dvc", "repro"]
    cmd = ["dvc", "exp", "run"]
    for key, value in overrides.items():
        cmd += ["-S", f"{key}={value}"]
    return cmd + (["-n", experiment] if experiment else [])


def metrics_rows(repo: Path) -> list[dict[str, Any]]:
    """`dvc metrics show --json` flattened to rows of (file, metric, value)."""
    from prunekit.evaluation.report import dvc_json

    rows: list[dict[str, Any]] = []
    for rev in (dvc_json(repo, "metrics", "show") or {}).values():
        for file, entry in (rev.get("data") or {}).items():
            flat = flatten(entry.get("data", {}))
            rows.extend({"file": file, "metric": k, "value": v} for k, v in flat.items())
    return rows


def _pipeline(overrides: dict[str, str] | None = None, experiment: str | None = None, repo: str = ".") -> list:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from prunekit.cli import cmd_report

    root = Path(repo).resolve()
    overrides = dict(overrides or {})
    check_params(root, overrides)
    cmd = dvc_command(overrides, experiment)
    log.info("running %s in %s", " ".join(cmd), root)
    result = subprocess.run(cmd, cwd=root)
    if result.returncode:
        raise CommandFailed(f"{' '.join(cmd)} failed with exit code {result.returncode} (its output says why)")
    rows = metrics_rows(root)
    create_table_artifact(
        key="prunekit-metrics",
        table=rows,
        description=f"Metrics after `{' '.join(cmd)}`",
    )
    # The comparison of every experiment so far (reports/experiments.md + .png), also as a Prefect artifact.
    report = cmd_report(None, repo=str(root))
    create_markdown_artifact(key="prunekit-report", markdown=report, description="prunekit experiments")
    return rows


def make_flow() -> Any:
    from prefect import flow

    return flow(name="prunekit-pipeline", log_prints=False)(_pipeline)


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
    serve = sub.add_parser("serve", help="serve the flow as a deployment with a cron schedule")
    serve.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: daily at 03:00)")
    serve.add_argument("--name", default="prunekit-scheduled", help="deployment name")
    args = parser.parse_args(argv)
    pipeline = make_flow()
    quiet_bad_input()
    try:
        if args.command == "run":
            overrides = parse_set(args.set)
            if args.profile:
                from prunekit.pipeline.params import read_params_file

                base = read_params_file(Path.cwd() / "params.yaml") or {}
                overrides = profile_overrides(base, read_params_file(args.profile) or {}) | overrides
            check_params(Path.cwd(), overrides)  # before any work, and before Prefect starts
            pipeline(overrides=overrides, experiment=args.name, repo=str(Path.cwd()))
        else:
            pipeline.serve(name=args.name, cron=args.cron, parameters={"repo": str(Path.cwd())})
    except PrunekitError as e:
        log.error("%s", e)
        return 1 if isinstance(e, CommandFailed) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
