"""The checks that need an NVIDIA GPU, in one run, one table: what CPU-only CI cannot show.

    python benchmarks/gpu_check.py [--model DIR] [--shape smollm2-135m|qwen2.5-0.5b] [--device cuda]

On a model directory (``--model``: e.g. a copy of ``models/base``) or, with no network and no model at hand,
random weights of a published shape (the config fields of SmolLM2-135M or Qwen2.5-0.5B), it measures:

* ``param_first`` scoring on 10 x 64 tokens: seconds and CUDA max allocated (weights included);
* ``bip`` scoring with the whole model on the GPU and one layer at a time (``model.offload: layerwise``): CUDA max
  allocated and seconds of each;
* a 20% plan (KV groups + MLP channels, uniform, layers 3..n-3) sliced: dense vs pruned prefill / decode tokens/s
  at batch 1 and 16 in bfloat16 (median of 3 after a warm-up), and their ratio;
* bitsandbytes' CUDA kernels: the pruned model realised in ``nf4`` and in ``int8`` everywhere (float16 base),
  its forward time, and the largest logit difference to the same plan fake-quantized (prunekit's search image);
* QLoRA on the ``nf4`` base: 4 LoRA steps, seconds per step, losses finite and the adapters' gradients non-zero.

Random weights make the perplexities meaningless but not the memory, the speed or the kernels' agreement.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from prunekit.models.loading import load_pretrained

SHAPES = {  # published config fields (sizes only; the family contract tests hold the whole files)
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768),
}  # fmt: skip


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if args.model:
        return load_pretrained(args.model, dtype=dtype).to(device).eval()  # stock or pruned directories
    shape = dict(SHAPES[args.shape])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


def timed(fn, device: torch.device) -> float:
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    from prunekit.evaluation.speed import speed
    from prunekit.models.families import adapter_for
    from prunekit.models.size import count_params
    from prunekit.pruning.allocations import make_plan
    from prunekit.pruning.criteria import CRITERIA, ScoreRequest
    from prunekit.pruning.plan import PlanRequest
    from prunekit.pruning.slicing import apply_plan, layouts, prunable_layers
    from prunekit.quant.backend import lora_custom_modules
    from prunekit.quant.plan import quant_targets
    from prunekit.quant.realise import fake_quantized, realise
    from prunekit.quant.schemes import QuantSettings
    from prunekit.training.lora import LoraSettings, train_lora
    from prunekit.training.loss import lm_loss

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Hugging Face model directory (default: random weights of --shape)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows: list[tuple[str, str]] = [("device", torch.cuda.get_device_name(device)), ("torch", torch.__version__)]
    gen = torch.Generator().manual_seed(0)

    # 1. Scoring memory (float32, as the score stage runs by default) and time.
    model = build(args, device, torch.float32)
    adapter = adapter_for(model.config)
    vocab = model.config.vocab_size
    calibration = torch.randint(0, vocab, (10, 64), generator=gen)
    n_layers = len(adapter.layers(model))
    units = ["attn_kv_group", "mlp_channel"]
    req = ScoreRequest(units, list(range(n_layers)), calibration, batch_size=10, seed=0)
    torch.cuda.reset_peak_memory_stats(device)
    weights = torch.cuda.memory_allocated(device) / 2**20
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    scores = CRITERIA.get("param_first").score(model, adapter, req)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    rows += [("model", f"{args.model or args.shape}: {count_params(model):,} parameters")]
    rows += [("param_first scoring, 10x64 tokens", f"{seconds:.2f} s; peak {peak:.0f} MiB (weights {weights:.0f})")]

    # 1b. Forward-only scoring (bip) with the whole model on the GPU vs one layer at a time (model.offload).
    import tempfile

    from prunekit.models.layerwise import LayerwiseModel

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        peaks = {}
        for mode in ("in memory", "layerwise"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            if mode == "in memory":
                CRITERIA.get("bip").score(model, adapter, req)
                peaks[mode] = torch.cuda.max_memory_allocated(device) / 2**20  # the model was already resident
            else:
                model.to("cpu")
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                lw = LayerwiseModel(tmp, "float32", str(device))
                CRITERIA.get("bip").score_layerwise(lw, lw.adapter, req)
                peaks[mode] = torch.cuda.max_memory_allocated(device) / 2**20
                model.to(device)
            torch.cuda.synchronize(device)
            peaks[mode + " s"] = time.perf_counter() - start
    whole, layered = peaks["in memory"], peaks["layerwise"]
    rows += [("bip scoring, whole model vs layerwise",
              f"peak {whole:.0f} vs {layered:.0f} MiB ({layered / whole:.3f}x); "
              f"{peaks['in memory s']:.2f} vs {peaks['layerwise s']:.2f} s")]  # fmt: skip

    # 2. Slice 20% and compare speed in bfloat16.
    plan = make_plan(
        scores,
        PlanRequest(0.2, count_params(model), layouts(model, adapter, units, prunable_layers(n_layers, 3, 2)),
                    {"attn_kv_group": 1, "mlp_channel": 8}, 0.02),
        "uniform",
    )  # fmt: skip
    pruned = apply_plan(copy.deepcopy(model).cpu(), adapter, plan).to(device)
    rows += [("pruned", f"{1 - count_params(pruned) / count_params(model):.2%} of the parameters removed")]
    prompts = torch.randint(0, vocab, (16, 128), generator=gen)
    for batch in (1, 16):
        rates = {}
        for name, m in (("dense", model), ("pruned", pruned)):
            half = copy.deepcopy(m).to(torch.bfloat16)
            rates[name] = speed(half, prompts[:batch], new_tokens=32, repeats=3)
            del half
        d, p = rates["dense"], rates["pruned"]
        for kind in ("prefill", "decode"):
            key = f"{kind}_tokens_per_s"
            rows += [
                (
                    f"{kind} tok/s bf16 bs{batch}: dense / pruned",
                    f"{d[key]:.0f} / {p[key]:.0f} ({p[key] / d[key]:.2f}x)",
                )
            ]
    del model
    torch.cuda.empty_cache()

    # 3. bitsandbytes kernels against prunekit's fake-quantized image of the same plan.
    settings = QuantSettings(group_size=128, double_quant=True, int8_threshold=6.0)
    ids = torch.randint(0, vocab, (4, 128), generator=gen).to(device)
    base16 = pruned.to(torch.float16)
    for scheme in ("nf4", "int8"):
        qplan = {t.name: scheme for t in quant_targets(base16, adapter)}
        with torch.no_grad(), fake_quantized(base16, qplan, settings):
            reference = base16(input_ids=ids).logits.float()
        realised = realise(copy.deepcopy(base16), qplan, settings)
        with torch.no_grad():
            realised(input_ids=ids)
            times = [timed(lambda m=realised: m(input_ids=ids), device) for _ in range(3)]
            logits = realised(input_ids=ids).logits.float()
        diff = (logits - reference).abs().max().item()
        scale = reference.abs().max().item()
        rows += [(f"{scheme} forward 4x128 (CUDA kernels)", f"{statistics.median(times) * 1e3:.1f} ms; max |logit - "
                  f"fake-quantized| {diff:.3g} of max |logit| {scale:.3g}")]  # fmt: skip
        if scheme == "nf4":
            qlora_base = realised
        else:
            del realised

    # 4. QLoRA steps on the nf4 base.
    blocks = torch.randint(0, vocab, (64, 128), generator=gen)
    cfg = LoraSettings(rank=8, alpha=16, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                       "gate_proj", "up_proj", "down_proj"], learning_rate=1e-4, batch_size=8, steps=4,
                       warmup_steps=0, weight_decay=0.0, seed=0)  # fmt: skip
    start = time.perf_counter()
    peft_model, losses = train_lora(qlora_base, blocks, cfg, merge=False, custom_modules=lora_custom_modules())
    torch.cuda.synchronize(device)
    per_step = (time.perf_counter() - start) / cfg.steps
    peft_model.train()
    loss = lm_loss(peft_model, blocks[:8].to(device))
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n and p.grad is not None]
    nonzero = sum(int(g.abs().sum().item() > 0) for g in grads)
    finite = all(torch.isfinite(torch.tensor(losses)))
    rows += [("QLoRA nf4, 4 steps of 8x128", f"{per_step:.2f} s/step; losses {', '.join(f'{v:.3f}' for v in losses)}; "
              f"finite {finite}; LoRA tensors with nonzero grad {nonzero}/{len(grads)}")]  # fmt: skip

    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    main()
