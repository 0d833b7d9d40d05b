"""Stage `quantize`: realise the searched plan (bitsandbytes / RTN), then QLoRA on the quantized base."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.pipeline.params import Params
from prunekit.pipeline.runtime import exit_after, run_stage


def quantize(
    params: Params, model_dir: Path, plan_file: Path, text: Path, out: Path, loss_file: Path, plot: Path
) -> None:
    """Realise the searched plan (``plan_file``) on ``model_dir`` (``quantize`` settings), train QLoRA adapters
    (``quantize.lora``) and save the quantized model with them to ``out``; the QLoRA loss to ``loss_file``/``plot``."""
    from prunekit.data.tokens import chunks, token_stream
    from prunekit.evaluation.plots import line_plot
    from prunekit.models.loading import load_model
    from prunekit.pipeline.inputs import read_documents
    from prunekit.pipeline.outputs import write_json
    from prunekit.quant.backend import lora_custom_modules
    from prunekit.quant.frozen import decoded_once
    from prunekit.quant.plan import check_plan, quant_targets, read_plan
    from prunekit.quant.realise import realise
    from prunekit.quant.saving import save_quantized
    from prunekit.quant.schemes import QuantSettings
    from prunekit.training.lora import LoraSettings, train_lora

    q, m = params.quantize, params.model
    plan, _, _ = read_plan(plan_file)
    settings = QuantSettings.from_params(q)
    model, tokenizer, adapter = load_model(model_dir, m.dtype, m.device, m.device_map)
    check_plan(plan, quant_targets(model, adapter, embeddings=True))
    realise(model, plan, settings)
    peft_model, losses = None, []
    if q.lora.steps > 0:
        stream = token_stream(tokenizer, read_documents(text, "training"))
        lora = LoraSettings.from_params(q.lora, params.seed, "quantize.lora")
        with decoded_once(model, q.lora.decode):
            peft_model, losses = train_lora(model, chunks(stream, q.lora.seq_len, "training"), lora, merge=False,
                                            custom_modules=lora_custom_modules(), desc="QLoRA")  # fmt: skip
    save_quantized(model, tokenizer, plan, settings, m.dtype, out, peft_model=peft_model)
    write_json(loss_file, [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)])
    line_plot(plot, range(1, len(losses) + 1), {"train loss": losses}, "step", "loss", "QLoRA")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, dest="model_dir", required=True)
    parser.add_argument("--plan", type=Path, dest="plan_file", required=True)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="quantized model directory")
    parser.add_argument(
        "--loss", type=Path, dest="loss_file", required=True, help="QLoRA loss curve (.json, a DVC plot)"
    )
    parser.add_argument("--plot", type=Path, required=True, help="QLoRA loss curve (.png)")
    return run_stage("quantize", parser, quantize, argv)


if __name__ == "__main__":
    exit_after(main)
