"""Stage `download`: the base model + tokenizer (`model`), or the texts for each role (`data`)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from prunekit.pipeline.params import Params
from prunekit.pipeline.runtime import exit_after, run_stage

log = logging.getLogger("prunekit.stages.download")


def download_model(params: Params, out: Path) -> None:
    from prunekit.models.families import adapter_for
    from prunekit.models.loading import load_config
    from prunekit.models.provenance import write_model_record
    from prunekit.models.sources import materialize_model
    from prunekit.pipeline.files import atomic_dir

    with atomic_dir(out) as tmp:
        provenance = materialize_model(params.model.source, tmp)
        adapter_for(load_config(tmp))  # unsupported architectures fail here, before later stages
        write_model_record(tmp, {"source": provenance})


def download_data(params: Params, out: Path) -> None:
    from prunekit.data.sources import ROLES, load_documents
    from prunekit.pipeline.files import atomic_dir

    with atomic_dir(out) as tmp:
        for role in ROLES:
            docs = load_documents(getattr(params.data, role), role, text_field=params.data.text_field)
            with open(tmp / f"{role}.jsonl", "w") as f:
                for doc in docs:
                    f.write(json.dumps({"text": doc}) + "\n")
            log.info("%s: %d documents, %d characters", role, len(docs), sum(map(len, docs)))


def download(params: Params, what: str, out: Path) -> None:
    """``what``: "model" (the base model and tokenizer of ``model.source``) or "data" (a text per role), to ``out``."""
    (download_model if what == "model" else download_data)(params, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["model", "data"])
    parser.add_argument("--out", type=Path, required=True)
    return run_stage("download", parser, download, argv)


if __name__ == "__main__":
    exit_after(main)
