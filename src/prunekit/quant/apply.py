"""Quantization plans: which scheme each decoder Linear gets, what that costs, and realising it.

A plan maps module names (as in ``model.named_modules()`` of the causal LM, e.g.
``model.layers.3.mlp.down_proj``) to scheme names: the Linear modules inside decoder layers (QPruner's
layer-wise setting) and, where the search includes them, the token embedding (``model.embed_tokens``) and an
untied output head (``lm_head``); norms and biases stay as they are. An embedding is held as its backend's
quantized Linear of the same (vocab x hidden) matrix inside a :class:`QuantizedEmbedding` (so only backends whose
modules give back their dequantized weight can hold one: :attr:`QuantBackend.holds_embeddings`); a tied output
head is that same module.

* :func:`fake_quantized` swaps each planned weight for its quantize -> dequantize image for the length of
  a ``with`` block (the search's objective; no module changes).
* :func:`realise` replaces each planned module by its realised form: bitsandbytes ``Linear8bitLt`` /
  ``Linear4bit`` or prunekit's :class:`~prunekit.quant.rtn.RTNLinear` / ``Float16Linear``.
* :func:`save_quantized` / :func:`load_quantized` write and read a directory: ``config.json``, the
  tokenizer, ``model.safetensors`` (codes and their statistics as bitsandbytes and prunekit lay them out),
  ``quant_plan.json``, and ``adapter/`` when LoRA adapters were trained on the quantized base.

Each scheme's backend (:mod:`prunekit.quant.backend`) does the format's work; nothing here depends on the format.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.pipeline.files import atomic_dir, read_json, write_json
from prunekit.quant.backend import backend_for, is_quantized, lora_custom_modules, storage_bits
from prunekit.quant.schemes import SCHEMES, QuantSettings, Scheme

log = logging.getLogger(__name__)

PLAN_FILE = "quant_plan.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_DIR = "adapter"
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class QuantTarget:
    """A quantizable weight: its module's name, decoder layer (-1 for the embedding, the layer count for the output
    head), kind (``attn`` / ``mlp`` / ``embedding`` / ``output``) and (rows, cols) shape (embedding: vocab x hidden)."""

    name: str
    layer: int
    kind: str
    rows: int
    cols: int

    @property
    def numel(self) -> int:
        return self.rows * self.cols


class QuantizedEmbedding(nn.Module):
    """A token embedding stored as a quantized module of its (vocab x hidden) matrix (``linear``: any backend's
    module with ``dequantized_weight()``); looking tokens up dequantizes the rows they need (``dequantize_rows``
    where the module has it, else the whole matrix). A tied output head is ``linear`` itself."""

    def __init__(self, linear: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.linear, self.dtype = linear, dtype  # dtype: of the vectors it gives (the model's)
        self.num_embeddings, self.embedding_dim = linear.out_features, linear.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = getattr(self.linear, "dequantize_rows", None)
        if rows is not None:
            out = rows(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)
        else:
            out = nn.functional.embedding(ids, self.linear.dequantized_weight())
        return out.to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def _is_tied(model: nn.Module) -> bool:
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if isinstance(embedding, QuantizedEmbedding):
        return head is embedding.linear
    return head is not None and head.weight is embedding.weight


def _head_name(model: nn.Module) -> str:
    """The output head's name (``lm_head``), also where it is the quantized embedding's own module."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    inside = _module_names(model)[id(embedding)] + "."
    return next(n for n, m in model.named_modules(remove_duplicate=False) if m is head and not n.startswith(inside))


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def quant_targets(model: nn.Module, adapter: ModelAdapter, embeddings: bool = False) -> list[QuantTarget]:
    """Every Linear of every decoder layer, in model order; with ``embeddings``, the token embedding first and an
    untied output head last (a tied head is the embedding's matrix: it follows the embedding's scheme)."""
    names = {id(layer): i for i, layer in enumerate(adapter.layers(model))}
    prefix = {}
    for name, module in model.named_modules():
        if id(module) in names:
            prefix[names[id(module)]] = name
    out = []
    for idx, layer in enumerate(adapter.layers(model)):
        for sub, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                kind = "attn" if sub.rsplit(".", 1)[-1] in ATTN_MODULES else "mlp"
                rows, cols = module.weight.shape
                out.append(QuantTarget(f"{prefix[idx]}.{sub}", idx, kind, rows, cols))
    if not out:
        raise PrunekitError("the model has no Linear modules in its decoder layers to quantize")
    if embeddings:
        where = _module_names(model)
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        vocab, hidden = _shape(embedding)
        out.insert(0, QuantTarget(where[id(embedding)], -1, "embedding", vocab, hidden))
        if head is not None and not _is_tied(model):
            rows, cols = _shape(head)
            out.append(QuantTarget(where[id(head)], len(adapter.layers(model)), "output", rows, cols))
    return out


def _shape(module: nn.Module) -> tuple[int, int]:
    """(rows, cols) of a Linear's, an embedding's or a quantized module's weight."""
    if isinstance(module, (QuantizedEmbedding, nn.Embedding)):
        return module.num_embeddings, module.embedding_dim
    return module.out_features, module.in_features


def check_plan(plan: Mapping[str, str], targets: list[QuantTarget]) -> None:
    """Every planned module is a quantization target and every scheme exists (else PrunekitError)."""
    known = {t.name for t in targets}
    unknown = sorted(set(plan) - known)
    if unknown:
        raise PrunekitError(
            f"quantization plan names modules the model does not have as decoder Linears or embeddings: {unknown[:5]}"
            + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        )
    by_name = {t.name: t for t in targets}
    for name, scheme in plan.items():
        s, t = SCHEMES.get(scheme), by_name[name]
        if t.kind == "embedding":
            check_embedding_scheme(s, f"the token embedding {name}")
        backend_for(s).check_shape(s, t.rows, t.cols, f"{name} ({scheme})")


def check_embedding_scheme(scheme: Scheme, what: str) -> None:
    """A PrunekitError unless ``scheme``'s backend can hold a token embedding."""
    if not backend_for(scheme).holds_embeddings:
        able = [n for n, s in SCHEMES.items() if backend_for(s).holds_embeddings]
        raise PrunekitError(
            f"scheme '{scheme.name}' cannot hold {what} (its modules do not give back their weight to look tokens "
            f"up in); choose from {able} or leave the embedding out of the search (search.embeddings: false)"
        )


@dataclass(frozen=True)
class PlanCost:
    """What a plan costs: mean nominal bits per planned weight, and bytes of the planned weights."""

    avg_bits: float
    quantized_bytes: int
    quantized_weights: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def plan_cost(plan: Mapping[str, str], targets: list[QuantTarget], settings: QuantSettings) -> PlanCost:
    """Nominal mean bits (weighted by weight count) and storage bytes (codes + statistics) of ``plan``."""
    by_name = {t.name: t for t in targets}
    bits = weights = storage = 0
    for name, scheme_name in plan.items():
        t, scheme = by_name[name], SCHEMES.get(scheme_name)
        bits += scheme.bits * t.numel
        weights += t.numel
        storage += storage_bits(scheme, t.rows, t.cols, settings)
    return PlanCost(bits / weights if weights else 0.0, -(-storage // 8), weights)


def fake_quantize_weight(w: torch.Tensor, scheme: Scheme, settings: QuantSettings) -> torch.Tensor:
    """``w`` after quantize -> dequantize in ``scheme`` (same dtype and device as ``w``)."""
    return backend_for(scheme).fake_quantize(w, scheme, settings)


@contextmanager
def fake_quantized(
    model: nn.Module,
    plan: Mapping[str, str],
    settings: QuantSettings,
    cache: dict[tuple[str, str], torch.Tensor] | None = None,
) -> Iterator[None]:
    """Inside: each planned module's weight holds its quantize -> dequantize image; restored on exit.

    With a ``cache`` dict, images are kept by (module, scheme) and reused: a search revisits the same
    few images of every module, and bitsandbytes' 4-bit quantization costs ~0.1 s per MLP matrix on a CPU.
    """
    saved = []
    try:
        with torch.no_grad():
            for name, scheme_name in plan.items():
                module = model.get_submodule(name)
                saved.append((module, module.weight.data))
                image = cache.get((name, scheme_name)) if cache is not None else None
                if image is None:
                    image = fake_quantize_weight(module.weight.data, SCHEMES.get(scheme_name), settings)
                    if cache is not None:
                        cache[name, scheme_name] = image
                module.weight.data = image
        yield
    finally:
        for module, data in saved:
            module.weight.data = data


def realise(model: nn.Module, plan: Mapping[str, str], settings: QuantSettings) -> nn.Module:
    """Replace each planned Linear by its quantized module (in place); returns ``model``."""
    tied = _is_tied(model)
    for name, scheme_name in plan.items():
        linear = model.get_submodule(name)
        scheme = SCHEMES.get(scheme_name)
        if isinstance(linear, nn.Embedding):
            check_embedding_scheme(scheme, f"the token embedding {name}")
            module = QuantizedEmbedding(
                backend_for(scheme).realise(_as_linear(linear), scheme, settings), linear.weight.dtype
            )
        elif isinstance(linear, nn.Linear):
            module = backend_for(scheme).realise(linear, scheme, settings)
        else:
            raise PrunekitError(f"module '{name}' is {type(linear).__name__}, not a Linear: already quantized?")
        module.train(linear.training)  # bitsandbytes' int8 matmul takes another path in training mode
        _replace(model, name, module, tied)
    return model


def quantize_linears(layer: nn.Module, names: Sequence[str], scheme: Scheme, settings: QuantSettings) -> None:
    """Replace (in place) every Linear of ``layer`` whose own name is in ``names`` by ``scheme``'s module."""
    for path, module in list(layer.named_modules()):
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in names:
            quantized = backend_for(scheme).realise(module, scheme, settings)
            quantized.train(module.training)
            _replace(layer, path, quantized, tied=False)


def _as_linear(embedding: nn.Embedding) -> nn.Linear:
    """A Linear whose weight is ``embedding``'s matrix (shared, not copied)."""
    rows, cols = embedding.weight.shape
    linear = nn.Linear(cols, rows, bias=False, device="meta")
    linear.weight = embedding.weight
    return linear


def _replace(model: nn.Module, name: str, module: nn.Module, tied: bool) -> None:
    """Put ``module`` at ``name``; a quantized embedding of a tied model is its output head too."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)
    if tied and isinstance(module, QuantizedEmbedding):
        model.set_output_embeddings(module.linear)
        # The tie is now the shared module; transformers' tie_weights() (lm-eval calls it) would look for the
        # embedding's float parameter: this model has no parameter ties left for it to make.
        model._tied_weights_keys = None
        model.all_tied_weights_keys = {}


def logical_param_count(model: nn.Module) -> tuple[int, int]:
    """(model parameters as their float shapes count them, LoRA adapter parameters); tied weights once.

    A quantized Linear counts in x out (+ bias) whatever its storage; adapter weights are counted apart.
    """
    seen: set[int] = set()
    params = adapters = 0
    for name, module in model.named_modules():
        if is_quantized(module):
            params += module.in_features * module.out_features
            if module.bias is not None:
                params += module.bias.numel()
            seen.update(id(p) for p in module.parameters())
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if "lora_" in f"{name}.{pname}":
                adapters += p.numel()
            else:
                params += p.numel()
    return params, adapters


def plan_cost_of_model(model: nn.Module, plan: Mapping[str, str]) -> float:
    """Mean nominal bits per planned weight of a realised (or plain) model, from module shapes."""
    bits = weights = 0
    for name, scheme in plan.items():
        rows, cols = _shape(model.get_submodule(name))
        n = rows * cols
        bits += SCHEMES.get(scheme).bits * n
        weights += n
    return bits / weights if weights else 0.0


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` as stored (codes, statistics, float weights),
    LoRA adapter weights excluded (see :func:`logical_param_count` for their count)."""
    seen: set[int] = set()
    total = 0
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in named:
        if id(t) in seen or "lora_" in name:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:  # bitsandbytes 4-bit statistics live outside the parameter
            total += sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values())
        scb = getattr(t, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total


def save_quantized(
    model: nn.Module,
    tokenizer: Any,
    plan: Mapping[str, str],
    settings: QuantSettings,
    dtype: str,
    out_dir: Path,
    peft_model: nn.Module | None = None,
) -> None:
    """Write a quantized model directory (atomically): config, tokenizer, weights, plan, adapters."""
    from safetensors.torch import save_file

    from prunekit.models.provenance import make_reproducible

    with atomic_dir(out_dir) as tmp:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = base_state(model) if peft_model is not None else model.state_dict()
        if _is_tied(model):  # the embedding's matrix, tied back at load time
            head = _head_name(model)
            state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / WEIGHTS_FILE))
        write_json(tmp / PLAN_FILE, {"schemes": dict(plan), "settings": asdict(settings), "dtype": dtype})
        if peft_model is not None:
            peft_model.save_pretrained(tmp / ADAPTER_DIR)
        make_reproducible(tmp)


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state of a model peft has injected adapters into, as it was before: ``x.base_layer.y`` keys
    back to ``x.y`` and no adapter weights (those are saved by peft, in ``adapter/``)."""
    out = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def read_plan(path: Path) -> tuple[dict[str, str], QuantSettings, str]:
    """(module -> scheme, settings, dtype) from a quantized directory or a plan JSON file."""
    f = path / PLAN_FILE if path.is_dir() else path
    raw = read_json(f, "quantization plan")
    try:
        return dict(raw["schemes"]), QuantSettings(**raw["settings"]), str(raw.get("dtype", "float32"))
    except (KeyError, TypeError) as e:
        raise PrunekitError(f"quantization plan '{f}' is malformed ({e}); rerun the stage that wrote it") from e


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / PLAN_FILE).is_file()


def load_quantized(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Any, dict[str, str]]:
    """(model in eval mode, tokenizer, plan) from :func:`save_quantized`'s directory, adapters attached."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunekit.models.loading import DTYPES, load_config

    p = Path(path)
    config = load_config(p)
    plan, settings, dtype = read_plan(p)
    if not (p / WEIGHTS_FILE).is_file():
        raise PrunekitError(f"no {WEIGHTS_FILE} in '{p}'; rerun the quantize stage")
    try:
        state = load_file(str(p / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise PrunekitError(f"'{p / WEIGHTS_FILE}' cannot be read (corrupt?): {e}") from e
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype]).to(device)
    from prunekit.models.families import adapter_for

    tied = _is_tied(model)
    check_plan(plan, quant_targets(model, adapter_for(config), embeddings=True))
    planned = {name: {} for name in plan}
    for key in list(state):
        owner = key.rsplit(".", 1)[0]
        while owner and owner not in planned:
            owner = owner.rpartition(".")[0]
        if owner:
            planned[owner][key[len(owner) + 1 :]] = state.pop(key)
    # The float part first, on the plain skeleton (bitsandbytes modules must not see a partial state).
    missing, unexpected = model.load_state_dict(state, strict=False)
    prefixes = tuple(n + "." for n in plan)
    missing = [k for k in missing if not k.startswith(prefixes) and k != "lm_head.weight"]
    if missing or unexpected:
        raise PrunekitError(
            f"'{p / WEIGHTS_FILE}' does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if tied:
        model.tie_weights()
    for name, scheme_name in plan.items():
        scheme, skeleton = SCHEMES.get(scheme_name), model.get_submodule(name)
        if isinstance(skeleton, nn.Embedding):
            sub = {k.removeprefix("linear."): v for k, v in planned[name].items()}
            loaded = backend_for(scheme).load(_as_linear(skeleton), scheme, settings, sub, device)
            module = QuantizedEmbedding(loaded, skeleton.weight.dtype)
        else:
            module = backend_for(scheme).load(skeleton, scheme, settings, planned[name], device)
        _replace(model, name, module, tied)
    model.eval()
    if (p / ADAPTER_DIR).is_dir():
        from peft import LoraConfig, PeftModel

        lora_config = LoraConfig.from_pretrained(str(p / ADAPTER_DIR))
        lora_config._register_custom_module(lora_custom_modules())
        model = PeftModel.from_pretrained(model, str(p / ADAPTER_DIR), config=lora_config).eval()
    tokenizer = AutoTokenizer.from_pretrained(p)
    return model, tokenizer, plan
