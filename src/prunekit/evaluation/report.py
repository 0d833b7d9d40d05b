"""A comparison report of DVC experiments (markdown + PNG) from ``dvc exp show --json``.

One row per experiment (and per baseline commit): the params that differ between the rows, the fraction of
parameters removed (the prune metrics), and for each evaluated model (dense, pruned, recovered, quantized) its
first perplexity metric and its zero-shot average accuracy. Metrics files are recognised by what they hold, as
dvc.yaml declares them (no path is written here): a prune metrics file has ``achieved_fraction``; a model's
evaluation has ``params`` and ``ppl.*``, and the file's name is the model's. The plot shows perplexity and
accuracy against the fraction removed, one point per experiment and model. Experiments still running, queued
or failed (no metrics) are listed under the table, not dropped silently.

    prunekit report [--json exp_show.json] [--out reports/experiments.md]
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.pipeline.outputs import atomic_file


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (lists as JSON text), as `dvc metrics show` names them."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out |= flatten(v, key + ".")
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


@dataclass
class Experiment:
    """One row: its name, flattened params, and metrics per file (flattened); ``made_with``: the digest of the
    params each evaluated model of this experiment would be made with (None where its params do not validate)."""

    name: str
    params: dict[str, Any]
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    raw_params: dict[str, Any] = field(default_factory=dict)

    def produced(self, model: str) -> bool:
        """Whether the model's evaluation was made with this experiment's params: False for the metrics an
        experiment carries from a run it did not repeat (the workspace's earlier result)."""
        from prunekit.errors import ParamsError
        from prunekit.evaluation.made_with import UPSTREAM, made_with
        from prunekit.pipeline.params import parse_params

        recorded = self.eval_metrics(model).get("made_with")
        if recorded is None or model not in UPSTREAM:
            return True  # an evaluation from before the digest was recorded: nothing to compare
        try:
            params = parse_params(self.raw_params).model_dump(mode="json")
        except ParamsError:
            return True
        return made_with(params, model) == recorded

    def fraction(self) -> float | None:
        """The fraction of parameters the prune stage removed."""
        return next((m["achieved_fraction"] for m in self.metrics.values() if "achieved_fraction" in m), None)

    def evaluated(self) -> dict[str, dict[str, Any]]:
        """Model name (its metrics file's stem) -> its evaluation metrics."""
        return {
            Path(f).stem: m for f, m in self.metrics.items() if "params" in m and any(k.startswith("ppl") for k in m)
        }

    def eval_metrics(self, model: str) -> dict[str, Any]:
        return self.evaluated().get(model, {})

    def ppl(self, model: str) -> tuple[str, float] | None:
        """(metric name, value) of the model's first perplexity metric (older runs: a plain ``ppl``)."""
        m = self.eval_metrics(model)
        keys = [k for k in m if k.startswith("ppl.")] or (["ppl"] if "ppl" in m else [])
        return (keys[0].removeprefix("ppl."), float(m[keys[0]])) if keys else None

    def accuracy(self, model: str) -> float | None:
        value = self.eval_metrics(model).get("zero_shot.average.acc")
        return float(value) if value is not None else None


def _rev_entry(rev: Mapping[str, Any], name: str) -> Experiment | None:
    data = rev.get("data") or {}
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
    if params is None:
        return None
    metrics = {f: flatten(entry.get("data") or {}) for f, entry in (data.get("metrics") or {}).items()}
    return Experiment(name, flatten(params), {f: m for f, m in metrics.items() if m}, dict(params))


def parse_exp_show(entries: list[Mapping[str, Any]]) -> tuple[list[Experiment], list[str]]:
    """Rows for every baseline commit and experiment with metrics; names of those without (running, failed)."""
    if not isinstance(entries, list):
        raise PrunekitError("not `dvc exp show --json` output: expected a JSON list of commits")
    rows, skipped = [], []
    for commit in entries:
        if commit.get("rev") == "workspace":
            continue
        base = _rev_entry(commit, commit.get("name") or str(commit.get("rev", ""))[:7])
        if base is not None and base.metrics:
            rows.append(base)
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                name = rev.get("name") or exp.get("name") or str(rev.get("rev", ""))[:7]
                row = _rev_entry(rev, name)
                if row is None or not row.metrics or rev.get("error") or exp.get("executor"):
                    skipped.append(name)
                else:
                    rows.append(row)
    return rows, skipped


def changed_params(rows: list[Experiment]) -> list[str]:
    """The flattened param keys whose values are not the same in every row."""
    keys = sorted({k for r in rows for k in r.params})
    return [k for k in keys if len({json.dumps(r.params.get(k)) for r in rows}) > 1]


def evaluated_models(rows: list[Experiment]) -> list[str]:
    """The evaluated models of any row: largest first (the dense model), then by stored bytes, then by name."""
    size: dict[str, tuple[int, int]] = {}
    for r in rows:
        for model, m in r.evaluated().items():
            size.setdefault(model, (int(m["params"]), int(m.get("weight_bytes") or 0)))
    return sorted(size, key=lambda m: (-size[m][0], -size[m][1], m))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown(rows: list[Experiment], skipped: list[str], plot_name: str | None) -> str:
    """The report: a table of rows x (changed params, fraction removed, ppl and accuracy per model)."""
    if not rows:
        raise PrunekitError("no experiment with metrics in the `dvc exp show` output; run `dvc exp run` first")
    keys = changed_params(rows)
    models = evaluated_models(rows)
    ppl_names = sorted({p[0] for r in rows for m in models if (p := r.ppl(m))})
    header = ["experiment", *keys, "removed"]
    for m in models:
        header += [f"{m} ppl", f"{m} acc"]
    lines = [
        "# prunekit experiments",
        "",
        f"Perplexity: {', '.join(ppl_names) or '-'} (first `evaluate.perplexity` dataset and length); "
        "acc: mean zero-shot accuracy over `evaluate.zero_shot.tasks`; removed: fraction of all parameters.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    carried = False
    for r in rows:
        cells = [r.name, *[_fmt(r.params.get(k)) for k in keys], _fmt(r.fraction())]
        for m in models:
            p = r.ppl(m)
            mark = "" if r.produced(m) else "*"
            carried |= bool(mark) and (p is not None or r.accuracy(m) is not None)
            cells += [_fmt(p[1] if p else None) + mark, _fmt(r.accuracy(m)) + mark]
        lines.append("| " + " | ".join(cells) + " |")
    if carried:
        lines += ["", "\\* not produced by this experiment: it did not rerun that model's stages, so these are the "
                  "results of an earlier run it carries (`dvc exp run` without targets reruns them)."]  # fmt: skip
    if skipped:
        lines += ["", "Without metrics (running, queued or failed): " + ", ".join(skipped)]
    if plot_name:
        lines += ["", f"![perplexity and accuracy against the fraction removed]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot(rows: list[Experiment], path: Path) -> None:
    """Perplexity (log scale) and accuracy against the fraction removed, a series per evaluated model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    models = evaluated_models(rows)
    for model in models:
        # The largest model (the dense one) is the 0-removed point of every experiment.
        pts = [
            (0.0 if model == models[0] else r.fraction(), r.ppl(model), r.accuracy(model), r.name)
            for r in rows
            if r.fraction() is not None and r.produced(model)  # not the results an experiment only carries
        ]
        ppl = [(f, p[1], n) for f, p, _, n in pts if p]
        acc = [(f, a, n) for f, _, a, n in pts if a is not None]
        if ppl:
            left.scatter([x for x, _, _ in ppl], [y for _, y, _ in ppl], label=model, s=18)
            for x, y, n in ppl:
                left.annotate(n, (x, y), fontsize=6, alpha=0.7)
        if acc:
            right.scatter([x for x, _, _ in acc], [y for _, y, _ in acc], label=model, s=18)
    left.set(xlabel="fraction of parameters removed", ylabel="perplexity", yscale="log", title="perplexity")
    right.set(xlabel="fraction of parameters removed", ylabel="zero-shot accuracy (mean)", title="accuracy")
    for ax in (left, right):
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def with_plot_path(text: str, png: Path) -> str:
    """The report with its image line replaced by the plot's path: for a viewer that cannot resolve the relative
    image (a Prefect artifact)."""
    return "\n".join(
        f"The plot: `{png}`" if line.startswith("![") and line.endswith(f"({png.name})") else line
        for line in text.split("\n")
    )


def dvc_json(repo: Path, *command: str) -> Any:
    """The JSON output of ``dvc <command> --json`` in ``repo`` (e.g. ``exp show``, ``metrics show``)."""
    cmd = ["dvc", *command, "--json"]
    out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if out.returncode:
        raise PrunekitError(f"`{' '.join(cmd)}` failed in '{repo}': {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout or "null")


def build_report(entries: list[Mapping[str, Any]], out: Path) -> str:
    """Write ``out`` (markdown) and its PNG beside it; return the markdown."""
    rows, skipped = parse_exp_show(entries)
    png = out.with_suffix(".png")
    text = markdown(rows, skipped, png.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, png)
    with atomic_file(out) as tmp:
        tmp.write_text(text)
    return text
