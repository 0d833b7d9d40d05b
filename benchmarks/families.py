"""Every registered family and every unit type it declares, on a tiny random model: what a cut removes and how
exactly the pruned model runs in transformers, in stock transformers without prunekit, and in llama.cpp.

    python benchmarks/families.py [--families qwen3 gemma3] [--hidden 128] [--layers 4]

Per family, a random model of its stock classes (hidden 128, 8 query heads sharing 4 KV heads of 16 dims, MLP 256,
4 layers; Gemma-3 with sliding and full layers and query_pre_attn_scalar 12) is cut by each unit type the family
declares, uniformly in every layer (half of the unit type's parameters, random scores; one of four layers for
`layer`), so every cut fits llama.cpp's uniform-width graphs. Columns:

- `removed`: the share of all parameters the cut removed;
- `|sliced - masked|`: max abs logit difference between the physically smaller model and the dense model with the
  same units zeroed (prunekit's exactness claim);
- `stock reload`: max abs logit difference of the saved directory loaded by stock transformers in a process where
  prunekit cannot be imported (its own config for uniform widths, the saved `modeling_prunekit.py` otherwise);
- `|llama.cpp - transformers|`: max abs logit difference of the F32 GGUF export run by llama.cpp
  (llama-cpp-python), or why the export refuses (head dims: llama.cpp has one key / value width per model).

Every number is over one 24-token prompt. A refused unit type is listed with the family's reason.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

from prunekit.errors import PrunekitError
from prunekit.export.gguf import write_gguf
from prunekit.export.llamacpp import open_gguf
from prunekit.export.tensor_types import TensorTypes
from prunekit.models.families import ADAPTERS, adapter_for
from prunekit.models.saving import save_model
from prunekit.models.size import count_params
from prunekit.pruning.allocations import make_plan
from prunekit.pruning.plan import PlanRequest
from prunekit.pruning.slicing import apply_plan, layouts
from prunekit.pruning.units import UNITS

# Load a saved directory where prunekit cannot be imported; print the max abs logit difference from a reference.
WITHOUT_PRUNEKIT = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoPrunekit(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "prunekit" or name.startswith("prunekit."):
                raise ModuleNotFoundError(name)
            return None

    sys.meta_path.insert(0, NoPrunekit())
    import torch
    from transformers import AutoModelForCausalLM

    directory, reference = sys.argv[1:3]
    ref = torch.load(reference)
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    with torch.no_grad():
        print((model(ref["ids"]).logits - ref["logits"]).abs().max().item())
    """
)


def tokenizer():
    """A byte-level BPE tokenizer with merges (llama.cpp's gpt2 tokenizer needs them), trained on Python's docs."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<eos>", "<unk>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([topics[k] for k in sorted(topics)][:40], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def family_model(family: str, vocab: int, hidden: int, layers: int) -> torch.nn.Module:
    config_cls, causal_cls = ADAPTERS.get(family).stock_classes
    sizes = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8, max_position_embeddings=256,
                 tie_word_embeddings=True)  # fmt: skip
    if family == "gemma3":
        sizes |= {"sliding_window": 8, "query_pre_attn_scalar": 12,
                  "layer_types": [("full" if i % 2 else "sliding") + "_attention" for i in range(layers)]}  # fmt: skip
    torch.manual_seed(0)
    model = causal_cls(config_cls(**sizes)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that errors in them show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def uniform_cut(model: torch.nn.Module, unit: str) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    """(sliced, masked, share removed): half of the unit type's parameters (one layer of ``layer``), layers alike."""
    adapter = adapter_for(model.config)
    n = len(adapter.layers(model))
    lays = layouts(model, adapter, [unit], list(range(n)))
    gen = torch.Generator().manual_seed(1)
    scores = {f"{lay.unit}.{lay.layer}": torch.rand(lay.count, generator=gen, dtype=torch.float64) for lay in lays}
    total = count_params(model)
    share = sum(lay.count * lay.params_per_unit for lay in lays) / total
    target = share / n if unit == "layer" else share / 2
    round_to = {"hidden_channel": int(model.config.num_attention_heads)}
    plan = make_plan(scores, PlanRequest(target, total, lays, round_to, target / 2), "uniform")
    masked = apply_plan(copy.deepcopy(model), adapter, plan, mode="mask") if unit != "layer" else None
    sliced = apply_plan(copy.deepcopy(model), adapter, plan, mode="slice")
    return sliced, masked, 1 - count_params(sliced) / total


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def stock_reload(directory: Path, ids: torch.Tensor, expected: torch.Tensor, work: Path) -> str:
    torch.save({"ids": ids, "logits": expected}, work / "reference.pt")
    env = os.environ | {"HF_MODULES_CACHE": str(work / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", WITHOUT_PRUNEKIT, str(directory), str(work / "reference.pt")],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    return f"{float(proc.stdout.split()[-1]):.1e}" if proc.returncode == 0 else "fails: " + proc.stderr[-200:]


def llama_cpp_diff(model: torch.nn.Module, hf_dir: Path, ids: torch.Tensor, work: Path) -> str:
    adapter = adapter_for(model.config)
    try:
        summary = write_gguf(model, adapter, work / "m.gguf", TensorTypes(default="F32"), name="m", hf_dir=hf_dir)
    except PrunekitError as e:
        return "refused: " + str(e).split(";")[0].removeprefix("GGUF export: ")[:60]
    llm = open_gguf(work / "m.gguf", n_ctx=64, logits_all=True, verbose=False, n_threads=1, type_k=0,
                    type_v=0)  # fmt: skip
    try:
        llm.eval(ids[0].tolist())
        got = torch.tensor(llm.scores[: ids.shape[1]])
    finally:
        llm.close()
    return f"{(got - logits(model, ids)[0]).abs().max().item():.1e} ({summary['architecture']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", default=ADAPTERS.names())
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    tok = tokenizer()
    ids = torch.tensor(
        [tok("def mean(values):\n    return sum(values) / len(values)  # the average")["input_ids"][:24]]
    )
    header = f"{'family':<8} {'unit':<16} {'removed':>8} {'|sliced - masked|':>18} {'stock reload':>13}"
    header += "  |llama.cpp - transformers|"
    print(header)
    print("-" * len(header))
    for family in args.families:
        adapter = ADAPTERS.get(family)
        dense = family_model(family, len(tok), args.hidden, args.layers)
        for unit in UNITS.names():
            why = adapter.refused_units.get(unit) or UNITS.get(unit).refusal(adapter, dense)
            if why is not None:
                print(f"{family:<8} {unit:<16} refused: {why[:90]}")
                continue
            sliced, masked, removed = uniform_cut(dense, unit)
            exact = (
                "(layer)" if masked is None else f"{(logits(sliced, ids) - logits(masked, ids)).abs().max().item():.1e}"
            )
            with tempfile.TemporaryDirectory(prefix="prunekit-families-") as tmp:
                work = Path(tmp)
                save_model(sliced, adapter, tok, work / "hf")
                reload = stock_reload(work / "hf", ids, logits(sliced, ids), work)
                cpp = llama_cpp_diff(sliced, work / "hf", ids, work)
            print(f"{family:<8} {unit:<16} {removed:>8.2%} {exact:>18} {reload:>13}  {cpp}")


if __name__ == "__main__":
    main()
