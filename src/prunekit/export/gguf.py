"""GGUF files for llama.cpp, written with llama.cpp's own ``gguf`` package.

Architecture: a model whose decoder layers all keep the same widths is written as its family's llama.cpp
architecture (``llama`` for Llama and Mistral, ``qwen2`` for Qwen2 while its query heads span the embedding
width, as llama.cpp's qwen2 graph assumes); one whose layers differ is written as
``deci``, llama.cpp's Llama variant with per-layer ``feed_forward_length``, ``attention.head_count`` and
``attention.head_count_kv`` arrays (Nemotron-NAS), which also reads the optional q/k/v, o_proj and down_proj
biases Qwen2 and bias compensation need. ``llama`` and ``deci`` rotate consecutive pairs of a head's dims, so
the rows of q_proj and k_proj (and their biases) are permuted from transformers' two halves to pairs; ``qwen2``
rotates halves, as transformers does.

Tensor types: every 2-D weight gets the type the caller gives it (by module name), else the default; norms
and biases stay F32. The types are llama.cpp's: ``F32``, ``F16``, ``BF16``, the block formats ``Q4_0``,
``Q4_1``, ``Q5_0``, ``Q5_1``, ``Q8_0`` (32 weights per block: a weight's input width must be a multiple of
32), encoded by the ``gguf`` package, and the K-quants ``Q2_K``, ``Q3_K``, ``Q4_K``, ``Q5_K``, ``Q6_K`` (super-blocks
of 256 weights: the input width must be a multiple of 256), encoded by llama.cpp's own quantizer
(``ggml_quantize_chunk`` of the libggml that llama-cpp-python builds, without an importance matrix, as
``llama-quantize`` without ``--imatrix``); the ``gguf`` package has no K-quant encoder. :func:`fake_quantize` is
the same rounding the writer uses (the encoder, then the ``gguf`` package's decoder), for a search that must
optimise the loss of the file it writes.

Tokenizer: the ``tokenizer.*`` fields of the GGUF file the model came from (``tokenizer.gguf`` beside the base
model, written by the download stage), copied as they are; otherwise built from the Hugging Face tokenizer
(byte-level BPE as ``gpt2``, with its merges, special tokens and chat template; llama.cpp's default
pre-tokenizer unless ``tokenizer_pre`` names one).

QLoRA adapters: :func:`write_lora_gguf` writes peft's LoRA adapters (the ``quantize`` stage's, trained on the
base in the plan's types) as llama.cpp's LoRA adapter file (``general.type`` adapter, ``adapter.lora.alpha``, a
``.lora_a`` / ``.lora_b`` pair per adapted weight, q/k ``B`` rows permuted as their weights are), which llama.cpp
applies at run time beside the model file (``--lora``); nothing is merged, so the base keeps its quantized blocks.

Not exported (a clear error names the cause): pruned head dims (llama.cpp has one key / value width per model,
equal to the rotary width, and rotates the first frequencies, not kept ones), a sliding window shorter than
the context, rope scaling other than ``default`` and ``llama3``.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.modeling import HeadDimAttention
from prunekit.pipeline.files import atomic_file

log = logging.getLogger(__name__)

TOKENIZER_GGUF = "tokenizer.gguf"  # the base GGUF's tokenizer fields, beside a model converted from one
PAIR_ROPE_ARCHS = ("llama", "deci")  # llama.cpp archs whose rope rotates consecutive dims (the others: halves)
FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # encoded by llama.cpp's quantizer (llama-cpp-python)
TYPES = (*FLOAT_TYPES, *BLOCK_TYPES, *K_TYPES)
# general.file_type of a file whose weights are mostly one K-quant (llama.cpp names its mixes by the main type)
K_FILE_TYPES = {"Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M",
                "Q6_K": "MOSTLY_Q6_K"}  # fmt: skip


@dataclass(frozen=True)
class TensorTypes:
    """Which llama.cpp type each weight gets: ``tensors`` by module name (``model.layers.3.mlp.down_proj``,
    ``model.embed_tokens``, ``lm_head``), every other weight ``default``; ``embedding`` and ``output``, where given,
    override the token embedding's and an untied output head's (an output head the others leave open takes the
    embedding's type); norms and biases are F32."""

    default: str = "F16"
    embedding: str | None = None
    output: str | None = None
    tensors: Mapping[str, str] = field(default_factory=dict)

    def kind(self, module: str, role: str = "weight") -> str:
        """The type of ``module``'s 2-D weight, upper case; ``role``: ``embedding``, ``output`` or ``weight``."""
        if role == "embedding":
            return (self.embedding or self.tensors.get(module) or self.default).upper()
        if role == "output":
            return (self.output or self.tensors.get(module) or self.embedding or self.default).upper()
        return self.tensors.get(module, self.default).upper()

    def check(self) -> None:
        for what, name in (("default", self.default), ("embedding", self.embedding), ("output", self.output)):
            if name is not None:
                check_encoder(name, f"GGUF type of {what}")
        for module, name in self.tensors.items():
            check_encoder(name, f"GGUF type of {module}")


def qtype(name: str, what: str = "GGUF type") -> Any:
    """The ``gguf.GGMLQuantizationType`` named ``name`` (case-insensitive), or an error listing the valid ones."""
    import gguf

    upper = str(name).upper()
    if upper not in TYPES:
        raise PrunekitError(f"{what} '{name}' is not one prunekit writes; choose one of {', '.join(TYPES)}")
    return gguf.GGMLQuantizationType[upper]


def block_size(name: str) -> int:
    """Weights per block of a type (1 for the float types)."""
    import gguf

    return int(gguf.GGML_QUANT_SIZES[qtype(name)][0])


def type_bytes(name: str, rows: int, cols: int) -> int:
    """Bytes a (rows x cols) weight takes in type ``name`` (``cols`` a multiple of its block)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype(name)]
    return rows * (cols // block) * size


def check_fits(name: str, cols: int, what: str) -> None:
    """Refuse a block type for a weight whose input width is not a multiple of its block."""
    block = block_size(name)
    if cols % block:
        raise PrunekitError(
            f"{what} has {cols} input columns, not a multiple of {name.upper()}'s block of {block}: give it a "
            f"float type, or prune to widths that are multiples of {block} (prune.round_to)"
        )


@functools.cache
def _quantize_chunk() -> Any:
    """``ggml_quantize_chunk`` of llama.cpp's libggml-base, as llama-cpp-python ships it; or the error that says
    how to get it."""
    import ctypes
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    lib = None
    if spec is not None and spec.submodule_search_locations:
        found = sorted(Path(spec.submodule_search_locations[0], "lib").glob("libggml-base.*"))
        lib = found[0] if found else None
    if lib is None:
        raise PrunekitError(
            f"the K-quants ({', '.join(K_TYPES)}) are encoded by llama.cpp's own quantizer, which comes with "
            "llama-cpp-python: install it with pip install -e '.[llamacpp]' (scripts/setup.sh does), or choose "
            f"one of {', '.join(FLOAT_TYPES + BLOCK_TYPES)}"
        )
    ggml = ctypes.CDLL(str(lib))
    fn = ggml.ggml_quantize_chunk
    # size_t ggml_quantize_chunk(enum ggml_type, const float * src, void * dst, int64_t start, int64_t nrows,
    #                            int64_t n_per_row, const float * imatrix)
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    return fn


def check_encoder(name: str, what: str = "GGUF type") -> None:
    """Refuse a type whose encoder is not installed (the K-quants need llama-cpp-python), before any work."""
    qtype(name, what)
    if name.upper() in K_TYPES:
        _quantize_chunk()


def _llama_cpp_encode(data: np.ndarray, name: str) -> np.ndarray:
    """(rows, bytes per row) blocks of a float32 (rows, cols) array from llama.cpp's ``ggml_quantize_chunk``."""
    import ctypes

    rows, cols = data.shape
    check_fits(name, cols, f"a {rows} x {cols} weight")
    src = np.ascontiguousarray(data, dtype=np.float32)
    out = np.zeros((rows, type_bytes(name, 1, cols)), dtype=np.uint8)
    written = _quantize_chunk()(int(qtype(name)), src.ctypes.data_as(ctypes.c_void_p),
                              out.ctypes.data_as(ctypes.c_void_p), 0, rows, cols, None)  # fmt: skip
    if written != out.nbytes:
        raise PrunekitError(
            f"llama.cpp's quantizer wrote {written} bytes for a {rows} x {cols} {name}, not {out.nbytes}"
        )
    return out


def encode(w: torch.Tensor, name: str) -> np.ndarray:
    """The bytes (or float array) of a 2-D weight in type ``name``, as the writer stores them."""
    import gguf

    t = qtype(name)
    data = w.detach().to(torch.float32).cpu().numpy()
    if name.upper() == "F32":
        return data
    if name.upper() == "F16":
        return data.astype(np.float16)
    if name.upper() in K_TYPES:
        return _llama_cpp_encode(data, name.upper())
    return gguf.quants.quantize(data, t)


def decode(blocks: np.ndarray, name: str) -> torch.Tensor:
    """float32 weights (flat) of a block type's stored bytes, decoded by the ``gguf`` package."""
    import gguf

    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(blocks, qtype(name)), dtype=np.float32))


def fake_quantize(w: torch.Tensor, name: str) -> torch.Tensor:
    """``w`` after the writer's rounding to type ``name`` and back (same shape, dtype and device)."""
    if name.upper() == "F32":
        return w.clone()
    if name.upper() == "F16":
        return w.to(torch.float16).to(w.dtype)
    return decode(encode(w, name), name).reshape(w.shape).to(device=w.device, dtype=w.dtype)


def rounded(model: nn.Module, types: TensorTypes) -> nn.Module:
    """A copy of ``model`` whose 2-D weights are rounded as a file of these types stores them: the float model
    that computes what the file computes, up to the runtime's own arithmetic."""
    out = copy.deepcopy(model)
    embedding, output = out.get_input_embeddings().weight, out.get_output_embeddings().weight
    done: set[int] = set()
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.dim() != 2 or id(p) in done:
                continue
            role = "embedding" if p is embedding else "output" if p is output else "weight"
            p.copy_(fake_quantize(p, types.kind(name.rsplit(".", 1)[0], role)))
            done.add(id(p))
    return out


def check_exportable(model: nn.Module, adapter: ModelAdapter) -> str:
    """The llama.cpp architecture ``model`` is written as (what its family declares), or an error naming what
    llama.cpp cannot run and what to set instead."""
    config = model.config
    layers = adapter.layers(model)
    if any(isinstance(adapter.attention(layer), HeadDimAttention) for layer in layers):
        raise PrunekitError(
            "GGUF export: this model's head dims are pruned (prune.units attn_qk_dim / attn_vo_dim); llama.cpp has "
            "one key and value width, equal to the rotary width, for the whole model and rotates the first "
            "frequencies, not the kept ones. Prune heads, KV groups and MLP channels for a llama.cpp export"
        )
    arch = adapter.llama_cpp_arch
    if arch is None:
        raise PrunekitError(f"GGUF export: the {adapter.family} family has no llama.cpp architecture")
    window = getattr(config, "sliding_window", None)
    if not adapter.llama_cpp_sliding_window and window is not None and window < config.max_position_embeddings:
        raise PrunekitError(
            f"GGUF export: sliding_window {window} is shorter than the context ({config.max_position_embeddings}); "
            f"llama.cpp's {arch} graph attends to the whole context, so the file would compute something else "
            "beyond the window"
        )
    rope = adapter.rope_parameters(config).get("rope_type", "default")
    if rope not in adapter.llama_cpp_rope_types:
        raise PrunekitError(
            f"GGUF export: rope_type '{rope}' is not exported for the {adapter.family} family "
            f"({', '.join(adapter.llama_cpp_rope_types)} are)"
        )
    sizes = adapter.all_layer_sizes(model)
    reasons: list[tuple[str, str]] = []  # (why not the uniform architecture, what to set instead)
    if len(set(sizes)) > 1:
        reasons.append(("its layers keep different widths", _UNIFORM_CUT))
    if _has_output_bias(model, adapter) and not adapter.llama_cpp_output_bias:
        reasons.append(
            ("it has o_proj / down_proj biases, which that graph does not read", "prune.bias_compensation: false")
        )
    misfit = adapter.llama_cpp_uniform_refusal(model, sizes)
    if misfit is not None:
        reasons.append((misfit, _UNIFORM_CUT))
    if not reasons:
        return arch
    if adapter.llama_cpp_per_layer_arch is not None:
        return adapter.llama_cpp_per_layer_arch
    fixes = dict.fromkeys(fix for _, fix in reasons)
    raise PrunekitError(
        f"GGUF export: llama.cpp's {arch} graph reads one head count and FFN width for every layer, and the "
        f"{adapter.family} family has no llama.cpp architecture with per-layer widths; this model cannot be written as "
        f"{arch}: {'; '.join(why for why, _ in reasons)}. Set {' and '.join(fixes)}"
    )


# What to set for a model every layer of which a uniform-width llama.cpp architecture can hold.
_UNIFORM_CUT = "a uniform cut of all layers (prune.skip_first: 0, prune.skip_last: 0, prune.allocation: uniform)"


def _has_output_bias(model: nn.Module, adapter: ModelAdapter) -> bool:
    """Whether any o_proj or down_proj has a bias (FLAP's compensation, least squares, a Llama config switch)."""
    return any(
        getattr(adapter.attention(layer), adapter.o).bias is not None
        or getattr(adapter.mlp(layer), adapter.down).bias is not None
        for layer in adapter.layers(model)
    )


def _pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from transformers' halves [x_0..x_{d/2-1}, y_0..] to pairs [x_0, y_0, x_1, ..]."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope_factors(config: Any, params: dict[str, Any]) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs`` (a divisor of each dense frequency) for llama3 rope scaling (``params``: the
    rotary settings), from transformers' own rope functions; None for other rotary types."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if params.get("rope_type", "default") != "llama3":
        return None
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = config.head_dim
    base = float(params["rope_theta"])
    plain = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return (plain / scaled.float()).to(torch.float32)


def copy_tokenizer(source: Path, writer: Any) -> int:
    """Copy every ``tokenizer.*`` field of the GGUF file ``source`` to ``writer``; returns how many."""
    import gguf

    copied = 0
    for name, fld in gguf.GGUFReader(source).fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = fld.types[0]
        sub = fld.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, fld.contents(), kind, sub_type=sub)
        copied += 1
    return copied


def write_tokenizer_gguf(source: Path, out: Path, architecture: str) -> int:
    """A GGUF file of ``source``'s tokenizer fields alone (no tensors): what a later export copies."""
    import gguf

    writer = gguf.GGUFWriter(out, architecture)
    copied = copy_tokenizer(source, writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return copied


def _add_tokenizer(
    writer: Any, vocab_size: int, tokenizer_gguf: Path | None, hf_dir: Path | None, tokenizer_pre: str | None
) -> None:
    """The tokenizer fields: copied from ``tokenizer_gguf`` when given, else built from the HF tokenizer."""
    import gguf

    if tokenizer_gguf is not None:
        if not copy_tokenizer(tokenizer_gguf, writer):
            raise PrunekitError(f"'{tokenizer_gguf}' holds no tokenizer fields; rerun the download stage")
        return
    if hf_dir is None or not (hf_dir / "tokenizer.json").is_file():
        raise PrunekitError(f"no tokenizer to export: '{hf_dir}' has no tokenizer.json")
    import json

    spec = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
        raise PrunekitError(
            f"GGUF export: the tokenizer in '{hf_dir}' is {model.get('type')}"
            f"{' with byte fallback' if model.get('byte_fallback') else ''}"
            f"{'' if byte_level else ' without a byte-level decoder'}; prunekit builds byte-level BPE tokenizers "
            "(GPT-2 style). Start from the model's GGUF file (model.source) to carry its tokenizer, or give a GGUF "
            "file of the same tokenizer (prunekit export --tokenizer-gguf)"
        )
    vocab = gguf.vocab.BpeVocab(hf_dir)
    tokens, _, kinds = (list(x) for x in zip(*vocab.all_tokens(), strict=True))
    if len(tokens) > vocab_size:
        raise PrunekitError(f"GGUF export: the tokenizer has {len(tokens)} tokens, the model's vocabulary {vocab_size}")
    # llama.cpp sizes the embedding by the token list: rows without a token get unused placeholders.
    pad = vocab_size - len(tokens)
    tokens += [f"[PAD{i}]".encode() for i in range(len(tokens), vocab_size)]
    kinds += [gguf.TokenType.UNUSED] * pad
    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise PrunekitError(f"GGUF export: the tokenizer in '{hf_dir}' has no BPE merges, which llama.cpp needs")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    special.add_to_gguf(writer, quiet=True)


def _file_type(kinds: list[str]) -> int:
    """``general.file_type``: the type most 2-D weights have (llama.cpp's label of the file)."""
    import gguf

    most = max(set(kinds), key=kinds.count)
    if most == "F32":
        return int(gguf.LlamaFileType.ALL_F32)
    return int(gguf.LlamaFileType[K_FILE_TYPES.get(most, f"MOSTLY_{most}")])


def _write(
    writer: Any,
    model: nn.Module,
    adapter: ModelAdapter,
    arch: str,
    plan: list[tuple[str, torch.Tensor, str]],
    name: str,
    tokenizer: tuple[Path | None, Path | None, str | None],
) -> None:
    """Metadata, tokenizer (``(tokenizer_gguf, hf_dir, tokenizer_pre)``) and tensors of :func:`write_gguf`'s file."""
    import gguf

    config = model.config
    sizes = adapter.all_layer_sizes(model)
    head_dim = adapter.head_dim(model)
    writer.add_name(name)
    writer.add_block_count(len(sizes))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    per_layer = arch == adapter.llama_cpp_per_layer_arch
    for add, values in (
        (writer.add_feed_forward_length, [s.intermediate_size for s in sizes]),
        (writer.add_head_count, [s.num_attention_heads for s in sizes]),
        (writer.add_head_count_kv, [s.num_key_value_heads for s in sizes]),
    ):
        add(values if per_layer else values[0])  # arrays where layers differ, scalars where they agree
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = adapter.rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(_file_type([k for _, p, k in plan if p.dim() == 2]))
    adapter.gguf_metadata(writer, model)
    _add_tokenizer(writer, int(config.vocab_size), *tokenizer)

    factors = _rope_factors(config, rope)
    if factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.numpy())
    for gname, p, kind in plan:
        w = p.detach()
        if arch in PAIR_ROPE_ARCHS and (".attn_q." in gname or ".attn_k." in gname):
            size = sizes[int(gname.split(".")[1])]
            w = _pairs(w, size.num_attention_heads if ".attn_q." in gname else size.num_key_value_heads)
        data = encode(w, kind) if w.dim() == 2 else w.to(torch.float32).cpu().numpy()
        writer.add_tensor(gname, data, raw_dtype=None if kind in ("F32", "F16") else qtype(kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()


def write_gguf(
    model: nn.Module,
    adapter: ModelAdapter,
    out: Path,
    types: TensorTypes,
    *,
    name: str,
    tokenizer_gguf: Path | None = None,
    hf_dir: Path | None = None,
    tokenizer_pre: str | None = None,
) -> dict[str, Any]:
    """Write ``model`` (float weights, transformers layout) to ``out``; returns a summary (architecture, bytes,
    tensors per type). Nothing is left at ``out`` unless the whole file was written."""
    import gguf

    types.check()
    arch = check_exportable(model, adapter)
    config = model.config
    n_layers = len(adapter.layers(model))

    # Cheap checks first: every type fits its weight, every typed module exists, before a byte is written.
    plan: list[tuple[str, torch.Tensor, str]] = []  # (gguf name, tensor, type)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    for pname, p in model.named_parameters():
        if pname == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        gname = names.get_name(pname, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise PrunekitError(f"GGUF export: no llama.cpp tensor for '{pname}'")
        role = {"token_embd.weight": "embedding", "output.weight": "output"}.get(gname, "weight")
        kind = "F32" if p.dim() == 1 else types.kind(pname.rsplit(".", 1)[0], role)
        if p.dim() == 2:
            check_fits(kind, p.shape[1], pname)
        plan.append((gname, adapter.gguf_tensor(pname, p.detach(), model), kind))
    unknown = sorted(set(types.tensors) - {pname.rsplit(".", 1)[0] for pname, _ in model.named_parameters()})
    if unknown:
        raise PrunekitError(
            f"GGUF export: the types name modules this model does not have ({', '.join(unknown[:3])}"
            f"{', ...' if len(unknown) > 3 else ''}); was the plan searched on another model? Rerun the search"
        )

    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            _write(writer, model, adapter, arch, plan, name, (tokenizer_gguf, hf_dir, tokenizer_pre))
        finally:
            writer.close()
    counts = Counter(kind for _, _, kind in plan)
    log.info("wrote %s (%s, %.1f MiB): %s", out, arch, out.stat().st_size / 2**20, counts)
    return {"architecture": arch, "bytes": out.stat().st_size, "tensor_types": dict(sorted(counts.items()))}


ADAPTER_GGUF = "adapter.gguf"  # the QLoRA adapters, beside model.gguf


def read_lora(adapter_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """peft's LoRA adapters in ``adapter_dir`` (adapter_config.json, adapter_model.safetensors): module name ->
    (A (rank x in), B (out x rank)), and llama.cpp's alpha (its scale is alpha / rank: peft's alpha, times
    sqrt(rank) for rsLoRA). Adapters llama.cpp cannot apply as a plain LoRA are refused."""
    import json
    import math
    import re

    from safetensors.torch import load_file

    config_file, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for f in (config_file, weights):
        if not f.is_file():
            raise PrunekitError(f"'{adapter_dir}' has no {f.name}: not a LoRA adapter directory (peft's save)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        state = load_file(str(weights))
    except Exception as e:  # json's and safetensors' own error types for truncated or corrupt files
        raise PrunekitError(f"LoRA adapter in '{adapter_dir}' cannot be read (corrupt?): {e}") from e
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "fan_in_fan_out") if config.get(k)]
    if config.get("peft_type") != "LORA" or unsupported:
        raise PrunekitError(
            f"the adapter in '{adapter_dir}' is {config.get('peft_type')} with {unsupported or 'no options'}; "
            "llama.cpp's LoRA files hold plain LoRA (one rank and alpha, no DoRA): merge it into the weights instead"
        )
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    if config.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(rank)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        if m is None:
            raise PrunekitError(f"the adapter in '{adapter_dir}' holds '{key}', not a LoRA A/B weight of a Linear")
        pairs.setdefault(m[1], {})[m[2]] = tensor
    if not pairs or any(len(ab) != 2 for ab in pairs.values()):
        raise PrunekitError(f"the adapter in '{adapter_dir}' holds no complete LoRA A/B pairs")
    return {module: (ab["A"], ab["B"]) for module, ab in sorted(pairs.items())}, alpha


@dataclass(frozen=True)
class LoraTensors:
    """A LoRA adapter checked against its model, in llama.cpp's names and row order: (name, A, B) per weight."""

    arch: str
    alpha: float
    tensors: list[tuple[str, torch.Tensor, torch.Tensor]]


def lora_tensors(
    model: nn.Module, adapter: ModelAdapter, lora: tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]
) -> LoraTensors:
    """:func:`read_lora`'s adapters, trained on ``model``, named and permuted as :func:`write_gguf` names and
    permutes the weights (a PrunekitError if an adapter does not fit its weight)."""
    import gguf

    pairs, alpha = lora
    arch = check_exportable(model, adapter)
    sizes = adapter.all_layer_sizes(model)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], len(sizes))
    tensors = []
    for module, (a, b) in pairs.items():
        gname = names.get_name(module + ".weight", try_suffixes=(".weight",))
        try:
            shape = tuple(model.get_submodule(module).weight.shape)
        except AttributeError:
            shape = None
        if gname is None or shape != (b.shape[0], a.shape[1]) or a.shape[0] != b.shape[1]:
            raise PrunekitError(
                f"the adapter of '{module}' ({b.shape[0]} x {a.shape[1]}, rank {a.shape[0]}) does not fit the model's "
                "weights: was it trained on another model? Rerun the quantize stage"
            )
        if arch in PAIR_ROPE_ARCHS and (".attn_q." in gname or ".attn_k." in gname):
            size = sizes[int(gname.split(".")[1])]
            b = _pairs(b, size.num_attention_heads if ".attn_q." in gname else size.num_key_value_heads)
        tensors.append((gname, a, b))
    return LoraTensors(arch, alpha, tensors)


def write_lora_gguf(lora: LoraTensors, out: Path) -> dict[str, Any]:
    """llama.cpp's LoRA adapter file of :func:`lora_tensors`' adapters (float32). Returns a summary (adapted
    weights, rank, alpha, bytes). Nothing is left at ``out`` unless the whole file was written."""
    import gguf

    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, lora.arch)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.alpha)
            for gname, a, b in lora.tensors:
                writer.add_tensor(gname + ".lora_a", a.detach().to(torch.float32).contiguous().numpy())
                writer.add_tensor(gname + ".lora_b", b.detach().to(torch.float32).contiguous().numpy())
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    rank = int(lora.tensors[0][1].shape[0])
    log.info("wrote %s: LoRA on %d weights, rank %d, alpha %g", out, len(lora.tensors), rank, lora.alpha)
    return {"adapted_weights": len(lora.tensors), "rank": rank, "alpha": lora.alpha, "bytes": out.stat().st_size}


def plan_types(plan: Mapping[str, str], default: str, embedding: str | None, output: str | None) -> TensorTypes:
    """The types of a searched quantization plan (module -> scheme): llama.cpp block schemes as they are,
    ``fp16`` / ``bf16`` as F16 / BF16; other schemes have no llama.cpp type (an error names them)."""
    from prunekit.quant.schemes import SCHEMES

    tensors: dict[str, str] = {}
    for module, name in plan.items():
        scheme = SCHEMES.get(name)
        if scheme.backend == "ggml":
            tensors[module] = scheme.variant
        elif scheme.backend == "float":
            tensors[module] = {"float16": "F16", "bfloat16": "BF16"}[scheme.variant]
        else:
            raise PrunekitError(
                f"the quantization plan gives {module} the scheme '{name}', which llama.cpp cannot store; search "
                "over llama.cpp's types (search.choices from q4_0, q4_1, q5_0, q5_1, q8_0, q2_k .. q6_k, fp16) or "
                "export one type for every weight (export.types)"
            )
    return TensorTypes(default=default, embedding=embedding, output=output, tensors=tensors)


def choose_types(
    types: str,
    plan_file: Path | None,
    *,
    unplanned: str = "F16",
    embedding: str | None = None,
    output: str | None = None,
) -> TensorTypes:
    """``types`` "plan": the types of the quantization plan in ``plan_file`` (a plan JSON or a quantized model
    directory), ``unplanned`` for the weights it does not cover; else the type ``types`` for every weight."""
    if types != "plan":
        return TensorTypes(default=types, embedding=embedding, output=output)
    if plan_file is None:
        raise PrunekitError(
            "GGUF export with the plan's types needs the plan: give its file (or a type for every weight)"
        )
    from prunekit.quant.apply import read_plan

    if not plan_file.exists():
        raise PrunekitError(f"quantization plan '{plan_file}' does not exist; run the search stage (dvc repro search)")
    plan, _, _ = read_plan(plan_file)
    return plan_types(plan, unplanned, embedding, output)


def export_directory(
    model_dir: Path,
    out: Path,
    types: TensorTypes,
    *,
    tokenizer_gguf: Path | None = None,
    tokenizer_pre: str | None = None,
    lora: Path | None = None,
    lora_out: Path | None = None,
) -> dict[str, Any]:
    """Write the GGUF file of a Hugging Face model directory (pruned, recovered or any supported one); the
    tokenizer from ``tokenizer_gguf`` when given (else ``model_dir``'s ``tokenizer.gguf`` if it has one, else
    built from its tokenizer.json); with ``lora`` (a peft adapter directory), its LoRA file at ``lora_out`` too.
    Returns :func:`write_gguf`'s summary (and ``lora``: :func:`write_lora_gguf`'s)."""
    from prunekit.models.loading import load_model

    types.check()
    if tokenizer_gguf is not None and not tokenizer_gguf.is_file():
        raise PrunekitError(f"tokenizer GGUF '{tokenizer_gguf}' does not exist")
    if (lora is None) != (lora_out is None):
        raise PrunekitError("a LoRA adapter export needs both the adapter directory and the file to write")
    adapters = read_lora(lora) if lora is not None else None  # before loading the model
    if tokenizer_gguf is None and (model_dir / TOKENIZER_GGUF).is_file():
        tokenizer_gguf = model_dir / TOKENIZER_GGUF
    model, _, adapter = load_model(model_dir, "float32", "cpu")
    name = str(getattr(model.config, "_name_or_path", "") or model_dir.name)
    prepared = lora_tensors(model, adapter, adapters) if adapters is not None else None  # every check before a file
    summary = write_gguf(
        model, adapter, out, types, name=name, tokenizer_gguf=tokenizer_gguf, hf_dir=model_dir,
        tokenizer_pre=tokenizer_pre,
    )  # fmt: skip
    if prepared is not None and lora_out is not None:
        summary["lora"] = write_lora_gguf(prepared, lora_out)
    return summary
