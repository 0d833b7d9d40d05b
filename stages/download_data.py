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
    """Write ``<role>.jsonl`` for every role of ``data`` to ``out`` (a role with several sources: each document
    with its source's index), and the ``data`` params they come from (``source.json``: the validate stage checks
    token counts against texts made from the current params)."""
    from prunekit.data.sources import ROLES, SOURCE_RECORD, load_documents
    from prunekit.pipeline.outputs import atomic_dir

    with atomic_dir(out) as tmp:
        (tmp / SOURCE_RECORD).write_text(json.dumps(params.data.model_dump(), indent=2, sort_keys=True) + "\n")
        for role in ROLES:
            specs = params.data.sources(role)
            with open(tmp / f"{role}.jsonl", "w") as f:
                for i, spec in enumerate(specs):
                    docs = load_documents(spec, role, text_field=params.data.text_field)
                    tag = {"source": i} if len(specs) > 1 else {}  # several: read_document_groups parts them
                    for doc in docs:
                        f.write(json.dumps({"text": doc} | tag) + "\n")
                    log.info("%s (%s): %d documents, %d characters", role, spec, len(docs), sum(map(len, docs)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="text directory")
    return run_stage("download_data", parser, download_data, argv)


if __name__ == "__main__":
    exit_after(main)
