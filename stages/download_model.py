"""Stage `download_model`: the base model and its tokenizer from `model.source`, as a safetensors directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.pipeline.params import Params
from prunekit.pipeline.runtime import exit_after, run_stage


def download_model(params: Params, out: Path) -> None:
    """Write the model of ``model.source`` to ``out``: config, safetensors weights, tokenizer, provenance record."""
    from prunekit.models.families import adapter_for
    from prunekit.models.loading import load_config
    from prunekit.models.provenance import write_model_record
    from prunekit.models.sources import materialize_model
    from prunekit.pipeline.outputs import atomic_dir

    with atomic_dir(out) as tmp:
        provenance = materialize_model(params.model.source, tmp)
        adapter_for(load_config(tmp))  # unsupported architectures fail here, before later stages
        write_model_record(tmp, {"source": provenance})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="model directory")
    return run_stage("download_model", parser, download_model, argv)


if __name__ == "__main__":
    exit_after(main)
