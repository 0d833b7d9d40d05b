"""Stage `calibrate`: `calibrate.samples` x `calibrate.seq_len` calibration tokens, seeded."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.pipeline.params import Params
from prunekit.pipeline.runtime import exit_after, run_stage


def calibrate(params: Params, model_dir: Path, text: Path, out: Path) -> None:
    """Token windows for scoring: ``calibrate.samples`` random windows of ``calibrate.seq_len`` tokens of the
    calibration text (``text``/calibration.jsonl; with several sources, split evenly over them), tokenized by
    ``model_dir``'s tokenizer, saved to ``out``."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from prunekit.data.tokens import mixed_windows, token_stream
    from prunekit.pipeline.inputs import read_document_groups
    from prunekit.pipeline.outputs import atomic_file

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    streams = [token_stream(tokenizer, docs) for docs in read_document_groups(text, "calibration")]
    windows = mixed_windows(streams, params.calibrate.samples, params.calibrate.seq_len, params.seed)
    with atomic_file(out) as tmp:
        save_file({"input_ids": windows.contiguous()}, str(tmp), metadata={"seed": str(params.seed)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", type=Path, dest="model_dir", required=True, help="model directory (for its tokenizer)"
    )
    parser.add_argument("--text", type=Path, required=True, help="directory of <role>.jsonl texts")
    parser.add_argument("--out", type=Path, required=True, help="calibration tokens (.safetensors)")
    return run_stage("calibrate", parser, calibrate, argv)


if __name__ == "__main__":
    exit_after(main)
