"""Quantization plans: which scheme each weight of a model gets, checked against the model, and what that costs.

A plan maps module names (as in ``model.named_modules()`` of the causal LM, e.g. ``model.layers.3.mlp.down_proj``)
to scheme names: the Linear modules inside decoder layers (QPruner's layer-wise setting) and, where the search
includes them, the token embedding (``model.embed_tokens``) and an untied output head (``lm_head``); norms and
biases stay as they are. A tied output head is the embedding's module. Saved as ``quant_plan.json`` (schemes,
settings, dtype) by the search stage and beside a quantized model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.types import CausalLM, Submodule
from prunekit.pipeline.outputs import read_json
from prunekit.quant.backend import backend_for, storage_bits
from prunekit.quant.embedding import QuantizedEmbedding
from prunekit.quant.schemes import SCHEMES, QuantSettings, Scheme

PLAN_FILE = "quant_plan.json"
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


def _is_tied(model: CausalLM) -> bool:
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if isinstance(embedding, QuantizedEmbedding):
        return head is embedding.linear
    return head is not None and head.weight is embedding.weight


def _head_name(model: CausalLM) -> str:
    """The output head's name (``lm_head``), also where it is the quantized embedding's own module."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    inside = _module_names(model)[id(embedding)] + "."
    return next(n for n, m in model.named_modules(remove_duplicate=False) if m is head and not n.startswith(inside))


def _module_names(model: CausalLM) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def quant_targets(model: CausalLM, adapter: ModelAdapter, embeddings: bool = False) -> list[QuantTarget]:
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


def _shape(module: Submodule) -> tuple[int, int]:
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


def read_plan(path: Path) -> tuple[dict[str, str], QuantSettings, str]:
    """(module -> scheme, settings, dtype) from a quantized directory or a plan JSON file."""
    f = path / PLAN_FILE if path.is_dir() else path
    raw = read_json(f, "quantization plan")
    try:
        return dict(raw["schemes"]), QuantSettings(**raw["settings"]), str(raw.get("dtype", "float32"))
    except (KeyError, TypeError) as e:
        raise PrunekitError(f"quantization plan '{f}' is malformed ({e}); rerun the stage that wrote it") from e
