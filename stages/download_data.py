"""Stage `download_data`: the texts for calibration, training and evaluation (`data`), disjoint, one file each."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from prunekit.pipeline.params import Params
from prunekit.pipeline.runtime import exit_after, run_stage

log = logging.getLogger("prunekit.stages.download_data")


def download_data(params: Params, out: Path) -> None:
    """Write ``<role>.jsonl`` for every role of ``data`` to ``out``, and the ``data`` params they come from
    (``source.json``: the validate stage checks token counts against texts made from the current params)."""
    from prunekit.data.sources import ROLES, SOURCE_RECORD, load_documents
    from prunekit.pipeline.outputs import atomic_dir

    with atomic_dir(out) as tmp:
        (tmp / SOURCE_RECORD).write_text(json.dumps(params.data.model_dump(), indent=2, sort_keys=True) + "\n")
        for role in ROLES:
            docs = load_documents(getattr(params.data, role), role, text_field=params.data.text_field)
            with open(tmp / f"{role}.jsonl", "w") as f:
                for doc in docs:
                    f.write(json.dumps({"text": doc}) + "\n")
            log.info("%s: %d documents, %d characters", role, len(docs), sum(map(len, docs)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="text directory")
    return run_stage("download_data", parser, download_data, argv)


if __name__ == "__main__":
    exit_after(main)
