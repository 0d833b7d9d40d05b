"""Pruned checkpoints outside prunekit: Hugging Face directories that stock transformers loads with
``trust_remote_code`` where prunekit cannot be imported."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from test_families import tiny_family
from test_head_dims import HEAD_DIM_UNITS, grouped_plan, head_units, masked_and_sliced
from test_pruning import logits

from prunekit.errors import PrunekitError
from prunekit.export.llamacpp import open_gguf
from prunekit.models.families import ADAPTERS, adapter_for
from prunekit.models.loading import load_pretrained
from prunekit.models.modeling import REMOTE_CODE_FILE
from prunekit.models.saving import save_model
from prunekit.pruning.compensation import add_zero_biases
from prunekit.pruning.units import UNITS

# Run in a fresh interpreter that cannot import prunekit (an import hook refuses it, as if it were not
# installed): load the directory the way a user of stock transformers does, save its logits and greedy tokens.
WITHOUT_PRUNEKIT = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoPrunekit(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "prunekit" or name.startswith("prunekit."):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, NoPrunekit())
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory, ids_file, out = sys.argv[1:4]
    ids = torch.tensor([[int(t) for t in open(ids_file).read().split()]])
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert not any(m == "prunekit" or m.startswith("prunekit.") for m in sys.modules), "prunekit was imported"
    save_file({"logits": logits.contiguous(), "tokens": tokens}, out)
    print(type(model).__module__, type(model).__name__)
    """
)


def load_without_prunekit(directory, tmp_path, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], str]:
    (tmp_path / "ids.txt").write_text(" ".join(str(int(t)) for t in ids[0]))
    env = os.environ | {"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_PRUNEKIT, str(directory), str(tmp_path / "ids.txt"), str(tmp_path / "o.st")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(tmp_path / "o.st"), proc.stdout.strip()


@pytest.mark.parametrize("family", ADAPTERS.names())
def test_pruned_directory_loads_without_prunekit(family: str, tmp_path, tokenizer) -> None:
    """Per-layer widths, pruned head dims in two layers and o_proj / down_proj biases: the saved directory's
    own modeling file gives stock transformers the masked dense model's logits and greedy tokens."""
    dense = tiny_family(family, False, len(tokenizer))
    adapter = adapter_for(dense.config)
    add_zero_biases(dense, adapter)
    with torch.no_grad():
        for layer in adapter.layers(dense):
            adapter.attention(layer).o_proj.bias.normal_(0, 0.1)
            adapter.mlp(layer).down_proj.bias.normal_(0, 0.1)
    units = head_units(family)  # Qwen3, Gemma-3: v/o dims alone (q/k norms run over whole heads)
    plan = grouped_plan(dense, [*units, "attn_kv_group", "mlp_channel"], seed=7)
    for unit in units:
        plan.keep[unit].pop(0)  # layer 0 keeps stock attention
    masked, sliced = masked_and_sliced(dense, plan)
    out = tmp_path / "model"
    save_model(sliced, adapter, tokenizer, out)
    cfg = json.loads((out / "config.json").read_text())
    name = f"Pruned{adapter.prefix}"
    assert cfg["auto_map"] == {
        "AutoConfig": f"modeling_prunekit.{name}Config",
        "AutoModel": f"modeling_prunekit.{name}Model",
        "AutoModelForCausalLM": f"modeling_prunekit.{name}ForCausalLM",
    }
    ids = tokenizer("def f(x):\n    return x + 1", return_tensors="pt")["input_ids"]
    got, where = load_without_prunekit(out, tmp_path, ids)
    assert where.startswith("transformers_modules.") and where.endswith(f"{name}ForCausalLM"), where
    assert (got["logits"] - logits(masked, ids)).abs().max().item() <= 1e-5
    with torch.no_grad():
        expected = masked.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got["tokens"], expected)


def test_modeling_file_is_written_again_by_a_remote_save(tmp_path, tokenizer) -> None:
    """A directory saved by the remote classes (no prunekit) holds the same modeling file and config."""
    dense = tiny_family("llama", True, len(tokenizer))
    adapter = adapter_for(dense.config)
    plan = grouped_plan(dense, ["attn_kv_group", "mlp_channel"], seed=3)
    _, sliced = masked_and_sliced(dense, plan)
    save_model(sliced, adapter, tokenizer, tmp_path / "a")
    script = WITHOUT_PRUNEKIT.replace(
        "save_file(", "model.save_pretrained(sys.argv[4]); save_file("
    )  # the remote model saves itself
    (tmp_path / "ids.txt").write_text("1 2 3")
    env = os.environ | {"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    args = [str(tmp_path / "a"), str(tmp_path / "ids.txt"), str(tmp_path / "o.st"), str(tmp_path / "b")]
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = (tmp_path / d / REMOTE_CODE_FILE for d in ("a", "b"))
    assert second.read_text() == first.read_text()
    cfg_a, cfg_b = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("a", "b"))
    assert cfg_b["auto_map"] == cfg_a["auto_map"] and cfg_b["layer_sizes"] == cfg_a["layer_sizes"]


# Stock transformers without prunekit, stdin closed (a prompt would read EOF and fail): the tokenizer and the config
# of a pruned directory load as any other's, with no question about custom code.
TOKENIZER_WITHOUT_PRUNEKIT = WITHOUT_PRUNEKIT.split("import torch")[0] + textwrap.dedent(
    """
    from transformers import AutoConfig, AutoTokenizer
    directory = sys.argv[1]
    tok = AutoTokenizer.from_pretrained(directory)
    config = AutoConfig.from_pretrained(directory)
    print(type(config).__name__, len(tok("def f(x):")["input_ids"]))
    """
)


def test_pruned_directorys_tokenizer_and_config_load_without_a_custom_code_prompt(tmp_path, tokenizer) -> None:
    dense = tiny_family("llama", False, len(tokenizer))
    adapter = adapter_for(dense.config)
    plan = grouped_plan(dense, ["attn_kv_group", "mlp_channel"], seed=3)
    _, sliced = masked_and_sliced(dense, plan)
    save_model(sliced, adapter, tokenizer, tmp_path / "m")
    env = os.environ | {"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", TOKENIZER_WITHOUT_PRUNEKIT, str(tmp_path / "m")],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["LlamaConfig", str(len(tokenizer("def f(x):")["input_ids"]))]
    assert "custom code" not in proc.stderr and "model of type" not in proc.stderr, proc.stderr


def test_a_directory_saved_with_the_earlier_prunekit_model_type_still_loads(tmp_path, tokenizer) -> None:
    """Directories written when a pruned config said ``model_type: prunekit_<family>`` load with prunekit's classes."""
    dense = tiny_family("qwen2", False, len(tokenizer))
    adapter = adapter_for(dense.config)
    plan = grouped_plan(dense, ["attn_kv_group", "mlp_channel"], seed=5)
    masked, sliced = masked_and_sliced(dense, plan)
    save_model(sliced, adapter, tokenizer, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "prunekit_qwen2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_pretrained(tmp_path).eval()
    assert type(loaded) is adapter.pruned[2] and loaded.config.model_type == "qwen2"
    ids = tokenizer("def f(x):", return_tensors="pt")["input_ids"]
    assert (logits(loaded, ids) - logits(masked, ids)).abs().max().item() <= 1e-5


def lm_eval_samples(directory, tmp_path, tag: str) -> dict[int, list[float]]:
    """lm-eval's command line (``lm-eval run --model hf``, prunekit not importable) on the auto_mc task in
    ``tmp_path / "tasks"``: the log-likelihood of every choice, by question."""
    script = WITHOUT_PRUNEKIT.split("import torch")[0] + textwrap.dedent(
        """
        from lm_eval.__main__ import cli_evaluate
        sys.argv = ["lm-eval", "run", *sys.argv[1:]]
        cli_evaluate()
        """
    )
    out = tmp_path / f"lm_eval_{tag}"
    args = ["--model", "hf", "--model_args", f"pretrained={directory},trust_remote_code=True,dtype=float32"]
    args += ["--tasks", "auto_mc", "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "4"]
    args += ["--output_path", str(out), "--log_samples"]
    env = os.environ | {"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (samples,) = out.rglob("samples_auto_mc_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return {r["doc_id"]: [float(resp[0][0]) for resp in r["resps"]] for r in rows}


@pytest.mark.slow
def test_lm_eval_command_line_runs_the_pruned_directory(tmp_path, tokenizer) -> None:
    """``lm-eval run --model hf --model_args pretrained=DIR,trust_remote_code=True`` without prunekit scores
    every choice of every question as it scores the masked dense model saved as a stock directory."""
    from prunekit.evaluation.zeroshot import write_task_yamls

    dense = tiny_family("qwen2", False, len(tokenizer))
    adapter = adapter_for(dense.config)
    plan = grouped_plan(dense, [*HEAD_DIM_UNITS, "attn_kv_group", "mlp_channel"], seed=11)
    masked, sliced = masked_and_sliced(dense, plan)
    save_model(sliced, adapter, tokenizer, tmp_path / "pruned")
    masked.save_pretrained(tmp_path / "masked")
    tokenizer.save_pretrained(tmp_path / "masked")
    words = "the cat sat on a mat while dogs ran over green hills under a blue sky".split()
    rows = [
        {
            "context": " ".join(words[i : i + 6]),
            "choices": [" ".join(words[j : j + 2]) for j in (i + 6, 1, 3)],
            "label": 0,
        }
        for i in range(5)
    ]
    write_task_yamls(tmp_path / "tasks", ["auto_mc"], None, rows)
    pruned, reference = (
        lm_eval_samples(tmp_path / "pruned", tmp_path, "pruned"),
        lm_eval_samples(tmp_path / "masked", tmp_path, "masked"),
    )
    assert sorted(pruned) == list(range(5)) and sorted(reference) == list(range(5))
    for doc, lls in pruned.items():
        assert lls == pytest.approx(reference[doc], abs=1e-4)


# ---------------------------------------------------------------------------------------------------
# GGUF files, run by llama.cpp itself (llama-cpp-python)

PROMPT = [5, 7, 9, 11, 3, 40, 50, 60, 70, 80, 90, 100]


def gguf_model(family: str, vocab: int, hidden: int = 64, intermediate: int = 128, **overrides):
    """A random model of ``family`` whose widths are multiples of llama.cpp's block of 32 (head_dim 8, GQA 8:4;
    Gemma-3 with sliding and full layers and its own attention scale: tests/test_families.py)."""
    from test_families import family_config

    torch.manual_seed(0)
    _, causal_cls = ADAPTERS.get(family).stock_classes
    sizes = {"hidden_size": hidden, "intermediate_size": intermediate, "vocab_size": vocab}
    if family == "mistral":  # llama.cpp's llama graph has no sliding window (its refusal is tested below)
        sizes["sliding_window"] = None
    model = causal_cls(family_config(family, **sizes | overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


class LlamaCpp:
    """A GGUF file in llama.cpp: float32 KV cache (so only the weights' types round), one thread."""

    def __init__(self, path) -> None:
        self.llm = open_gguf(path, n_ctx=64, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)

    def logits(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(ids)
        return torch.tensor(self.llm.scores[: len(ids)])

    def greedy(self, ids: list[int], n: int) -> list[int]:
        out = list(ids)
        for _ in range(n):
            out.append(int(self.logits(out)[-1].argmax()))
        return out[len(ids) :]

    def close(self) -> None:
        self.llm.close()


def greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def pruned(family: str, tokenizer, seed: int = 5):
    """A pruned model whose layers keep different KV groups and MLP channels (multiples of 32 channels)."""
    dense = gguf_model(family, len(tokenizer))
    adapter = adapter_for(dense.config)
    plan = grouped_plan(dense, ["attn_kv_group", "mlp_channel"], seed=seed)
    gen = torch.Generator().manual_seed(seed)
    keep = [torch.randperm(4, generator=gen)[:n].sort().values.tolist() for n in (4, 2, 2)]
    plan.keep["attn_kv_group"] = dict(enumerate(keep))  # o_proj keeps 64, 32, 32 inputs
    plan.keep["mlp_channel"] = {
        i: sorted(torch.randperm(128, generator=gen)[: 32 * (i + 1)].tolist()) for i in range(3)
    }  # 32, 64, 96 of 128 channels
    return masked_and_sliced(dense, plan), adapter


@pytest.fixture(scope="module")
def bpe_tokenizer():
    from conftest import tiny_tokenizer

    return tiny_tokenizer(300)  # every byte plus merges: llama.cpp's gpt2 tokenizer needs merges


LAYOUTS = [(f, "uniform") for f in ADAPTERS.names()]
LAYOUTS += [(f, "per_layer") for f in ADAPTERS.names() if ADAPTERS.get(f).llama_cpp_per_layer_arch]


def run_in_llama_cpp(model, adapter, path, kind: str, tol: float, tokenizer_dir) -> dict:
    """Write ``model`` in type ``kind`` and check llama.cpp's logits and 16 greedy tokens against the model with
    its weights rounded as the file holds them; returns the writer's summary."""
    from prunekit.export.gguf import write_gguf
    from prunekit.export.tensor_types import TensorTypes
    from prunekit.quant.gguf_types import fake_quantize

    summary = write_gguf(model, adapter, path, TensorTypes(default=kind), name="t", hf_dir=tokenizer_dir)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            if p.dim() == 2:
                p.copy_(fake_quantize(p, kind))
    cpp = LlamaCpp(path)
    try:
        diff = (cpp.logits(PROMPT) - logits(reference, torch.tensor([PROMPT]))[0]).abs().max().item()
        assert diff <= tol, (kind, diff)
        assert cpp.greedy(PROMPT, 16) == greedy(reference, PROMPT, 16)
    finally:
        cpp.close()
    return summary


@pytest.mark.parametrize(("family", "layout"), LAYOUTS)
def test_gguf_f32_and_f16_match_transformers(family: str, layout: str, tmp_path, bpe_tokenizer) -> None:
    """llama.cpp runs the exported file as transformers runs the model: F32 to 1e-4 (Gemma-3, whose embedding is
    scaled by sqrt(hidden), 5e-4) and F16 (against the model with float16-rounded weights) to 2e-3 max abs logit
    difference (llama.cpp's F16 dot products round the activations to float16 too), and the same 16 greedy
    tokens. Uniform widths go to the family's llama.cpp architecture, per-layer widths to the one it declares
    for them."""
    if layout == "uniform":
        model = gguf_model(family, len(bpe_tokenizer))
        adapter = adapter_for(model.config)
    else:
        (_, model), adapter = pruned(family, bpe_tokenizer)
    save_model(model, adapter, bpe_tokenizer, tmp_path / "hf")
    declared = ADAPTERS.get(family)
    expected = declared.llama_cpp_arch if layout == "uniform" else declared.llama_cpp_per_layer_arch
    for kind, tol in (("F32", 5e-4 if family == "gemma3" else 1e-4), ("F16", 2e-3)):
        summary = run_in_llama_cpp(model, adapter, tmp_path / f"{kind}.gguf", kind, tol, tmp_path / "hf")
        assert summary["architecture"] == expected


# The unit types a llama.cpp file can hold (head dims cannot: one key / value width per model).
EXPORTED_UNITS = ["attn_kv_group", "attn_query_head", "mlp_channel", "layer", "hidden_channel"]


def uniform_cut(model, unit: str, seed: int = 3):
    """The same number of ``unit`` kept in every layer (random ones): widths llama.cpp's uniform graphs hold."""
    from test_pruning import random_plan

    adapter = adapter_for(model.config)
    counts = {"attn_kv_group": 2, "attn_query_head": 4, "mlp_channel": 64, "hidden_channel": 48}
    if unit == "layer":
        plan = random_plan(model, ["layer"], seed=seed, counts={0: 1, 2: 1})  # layer 1 goes
    elif unit == "hidden_channel":
        gen = torch.Generator().manual_seed(seed)
        keep = sorted(torch.randperm(64, generator=gen)[:48].tolist())  # a multiple of the 8 heads
        plan = grouped_plan(model, ["mlp_channel"], seed=seed, per_group={"mlp_channel": [128] * 3})
        plan.keep = {"hidden_channel": {0: keep}}
    else:
        n = len(adapter.layers(model))
        groups = UNITS.get(unit).groups(adapter, adapter.layers(model)[0])
        plan = grouped_plan(model, [unit], seed=seed, per_group={unit: [counts[unit] // groups] * n})
    return masked_and_sliced(model, plan)[1]


@pytest.mark.parametrize(
    ("family", "unit"),
    [(f, u) for f in ADAPTERS.names() for u in EXPORTED_UNITS if u not in ADAPTERS.get(f).refused_units],
)
def test_gguf_of_each_unit_type_runs_in_llama_cpp(family: str, unit: str, tmp_path, bpe_tokenizer) -> None:
    """A uniform cut of every layer by each unit type the family declares: llama.cpp's logits (F32) and greedy
    tokens are the pruned model's, in the family's own llama.cpp architecture (Qwen2 whose query heads no longer
    span the hidden size: deci, which llama.cpp's qwen2 graph needs)."""
    model = uniform_cut(gguf_model(family, len(bpe_tokenizer)), unit)
    adapter = adapter_for(model.config)
    save_model(model, adapter, bpe_tokenizer, tmp_path / "hf")
    summary = run_in_llama_cpp(model, adapter, tmp_path / "m.gguf", "F32", 5e-4, tmp_path / "hf")
    sizes = adapter.layer_sizes(model, 0)
    qwen2_misfit = family == "qwen2" and sizes.num_attention_heads * 8 != model.config.hidden_size
    declared = ADAPTERS.get(family)
    assert summary["architecture"] == (declared.llama_cpp_per_layer_arch if qwen2_misfit else declared.llama_cpp_arch)


@pytest.mark.parametrize("amx", [True, False])
def test_llama_cpp_repacks_weights_except_where_it_multiplies_with_amx(amx: bool, tmp_path, bpe_tokenizer,
                                                                       monkeypatch) -> None:  # fmt: skip
    """open_gguf turns llama.cpp's weight repacking off where its AMX matrix multiplication would run (it crashes
    there on small pruned models' quantized tensors), leaves it on elsewhere, and restores llama-cpp-python's
    default model parameters after."""
    import llama_cpp.llama_cpp as api

    import prunekit.export.llamacpp as llamacpp
    from prunekit.export.gguf import write_gguf
    from prunekit.export.tensor_types import TensorTypes

    model = gguf_model("llama", len(bpe_tokenizer))
    adapter = adapter_for(model.config)
    save_model(model, adapter, bpe_tokenizer, tmp_path / "hf")
    write_gguf(model, adapter, tmp_path / "m.gguf", TensorTypes(default="F32"), name="t", hf_dir=tmp_path / "hf")
    monkeypatch.setattr(llamacpp, "amx", lambda: amx)
    llm = llamacpp.open_gguf(tmp_path / "m.gguf", n_ctx=16, verbose=False, n_threads=1)
    try:
        assert llm.model_params.use_extra_bufts is (not amx)
    finally:
        llm.close()
    assert api.llama_model_default_params().use_extra_bufts is True


@pytest.mark.parametrize("family", [f for f in ADAPTERS.names() if not ADAPTERS.get(f).llama_cpp_per_layer_arch])
def test_gguf_per_layer_widths_are_refused_where_llama_cpp_reads_one_width(family: str, tmp_path, bpe_tokenizer):
    """Qwen3's and Gemma-3's llama.cpp graphs read one head count and FFN width for all layers: a model whose
    layers differ is refused with one line naming what to set instead, and no file is left."""
    from prunekit.export.gguf import write_gguf
    from prunekit.export.tensor_types import TensorTypes

    (_, model), adapter = pruned(family, bpe_tokenizer)
    with pytest.raises(PrunekitError) as err:
        write_gguf(model, adapter, tmp_path / "m.gguf", TensorTypes(default="F32"), name="t", hf_dir=None)
    (line,) = str(err.value).splitlines()
    assert f"llama.cpp's {declared_arch(family)} graph reads one head count and FFN width for every layer" in line
    assert f"this model cannot be written as {declared_arch(family)}: its layers keep different widths" in line
    assert line.endswith(
        "Set a uniform cut of all layers (prune.skip_first: 0, prune.skip_last: 0, prune.allocation: uniform)"
    )
    assert list(tmp_path.iterdir()) == []


def declared_arch(family: str) -> str:
    return ADAPTERS.get(family).llama_cpp_arch


def llama_cpp_against_fake_quantized(model, adapter, tensors: dict[str, str], embedding: str, output: str, tmp_path):
    """Write ``model`` with these types (Q8_0 elsewhere) and run it in llama.cpp: (the writer's summary, max abs
    difference of llama.cpp's logits from the fake-quantized model's, max abs effect of the quantization on the
    logits). The reference rounds each weight by the type this mapping gives it, not by the writer's lookup."""
    from prunekit.export.gguf import write_gguf
    from prunekit.export.tensor_types import TensorTypes
    from prunekit.quant.gguf_types import fake_quantize

    types = TensorTypes(default="Q8_0", embedding=embedding, output=output, tensors=tensors)
    summary = write_gguf(model, adapter, tmp_path / "m.gguf", types, name="t", hf_dir=tmp_path / "hf")
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if p.dim() == 2:
                module = name.rsplit(".", 1)[0]
                kind = {"model.embed_tokens": embedding, "lm_head": output}.get(module) or tensors.get(module, "Q8_0")
                p.copy_(fake_quantize(p, kind))
    ids = torch.tensor([PROMPT])
    cpp = LlamaCpp(tmp_path / "m.gguf")
    try:
        got = cpp.logits(PROMPT)
    finally:
        cpp.close()
    effect = (logits(reference, ids)[0] - logits(model, ids)[0]).abs().max().item()
    return summary, (got - logits(reference, ids)[0]).abs().max().item(), effect


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_mixed_block_types_reproduce_the_fake_quantized_model(family: str, tmp_path, bpe_tokenizer) -> None:
    """Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 weights, per tensor, embedding and head included: llama.cpp's logits sit
    within 15% of the quantization's own effect of the fake-quantized model's (the remainder: llama.cpp rounds
    activations to 8 bits in its block dot products), and at most 0.02 away."""

    (_, model), adapter = pruned(family, bpe_tokenizer, seed=2)
    save_model(model, adapter, bpe_tokenizer, tmp_path / "hf")
    tensors = {
        "model.layers.0.mlp.up_proj": "Q4_1",
        "model.layers.1.mlp.down_proj": "Q4_0",
        "model.layers.1.self_attn.v_proj": "Q5_0",
        "model.layers.2.self_attn.q_proj": "Q4_0",
        "model.layers.2.mlp.gate_proj": "Q5_1",
    }
    summary, diff, effect = llama_cpp_against_fake_quantized(model, adapter, tensors, "Q8_0", "Q4_0", tmp_path)
    assert summary["tensor_types"]["Q4_0"] == 3 and summary["tensor_types"]["Q5_1"] == 1
    assert diff <= min(0.15 * effect, 0.02), (diff, effect)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_k_quants_from_llama_cpps_quantizer_reproduce_the_fake_quantized_model(
    family: str, tmp_path, bpe_tokenizer
) -> None:
    """Q2_K .. Q6_K (llama.cpp's quantizer), mixed with Q8_0, per tensor, embedding and head included, on a model
    whose hidden and MLP widths are multiples of 256 (hidden 256, MLP 512, layer 1 cut to 256 channels: per-layer
    widths; o_proj, 64 inputs, stays Q8_0):
    llama.cpp's logits sit within 15% of the quantization's own effect of the fake-quantized model's (llama.cpp
    rounds activations to 8 bits in its K-quant dot products)."""

    dense = gguf_model(family, len(bpe_tokenizer), hidden=256, intermediate=512)
    adapter = adapter_for(dense.config)
    _, model = masked_and_sliced(dense, grouped_plan(dense, ["mlp_channel"], 4, {"mlp_channel": [512, 256, 512]}))
    save_model(model, adapter, bpe_tokenizer, tmp_path / "hf")
    tensors = {
        "model.layers.0.mlp.up_proj": "Q4_K",
        "model.layers.0.self_attn.q_proj": "Q2_K",
        "model.layers.1.mlp.down_proj": "Q6_K",  # 256 inputs after the cut
        "model.layers.1.self_attn.v_proj": "Q3_K",
        "model.layers.2.mlp.gate_proj": "Q5_K",
        "model.layers.2.self_attn.k_proj": "Q4_K",
    }
    summary, diff, effect = llama_cpp_against_fake_quantized(model, adapter, tensors, "Q6_K", "Q4_K", tmp_path)
    assert summary["architecture"] == "deci"
    assert summary["tensor_types"]["Q4_K"] == 2 + (not model.config.tie_word_embeddings)
    assert diff <= 0.15 * effect, (diff, effect)


def test_k_quants_refused_without_llama_cpp_or_on_widths_not_of_256(tmp_path, bpe_tokenizer, monkeypatch) -> None:
    """A K-quant needs llama.cpp's quantizer and input widths of 256k: params naming one without llama-cpp-python,
    and a 64-wide weight, are refused in one line each, before anything is written."""
    import importlib.util

    from prunekit.errors import PrunekitError
    from prunekit.export.gguf import write_gguf
    from prunekit.export.tensor_types import TensorTypes
    from prunekit.pipeline.params import parse_params
    from prunekit.pipeline.validation import check_choices
    from prunekit.quant import gguf_types

    model = gguf_model("llama", len(bpe_tokenizer))
    adapter = adapter_for(model.config)
    save_model(model, adapter, bpe_tokenizer, tmp_path / "hf")
    out = tmp_path / "m.gguf"
    with pytest.raises(PrunekitError, match="64 input columns, not a multiple of Q4_K's block of 256"):
        write_gguf(model, adapter, out, TensorTypes(default="Q4_K"), name="t", hf_dir=tmp_path / "hf")
    assert not out.exists()
    check_choices(parse_params({"export": {"types": "q4_k"}, "search": {"choices": ["q4_k", "q6_k"]}}))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llama_cpp" else find_spec(n, *a))
    gguf_types._quantize_chunk.cache_clear()
    try:
        with pytest.raises(PrunekitError) as e:
            check_choices(parse_params({"export": {"types": "q4_k"}, "search": {"choices": ["q4_0", "q6_k"]}}))
    finally:
        monkeypatch.undo()
        gguf_types._quantize_chunk.cache_clear()
    lines = str(e.value).splitlines()
    assert any("'export.types'" in line and "llama-cpp-python" in line for line in lines), lines
    assert any("'search.choices[1]'" in line and "llama-cpp-python" in line for line in lines), lines
    assert not any("search.choices[0]" in line for line in lines)


def test_gguf_tokenizer_built_from_tokenizer_json_tokenizes_as_transformers(tmp_path, bpe_tokenizer) -> None:
    from prunekit.export.gguf import write_gguf
    from prunekit.export.tensor_types import TensorTypes

    model = gguf_model("llama", len(bpe_tokenizer))
    adapter = adapter_for(model.config)
    save_model(model, adapter, bpe_tokenizer, tmp_path / "hf")
    write_gguf(model, adapter, tmp_path / "m.gguf", TensorTypes(default="F16"), name="t", hf_dir=tmp_path / "hf")
    cpp = LlamaCpp(tmp_path / "m.gguf")
    try:
        for text in ("def f(x):\n    return x + 1", "The  quick brown fox, 123 times!", "éàü ünïcode"):
            assert cpp.llm.tokenize(text.encode(), add_bos=False) == bpe_tokenizer(text)["input_ids"]
    finally:
        cpp.close()


def test_gguf_tokenizer_fields_are_copied_from_a_tokenizer_gguf(tmp_path, bpe_tokenizer) -> None:
    """A model converted from a GGUF file carries that file's tokenizer fields (``tokenizer.gguf``); the export
    copies them unchanged."""
    import gguf

    from prunekit.export.gguf import write_gguf
    from prunekit.export.tensor_types import TensorTypes
    from prunekit.export.tokenizer import write_tokenizer_gguf

    model = gguf_model("llama", len(bpe_tokenizer))
    adapter = adapter_for(model.config)
    save_model(model, adapter, bpe_tokenizer, tmp_path / "hf")
    write_gguf(model, adapter, tmp_path / "a.gguf", TensorTypes(default="F16"), name="t", hf_dir=tmp_path / "hf")
    assert write_tokenizer_gguf(tmp_path / "a.gguf", tmp_path / "tokenizer.gguf", "llama") >= 5
    write_gguf(model, adapter, tmp_path / "b.gguf", TensorTypes(default="F16"), name="t",
               tokenizer_gguf=tmp_path / "tokenizer.gguf")  # fmt: skip

    def fields(path):
        reader = gguf.GGUFReader(path)
        return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}

    assert fields(tmp_path / "b.gguf") == fields(tmp_path / "a.gguf")
    assert fields(tmp_path / "tokenizer.gguf") == fields(tmp_path / "a.gguf")


def test_gguf_refusals_leave_no_file(tmp_path, bpe_tokenizer) -> None:
    from prunekit.errors import PrunekitError
    from prunekit.export.gguf import write_gguf
    from prunekit.export.tensor_types import TensorTypes

    model = gguf_model("llama", len(bpe_tokenizer))
    adapter = adapter_for(model.config)
    save_model(model, adapter, bpe_tokenizer, tmp_path / "hf")
    out = tmp_path / "out" / "m.gguf"

    def refused(m, types, match: str) -> None:
        with pytest.raises(PrunekitError, match=match):
            write_gguf(m, adapter, out, types, name="t", hf_dir=tmp_path / "hf")
        assert not out.exists() and not any(out.parent.glob(".*tmp*"))

    refused(model, TensorTypes(default="Q3_X"), "GGUF type of default 'Q3_X'.*Q4_0")
    refused(model, TensorTypes(default="F16", tensors={"model.layers.0.mlp.up_proj": "q9"}), "mlp.up_proj 'q9'")
    (_, sliced), _ = pruned("llama", bpe_tokenizer)
    odd = copy.deepcopy(sliced)
    plan = grouped_plan(odd, ["mlp_channel"], seed=1, per_group={"mlp_channel": [5, 9, 17]})
    _, odd = masked_and_sliced(odd, plan)
    refused(odd, TensorTypes(default="Q4_0"), "input columns, not a multiple of Q4_0's block of 32.*prune.round_to")
    head_dims = grouped_plan(model, HEAD_DIM_UNITS, seed=3)
    _, with_head_dims = masked_and_sliced(model, head_dims)
    refused(with_head_dims, TensorTypes(default="F16"), "head dims are pruned.*attn_qk_dim")


def test_export_command_line(tmp_path, bpe_tokenizer, capsys: pytest.CaptureFixture[str]) -> None:
    """``prunekit export DIR --out F [--plan P]``: the plan's llama.cpp types per module, the rest --type; bad
    inputs exit 2 with one line and leave no file."""
    from prunekit.cli import main
    from prunekit.pipeline.outputs import write_json

    (_, model), adapter = pruned("qwen2", bpe_tokenizer)
    save_model(model, adapter, bpe_tokenizer, tmp_path / "hf")
    plan = {"model.layers.1.mlp.down_proj": "q4_0", "model.layers.2.self_attn.o_proj": "q5_1"}
    settings = {"group_size": 128, "double_quant": True, "int8_threshold": 6.0}
    write_json(tmp_path / "plan.json", {"schemes": plan, "settings": settings})
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "hf"), "--out", str(out), "--plan", str(tmp_path / "plan.json")]) == 0
    assert "deci" in capsys.readouterr().out
    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.1.ffn_down.weight"] == "Q4_0" and types["blk.2.attn_output.weight"] == "Q5_1"
    assert types["blk.0.ffn_down.weight"] == "F16" and types["token_embd.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32"

    bad = tmp_path / "bad.gguf"
    write_json(tmp_path / "rtn.json", {"schemes": {"model.layers.1.mlp.down_proj": "rtn3"}, "settings": settings})
    for args, message in (
        (["--type", "Q9_0"], "'Q9_0' is not one prunekit writes"),
        (["--plan", str(tmp_path / "missing.json")], "missing.json' does not exist"),
        (["--plan", str(tmp_path / "rtn.json")], "scheme 'rtn3', which llama.cpp cannot store"),
        (["--tokenizer-gguf", str(tmp_path / "none.gguf")], "none.gguf' does not exist"),
    ):
        assert main(["export", str(tmp_path / "hf"), "--out", str(bad), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not bad.exists() and not list(tmp_path.glob(".bad.gguf.tmp*"))


@pytest.mark.parametrize("tied", [False, True])
def test_a_plan_with_the_embedding_exports_the_quantized_models_weights(tmp_path, bpe_tokenizer, tied: bool) -> None:
    """A searched plan that types the embedding (and an untied head): the file stores them in the plan's types
    (a tied head is the embedding, written once), and llama.cpp's logits are the quantize stage's realised model's,
    within llama.cpp's 8-bit activation rounding (0.02); export.embedding, when given, overrides the plan's."""
    import gguf

    from prunekit.export.directory import export_directory
    from prunekit.export.tensor_types import choose_types, rounded
    from prunekit.pipeline.outputs import write_json
    from prunekit.quant.plan import quant_targets
    from prunekit.quant.realise import realise
    from prunekit.quant.schemes import QuantSettings

    model = gguf_model("llama", len(bpe_tokenizer))
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    adapter = adapter_for(model.config)
    save_model(model, adapter, bpe_tokenizer, tmp_path / "hf")
    cycle = ["q4_0", "q5_1", "q8_0", "q4_1", "q5_0"]
    targets = quant_targets(model, adapter, embeddings=True)
    plan = {t.name: cycle[i % len(cycle)] for i, t in enumerate(targets)}
    assert plan["model.embed_tokens"] == "q4_0" and (plan.get("lm_head") == "q8_0") is not tied
    write_json(tmp_path / "plan.json", {"schemes": plan, "settings": {"group_size": 128}, "dtype": "float32"})
    types = choose_types("plan", tmp_path / "plan.json", unplanned="F16")
    export_directory(tmp_path / "hf", tmp_path / "m.gguf", types)
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert stored["token_embd.weight"] == "Q4_0" and ("output.weight" in stored) is not tied
    assert tied or stored["output.weight"] == "Q8_0"
    quantized = realise(copy.deepcopy(model), plan, QuantSettings())
    ids = torch.tensor([PROMPT])
    expected = logits(quantized, ids)[0]
    torch.testing.assert_close(logits(rounded(model, types), ids)[0], expected, rtol=0, atol=1e-5)
    cpp = LlamaCpp(tmp_path / "m.gguf")
    try:
        diff = (cpp.logits(PROMPT) - expected).abs().max().item()
    finally:
        cpp.close()
    assert diff <= 0.02, diff
    override = choose_types("plan", tmp_path / "plan.json", unplanned="F16", embedding="Q8_0")
    assert override.kind("model.embed_tokens", "embedding") == "Q8_0"
    assert override.kind("lm_head", "output") == ("Q8_0" if tied else plan["lm_head"].upper())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_qlora_adapters_run_in_llama_cpp_as_a_lora_file(family: str, tmp_path, bpe_tokenizer) -> None:
    """QLoRA adapters trained on the plan's types (every weight, the embedding included), exported as llama.cpp's
    LoRA file beside the model file (``prunekit export --lora``): llama.cpp runs the pair as prunekit runs the
    quantized model with its adapters (0.02 max abs logits, llama.cpp's 8-bit activation rounding), while the
    adapters alone move the logits by more than ten times that."""
    from prunekit.cli import main
    from prunekit.quant.backend import lora_custom_modules
    from prunekit.quant.plan import quant_targets
    from prunekit.quant.realise import realise
    from prunekit.quant.saving import load_quantized, save_quantized
    from prunekit.quant.schemes import QuantSettings
    from prunekit.training.lora import LoraSettings, train_lora

    (_, model), adapter = pruned(family, bpe_tokenizer)
    save_model(model, adapter, bpe_tokenizer, tmp_path / "hf")
    targets = quant_targets(model, adapter, embeddings=True)
    plan = {t.name: ("q8_0" if i % 2 else "q5_0") for i, t in enumerate(targets)}
    quantized = realise(copy.deepcopy(model), plan, QuantSettings())
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = LoraSettings(rank=4, alpha=8, dropout=0.0, target_modules=modules, learning_rate=3e-2, batch_size=2,
                       steps=4, warmup_steps=0, weight_decay=0.0, seed=0)  # fmt: skip
    blocks = torch.randint(0, len(bpe_tokenizer), (8, 16), generator=torch.Generator().manual_seed(1))
    peft_model, _ = train_lora(quantized, blocks, cfg, merge=False, custom_modules=lora_custom_modules())
    save_quantized(quantized, bpe_tokenizer, plan, QuantSettings(), "float32", tmp_path / "q", peft_model=peft_model)
    out, lora = tmp_path / "m.gguf", tmp_path / "m.lora.gguf"
    assert main(["export", str(tmp_path / "hf"), "--out", str(out), "--plan", str(tmp_path / "q"),
                 "--lora", str(tmp_path / "q")]) == 0  # fmt: skip
    loaded, _, _ = load_quantized(tmp_path / "q")
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = loaded(input_ids=ids).logits[0]
        with loaded.disable_adapter():
            without = loaded(input_ids=ids).logits[0]
    llm = open_gguf(out, lora_path=str(lora), n_ctx=64, logits_all=True, verbose=False, n_threads=1, type_k=0,
                    type_v=0)  # fmt: skip
    try:
        llm.eval(PROMPT)
        got = torch.tensor(llm.scores[: len(PROMPT)])
    finally:
        llm.close()
    diff, effect = (got - expected).abs().max().item(), (expected - without).abs().max().item()
    print(f"{family}: llama.cpp with the LoRA file vs prunekit with adapters {diff:.4f}; adapters' effect {effect:.3f}")
    assert diff <= 0.02 and effect > 0.2, (diff, effect)


def test_lora_file_refusals_leave_no_file(tmp_path, bpe_tokenizer) -> None:
    """Adapters of another model, DoRA, or a directory that is not an adapter: one clear error, no file."""
    from prunekit.errors import PrunekitError
    from prunekit.export.directory import export_directory
    from prunekit.export.lora import read_lora
    from prunekit.export.tensor_types import TensorTypes
    from prunekit.training.lora import LoraSettings, attach_lora

    (_, model), adapter = pruned("llama", bpe_tokenizer)
    save_model(model, adapter, bpe_tokenizer, tmp_path / "hf")
    other = gguf_model("llama", len(bpe_tokenizer))  # dense widths: its adapters do not fit the pruned weights
    cfg = LoraSettings(rank=2, alpha=4, dropout=0.0, target_modules=["up_proj"], learning_rate=1e-3, batch_size=1,
                       steps=0, warmup_steps=0, weight_decay=0.0, seed=0)  # fmt: skip
    attach_lora(other, cfg).save_pretrained(tmp_path / "other")
    out, lora = tmp_path / "out" / "m.gguf", tmp_path / "out" / "a.gguf"

    def refused(directory, match: str) -> None:
        with pytest.raises(PrunekitError, match=match):
            export_directory(tmp_path / "hf", out, TensorTypes(), lora=directory, lora_out=lora)
        assert not out.exists() and not lora.exists()

    refused(tmp_path / "other", "adapter of 'model.layers.0.mlp.up_proj' .* does not fit the model's weights")
    refused(tmp_path / "hf", "has no adapter_config.json: not a LoRA adapter directory")
    config = json.loads((tmp_path / "other" / "adapter_config.json").read_text())
    (tmp_path / "other" / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(PrunekitError, match="no DoRA"):
        read_lora(tmp_path / "other")
