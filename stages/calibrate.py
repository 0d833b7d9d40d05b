"""Stage `calibrate`: `calibrate.samples` x `calibrate.seq_len` calibration tokens, seeded."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.pipeline.params import Params
from prunekit.pipeline.runtime import exit_after, run_stage


def body(params: Params, args: argparse.Namespace) -> None:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from prunekit.data.tokens import random_windows, token_stream
    from prunekit.pipeline.files import atomic_file
    from prunekit.pipeline.stageio import read_documents

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    stream = token_stream(tokenizer, read_documents(Path(args.text), "calibration"))
    windows = random_windows(stream, params.calibrate.samples, params.calibrate.seq_len, params.seed)
    with atomic_file(args.out) as tmp:
        save_file({"input_ids": windows.contiguous()}, str(tmp), metadata={"seed": str(params.seed)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="model directory (for its tokenizer)")
    parser.add_argument("--text", required=True, help="directory of <role>.jsonl texts")
    parser.add_argument("--out", required=True, help="calibration tokens (.safetensors)")
    return run_stage("calibrate", parser, body, argv)


if __name__ == "__main__":
    exit_after(main)
