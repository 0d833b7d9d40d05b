"""Shared set-up for the benchmark scripts: the model, calibration windows and evaluation chunks."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from prunekit.data.sources import load_documents
from prunekit.data.tokens import chunks, random_windows, token_stream
from prunekit.models.loading import load_model
from prunekit.pipeline.params import load_params

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Setup:
    model_dir: Path
    data: str
    calibration: torch.Tensor
    evaluation: torch.Tensor


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data", nargs="?", default="python-docs", help="data source: python-docs or a local .txt/.jsonl"
    )
    parser.add_argument("--model", default=str(ROOT / "models/base"), help="model directory (dvc repro writes it)")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"), help="calibration/evaluation sizes and seed")
    parser.add_argument("--eval-chunks", type=int, default=64, help="evaluation chunks of evaluate.seq_lens[0] tokens")


def make_setup(args: argparse.Namespace) -> Setup:
    params = load_params(args.params)
    _, tokenizer, _ = load_model(args.model)
    calib = token_stream(tokenizer, load_documents(args.data, "calibration", text_field=params.data.text_field))
    evals = token_stream(tokenizer, load_documents(args.data, "evaluation", text_field=params.data.text_field))
    return Setup(
        model_dir=Path(args.model),
        data=args.data,
        calibration=random_windows(calib, params.calibrate.samples, params.calibrate.seq_len, params.seed),
        evaluation=chunks(evals, params.evaluate.seq_lens[0], "evaluation")[: args.eval_chunks],
    )
