"""Stage `quantize`: realise the searched plan (bitsandbytes / RTN), then QLoRA on the quantized base."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.pipeline.params import Params
from prunekit.pipeline.runtime import exit_after, run_stage


def body(params: Params, args: argparse.Namespace) -> None:
    from prunekit.data.tokens import chunks, token_stream
    from prunekit.evaluation.plots import line_plot
    from prunekit.models.loading import load_model
    from prunekit.pipeline.files import write_json
    from prunekit.pipeline.stageio import read_documents
    from prunekit.quant.apply import check_plan, lora_custom_modules, quant_targets, read_plan, realise, save_quantized
    from prunekit.quant.schemes import QuantSettings
    from prunekit.training.lora import LoraSettings, train_lora

    q, m = params.quantize, params.model
    plan, _, _ = read_plan(Path(args.plan))
    settings = QuantSettings(group_size=q.group_size, double_quant=q.double_quant, int8_threshold=q.int8_threshold)
    model, tokenizer, adapter = load_model(args.model, m.dtype, m.device, m.device_map)
    check_plan(plan, quant_targets(model, adapter))
    realise(model, plan, settings)
    peft_model, losses = None, []
    if q.qlora_steps > 0:
        blocks = chunks(
            token_stream(tokenizer, read_documents(Path(args.text), "training")), q.qlora_seq_len, "training"
        )
        lora = LoraSettings(
            rank=q.qlora_rank,
            alpha=q.qlora_alpha,
            dropout=q.qlora_dropout,
            target_modules=list(q.qlora_target_modules),
            learning_rate=q.qlora_learning_rate,
            batch_size=q.qlora_batch_size,
            steps=q.qlora_steps,
            warmup_steps=0,
            weight_decay=0.0,
            seed=params.seed,
        )
        peft_model, losses = train_lora(
            model, blocks, lora, merge=False, custom_modules=lora_custom_modules(), key="quantize.qlora_target_modules"
        )
    save_quantized(model, tokenizer, plan, settings, m.dtype, Path(args.out), peft_model=peft_model)
    write_json(args.loss, [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)])
    line_plot(Path(args.plot), range(1, len(losses) + 1), {"train loss": losses}, "step", "loss", "QLoRA")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--out", required=True, help="quantized model directory")
    parser.add_argument("--loss", required=True, help="QLoRA loss curve (.json, a DVC plot)")
    parser.add_argument("--plot", required=True, help="QLoRA loss curve (.png)")
    return run_stage("quantize", parser, body, argv)


if __name__ == "__main__":
    exit_after(main)
