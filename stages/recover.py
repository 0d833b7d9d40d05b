"""Stage `recover`: LoRA fine-tuning of the pruned model (`recover.*`), merged and saved; the loss curve."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prunekit.pipeline.params import Params
from prunekit.pipeline.runtime import exit_after, run_stage


def body(params: Params, args: argparse.Namespace) -> None:
    from prunekit.data.tokens import chunks, token_stream
    from prunekit.evaluation.plots import line_plot
    from prunekit.models.loading import load_model
    from prunekit.models.provenance import write_model_record
    from prunekit.pipeline.files import atomic_dir, write_json
    from prunekit.pipeline.stageio import read_documents
    from prunekit.pruning.slicing import save_model
    from prunekit.training.lora import LoraSettings, train_lora

    r, m = params.recover, params.model
    model, tokenizer, adapter = load_model(args.model, m.dtype, m.device, m.device_map)
    losses: list[float] = []
    if r.steps > 0:
        blocks = chunks(token_stream(tokenizer, read_documents(Path(args.text), "training")), r.seq_len, "training")
        settings = LoraSettings.from_params(r, r.steps, params.seed, r.warmup_steps, r.weight_decay)
        model, losses = train_lora(model, blocks, settings)
    with atomic_dir(args.out) as tmp:
        save_model(model, adapter, tokenizer, tmp)
        meta_src = Path(args.model) / "prunekit.json"
        meta = json.loads(meta_src.read_text()) if meta_src.is_file() else {}
        meta["recover"] = r.model_dump()
        write_model_record(tmp, meta)
    write_json(args.loss, [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)])
    line_plot(Path(args.plot), range(1, len(losses) + 1), {"train loss": losses}, "step", "loss", "LoRA recovery")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--out", required=True, help="recovered model directory")
    parser.add_argument("--loss", required=True, help="loss curve (.json, a DVC plot)")
    parser.add_argument("--plot", required=True, help="loss curve (.png)")
    return run_stage("recover", parser, body, argv)


if __name__ == "__main__":
    exit_after(main)
