"""The result of a run at a glance: one row per evaluated model, from ``dvc metrics show --json``.

    prunekit summary [--json metrics.json]

A metrics file that holds a ``ppl`` section is an evaluated model, named after its file (dvc.yaml declares
which files those are; nothing here lists them). Rows go from the largest model to the smallest. Columns:
parameters, the fraction removed (against the row with the most parameters, the dense model), stored weight
bytes and bits per weight, the first perplexity metric, the mean zero-shot accuracy and decode tokens/s at the
smallest measured batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError


@dataclass(frozen=True)
class ModelRow:
    name: str
    params: int
    weight_bytes: int | None
    ppl_name: str | None
    ppl: float | None
    acc: float | None
    decode: tuple[int, float] | None  # (batch size, tokens/s)


def model_rows(metrics: Mapping[str, Any]) -> list[ModelRow]:
    """The evaluated models of the workspace's metrics (``dvc metrics show --json``)."""
    revision: Mapping[str, Any] = metrics.get("workspace") or next(iter(metrics.values()), {})
    rows = []
    for file, entry in ((revision or {}).get("data") or {}).items():
        data = (entry or {}).get("data") or {}
        if not isinstance(data.get("ppl"), Mapping) or "params" not in data:
            continue
        ppl_name, ppl = next(iter(data["ppl"].items()), (None, None))
        speed = data.get("efficiency") or {}
        batches = sorted(int(k.removeprefix("batch_")) for k in speed if k.startswith("batch_"))
        decode = (batches[0], speed[f"batch_{batches[0]}"]["decode_tokens_per_s"]) if batches else None
        acc = ((data.get("zero_shot") or {}).get("average") or {}).get("acc")
        rows.append(
            ModelRow(Path(file).stem, int(data["params"]), data.get("weight_bytes"), ppl_name, ppl, acc, decode)
        )
    if not rows:
        raise PrunekitError("no evaluated model in `dvc metrics show`; run `dvc repro` first")
    return sorted(rows, key=lambda r: (-r.params, -(r.weight_bytes or 0), r.name))


def summary_table(rows: list[ModelRow]) -> str:
    """A plain-text table, one line per model, for a terminal."""
    most = max(r.params for r in rows)
    batch = next((r.decode[0] for r in rows if r.decode), None)
    header = ["model", "parameters", "removed", "weight MiB", "bits/weight", "ppl", "acc", f"decode tok/s (bs{batch})"]
    table = [header]
    for r in rows:
        bits = 8 * r.weight_bytes / r.params if r.weight_bytes else None
        table.append(
            [
                r.name,
                f"{r.params:,}",
                f"{1 - r.params / most:.2%}",
                f"{r.weight_bytes / 2**20:.1f}" if r.weight_bytes else "-",
                f"{bits:.2f}" if bits else "-",
                f"{r.ppl:.2f}" if r.ppl is not None else "-",
                f"{r.acc:.3f}" if r.acc is not None else "-",
                f"{r.decode[1]:.1f}" if r.decode else "-",
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines = [line(row) for row in table]
    names = sorted({r.ppl_name for r in rows if r.ppl_name})
    notes = [
        f"ppl: {', '.join(names)}; acc: mean zero-shot accuracy; removed: fraction of the largest model's parameters; "
        "bits/weight: stored weight bytes per parameter (embeddings included)."
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], "", *notes]) + "\n"
