"""Stage `recover`: fine-tuning of the pruned model (`recover.*`: LoRA merged, or full), saved; the loss curve."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prunekit.pipeline.params import Params
from prunekit.pipeline.runtime import exit_after, run_stage


def recover(params: Params, model_dir: Path, teacher: Path, text: Path, out: Path, loss_file: Path, plot: Path) -> None:
    """Fine-tune ``model_dir`` on the training text (``recover.method``: LoRA merged into the weights, or every weight;
    ``recover.lora``'s steps and optimiser; ``recover.loss``: LM loss or distillation from the dense model in
    ``teacher``) and save it to ``out``; the loss per step to ``loss_file`` (.json) and ``plot`` (.png)."""
    from prunekit.data.tokens import chunks, token_stream
    from prunekit.evaluation.plots import line_plot
    from prunekit.models.loading import load_model
    from prunekit.models.provenance import write_model_record
    from prunekit.models.saving import save_model
    from prunekit.pipeline.inputs import read_documents
    from prunekit.pipeline.outputs import atomic_dir, write_json
    from prunekit.training.lora import LoraSettings, recovery_loss, train_full, train_lora

    r, m = params.recover, params.model
    model, tokenizer, adapter = load_model(model_dir, m.dtype, m.device, m.device_map)
    losses: list[float] = []
    if r.lora.steps > 0:
        stream = token_stream(tokenizer, read_documents(text, "training"))
        settings = LoraSettings.from_params(r.lora, params.seed, "recover.lora")
        dense = load_model(teacher, r.teacher_dtype or m.dtype, m.device, m.device_map)[0] if r.loss != "lm" else None
        loss = recovery_loss(r.loss, dense, r.temperature)
        blocks = chunks(stream, r.lora.seq_len, "training")
        if r.method == "full":
            model, losses = train_full(model, blocks, settings, desc="recovery (full)", loss=loss)
        else:
            model, losses = train_lora(model, blocks, settings, desc="LoRA recovery", loss=loss)
    with atomic_dir(out) as tmp:
        save_model(model, adapter, tokenizer, tmp)
        meta_src = model_dir / "prunekit.json"
        meta = json.loads(meta_src.read_text()) if meta_src.is_file() else {}
        meta["recover"] = r.model_dump()
        write_model_record(tmp, meta)
    write_json(loss_file, [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)])
    title = "full fine-tuning recovery" if r.method == "full" else "LoRA recovery"
    line_plot(plot, range(1, len(losses) + 1), {"train loss": losses}, "step", "loss", title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, dest="model_dir", required=True)
    parser.add_argument("--teacher", type=Path, required=True, help="the dense model (distillation's teacher)")
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="recovered model directory")
    parser.add_argument("--loss", type=Path, dest="loss_file", required=True, help="loss curve (.json, a DVC plot)")
    parser.add_argument("--plot", type=Path, required=True, help="loss curve (.png)")
    return run_stage("recover", parser, recover, argv)


if __name__ == "__main__":
    exit_after(main)
