"""GGUF exports in llama.cpp against the same weights in transformers, side by side in one run.

For a dense model directory and a pruned (recovered) one, writes GGUF files (dense F16, pruned F16, pruned in the
searched plan's types, and the pruned model in single types for comparison with the searched plan) and measures,
on this CPU: file bytes, perplexity on the evaluation chunks computed from llama.cpp's own logits, next to
prunekit's perplexity of the same weights in transformers (the weights rounded as the file stores them), and
prefill / decode tokens/s at batch 1 in llama.cpp and, for reference, in transformers (float32). Prints one table
and the target ratios.

    python benchmarks/export.py ../shared/data/c4/c4_validation_2k.jsonl --dense models/base \\
        --pruned models/recovered --plan data/quant_plan.json --tokenizer-gguf models/base/tokenizer.gguf
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def llama_cpp_nll(path: Path, chunks: torch.Tensor, threads: int) -> float:
    """Mean next-token NLL of ``chunks`` (each from its own start) from llama.cpp's logits."""
    from prunekit.export.llamacpp import open_gguf

    llm = open_gguf(path, n_ctx=chunks.shape[1], logits_all=True, verbose=False, n_threads=threads,
                    n_batch=chunks.shape[1])  # fmt: skip
    total, count = 0.0, 0
    try:
        for chunk in chunks.tolist():
            llm.reset()
            llm.eval(chunk)
            logits = torch.tensor(llm.scores[: len(chunk)], dtype=torch.float64)
            logp = torch.log_softmax(logits[:-1], dim=-1)
            total -= logp.gather(1, torch.tensor(chunk[1:]).unsqueeze(1)).sum().item()
            count += len(chunk) - 1
    finally:
        llm.close()
    return total / count


def llama_cpp_speed(path: Path, prompt: list[int], new_tokens: int, repeats: int, threads: int) -> tuple[float, float]:
    """(prefill, decode) tokens/s at batch 1: median over ``repeats`` after one warm-up."""
    import llama_cpp

    from prunekit.export.llamacpp import open_gguf

    llm = open_gguf(path, n_ctx=len(prompt) + new_tokens + 8, verbose=False, n_threads=threads,
                    n_batch=len(prompt))  # fmt: skip
    pre, dec = [], []
    try:
        for i in range(repeats + 1):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            t1 = time.perf_counter()
            for _ in range(new_tokens):
                last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
                llm.eval([int(last.argmax())])
            t2 = time.perf_counter()
            if i:
                pre.append(t1 - t0)
                dec.append(t2 - t1)
    finally:
        llm.close()
    return len(prompt) / statistics.median(pre), new_tokens / statistics.median(dec)


def main() -> None:
    from prunekit.data.sources import load_documents
    from prunekit.data.tokens import chunks, token_stream
    from prunekit.evaluation.perplexity import perplexity
    from prunekit.evaluation.speed import speed
    from prunekit.export.directory import export_directory
    from prunekit.export.tensor_types import TensorTypes, choose_types, rounded
    from prunekit.models.loading import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="evaluation text: python-docs or a local .txt / .jsonl (its evaluation split)")
    parser.add_argument("--dense", type=Path, default=ROOT / "models/base")
    parser.add_argument("--pruned", type=Path, default=ROOT / "models/recovered")
    parser.add_argument("--plan", type=Path, nargs="+", default=[ROOT / "data/quant_plan.json"],
                        help="searched plans (each a file of the pruned model in its types)")  # fmt: skip
    parser.add_argument("--embedding", default=None,
                        help="override the embedding's type (default: the plan's in the searched file, the single "
                             "type in the others)")  # fmt: skip
    parser.add_argument("--single-types", nargs="*", default=["Q4_0", "Q5_0", "Q8_0"],
                        help="also the pruned model with one of these types for every decoder weight")  # fmt: skip
    parser.add_argument("--tokenizer-gguf", type=Path, default=None)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=None, help="keep the GGUF files here (default: a temporary)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    _, tokenizer, _ = load_model(args.dense)
    stream = token_stream(tokenizer, load_documents(args.data, "evaluation"))
    evaluation = chunks(stream, args.seq_len, "evaluation")[: args.chunks]
    prompt = stream[: args.prompt_len].tolist()
    files = {
        "dense F16": (args.dense, TensorTypes(default="F16")),
        "pruned F16": (args.pruned, TensorTypes(default="F16")),
        **{
            f"pruned searched {plan.stem}": (
                args.pruned,
                choose_types("plan", plan, unplanned="F16", embedding=args.embedding),
            )
            for plan in args.plan
        },
        **{f"pruned {t}": (args.pruned, TensorTypes(default=t, embedding=args.embedding)) for t in args.single_types},
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out_dir or Path(tmp)
        for label, (model_dir, types) in files.items():
            path = out_dir / (label.replace(" ", "_") + ".gguf")
            summary = export_directory(model_dir, path, types, tokenizer_gguf=args.tokenizer_gguf)
            model, _, _ = load_model(model_dir)
            same_weights = rounded(model, types)  # what the file holds, as float weights
            ppl_torch = perplexity(same_weights, evaluation, batch_size=8)["ppl"]
            ppl_cpp = math.exp(llama_cpp_nll(path, evaluation, args.threads))
            pre_cpp, dec_cpp = llama_cpp_speed(path, prompt, args.new_tokens, args.repeats, args.threads)
            torch_speed = speed(model, torch.tensor([prompt]), args.new_tokens, args.repeats)
            rows.append(
                {"file": label, "arch": summary["architecture"], "bytes": summary["bytes"], "ppl_cpp": ppl_cpp,
                 "ppl_torch": ppl_torch, "prefill_cpp": pre_cpp, "decode_cpp": dec_cpp,
                 "prefill_torch": torch_speed["prefill_tokens_per_s"],
                 "decode_torch": torch_speed["decode_tokens_per_s"]}
            )  # fmt: skip
            print(rows[-1], flush=True)
            del model, same_weights

    dense = rows[0]
    searched = rows[2]
    print("\nthe searched plans against single-type files, held-out perplexity in llama.cpp:")
    for r in rows[2:]:
        print(f"  {r['file']}: {r['bytes'] / 2**20:.1f} MiB, ppl {r['ppl_cpp']:.3f}")
    singles = [r for r in rows if r["file"].startswith("pruned ") and not r["file"].startswith("pruned searched")]
    for r in rows[2 : 2 + len(args.plan)]:
        # The rival: the smallest single-type file (of --single-types) at least as large as the searched one.
        rivals = [s for s in singles if s["file"] != "pruned F16" and s["bytes"] >= r["bytes"]]
        nearest = min(rivals, key=lambda s: s["bytes"], default=None)
        if nearest is not None:
            verdict = "beats" if r["ppl_cpp"] < nearest["ppl_cpp"] else "does not beat"
            mine = f"{r['file']} ({r['bytes'] / 2**20:.1f} MiB, ppl {r['ppl_cpp']:.2f})"
            rival = f"{nearest['file']} ({nearest['bytes'] / 2**20:.1f} MiB, ppl {nearest['ppl_cpp']:.2f})"
            print(f"  {mine} {verdict} the smallest single-type file of the same or larger size, {rival}")
    print(f"\n{args.chunks} chunks of {args.seq_len} tokens of {args.data}; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, batch 1, {args.threads} threads, median of {args.repeats}")  # fmt: skip
    print("| file | llama.cpp arch | MiB | x dense F16 bytes | ppl llama.cpp | ppl transformers (same weights) | "
          "prefill tok/s llama.cpp | decode tok/s llama.cpp | prefill tok/s transformers fp32 | "
          "decode tok/s transformers fp32 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['arch']} | {r['bytes'] / 2**20:.1f} | {r['bytes'] / dense['bytes']:.3f} | "
              f"{r['ppl_cpp']:.2f} | {r['ppl_torch']:.2f} ({r['ppl_cpp'] / r['ppl_torch'] - 1:+.2%}) | "
              f"{r['prefill_cpp']:.0f} | {r['decode_cpp']:.1f} | {r['prefill_torch']:.0f} | "
              f"{r['decode_torch']:.1f} |")  # fmt: skip
    pruned = rows[1]
    print(f"\nsearched file bytes / dense F16 bytes: {searched['bytes'] / dense['bytes']:.3f}")
    print(f"searched file decode in llama.cpp / pruned fp32 decode in transformers: "
          f"{searched['decode_cpp'] / pruned['decode_torch']:.2f}x")  # fmt: skip
    print(f"pruned F16 decode / dense F16 decode (llama.cpp): {pruned['decode_cpp'] / dense['decode_cpp']:.2f}x")


if __name__ == "__main__":
    main()
