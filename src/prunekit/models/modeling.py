"""Pruned model classes: stock transformers families whose decoder layers may differ in width.

A pruned checkpoint whose layers all keep the same widths is saved with the stock config of its family,
so stock transformers loads it without prunekit. When layers differ, the config is a subclass of the
family's config with ``layer_sizes`` (one dict per decoder layer); its ``model_type`` stays the family's (so stock
transformers reads the config, and the tokenizer beside it, like any other: no prompt for custom code) and its
``architectures`` name the pruned class.
The model classes subclass the family's own modules (no vendored modeling code): each decoder layer is built
from a copy of the config carrying that layer's sizes. Layers whose head dims are pruned (q/k and v widths of
their own, which no stock config can express) get the family's attention with :class:`HeadDimAttention`
mixed in; the others keep the stock attention. :func:`pruned_classes` makes a family's four classes from its
transformers modeling module.

A pruned config with ``output_bias: true`` gives every layer's o_proj and down_proj a bias: FLAP's bias
compensation on a family whose stock config has no switch for them (Mistral, Qwen2; Llama has ``attention_bias``
and ``mlp_bias``). Such a checkpoint always has a prunekit config, uniform widths or not.

Loading without prunekit: this module imports nothing but the standard library, torch and transformers. Saving
a pruned config writes this module's source, followed by the lines that make the checkpoint family's classes,
as ``modeling_prunekit.py`` beside ``config.json``, and an ``auto_map`` to it in the config, so
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` (lm-eval's ``hf`` model, vLLM's and TGI's
transformers back-ends) loads the checkpoint where prunekit is not installed. prunekit loads it with its own
classes (made by the same code: :func:`prunekit.models.loading.load_pretrained`), no ``trust_remote_code``.
Checkpoints written before the config kept its family's ``model_type`` (``prunekit_<family>``) load too.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, NamedTuple, cast

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# Within-head widths of a layer whose head dims are pruned (all three or none; none: stock attention).
# ``rope_pairs`` lists, per k/v head, the kept rotary pairs (frequency indices in [0, head_dim / 2)).
HEAD_DIM_KEYS = ("qk_head_dim", "v_head_dim", "rope_pairs")
# Keys of one entry of ``layer_sizes``: the per-layer config attributes that pruning changes.
LAYER_SIZE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size", *HEAD_DIM_KEYS)
# A pruned config's switch for o_proj / down_proj biases the family's stock config cannot express.
OUTPUT_BIAS = "output_bias"
# A config.json with either key describes a pruned model (prunekit's classes); earlier ones said
# ``model_type: prunekit_<family>``.
PRUNED_KEYS = ("layer_sizes", OUTPUT_BIAS)
LEGACY_PREFIX = "prunekit_"
# The file a pruned config's save writes beside config.json, and the line after which its family's classes follow.
REMOTE_CODE_FILE = "modeling_prunekit.py"
_FAMILY_MARKER = "# ---- the classes of this checkpoint's family ----"


def is_pruned_config(data: dict[str, Any]) -> bool:
    """Whether a config.json's fields describe a model of prunekit's per-layer classes."""
    return any(data.get(key) for key in PRUNED_KEYS) or str(data.get("model_type", "")).startswith(LEGACY_PREFIX)


def add_bias(linear: nn.Linear) -> bool:
    """Give ``linear`` a zero bias (its weight's dtype and device) if it has none; whether it added one."""
    if linear.bias is not None:
        return False
    w = linear.weight
    linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), w.requires_grad)
    return True


def layer_config(config: Any, layer_idx: int) -> Any:
    """A shallow copy of ``config`` with the sizes of decoder layer ``layer_idx``."""
    sizes = config.layer_sizes[layer_idx] if config.layer_sizes else {}
    cfg = copy.copy(config)
    for key, value in sizes.items():
        object.__setattr__(cfg, key, value)
    return cfg


def check_layer_sizes(config: Any) -> None:
    """Raise ValueError unless ``layer_sizes`` has one valid entry per decoder layer."""
    sizes = config.layer_sizes
    if sizes is None:
        return
    if len(sizes) != config.num_hidden_layers:
        raise ValueError(f"layer_sizes has {len(sizes)} entries for {config.num_hidden_layers} layers")
    for i, entry in enumerate(sizes):
        unknown = set(entry) - set(LAYER_SIZE_KEYS)
        if unknown:
            raise ValueError(f"layer_sizes[{i}] has unknown keys {sorted(unknown)}; valid: {LAYER_SIZE_KEYS}")
        heads = entry.get("num_attention_heads", config.num_attention_heads)
        kv = entry.get("num_key_value_heads", config.num_key_value_heads)
        if kv < 1 or heads < 1 or heads % kv:
            raise ValueError(f"layer_sizes[{i}]: {heads} query heads cannot share {kv} key/value heads")
        if entry.get("intermediate_size", config.intermediate_size) < 1:
            raise ValueError(f"layer_sizes[{i}]: intermediate_size must be positive")
        _check_head_dims(i, entry, getattr(config, "head_dim", None) or config.hidden_size // heads, kv)


def _check_head_dims(i: int, entry: dict[str, Any], head_dim: int, kv: int) -> None:
    """Raise ValueError unless the within-head widths of ``layer_sizes[i]`` are absent or consistent."""
    present = [k for k in HEAD_DIM_KEYS if k in entry]
    if not present:
        return
    if len(present) != len(HEAD_DIM_KEYS):
        raise ValueError(f"layer_sizes[{i}] has {present}: give all of {HEAD_DIM_KEYS} or none")
    qk, v, pairs = (entry[k] for k in HEAD_DIM_KEYS)
    if qk < 2 or qk % 2 or qk > head_dim:
        raise ValueError(f"layer_sizes[{i}]: qk_head_dim={qk} must be even (rotary pairs) and in [2, {head_dim}]")
    if not 1 <= v <= head_dim:
        raise ValueError(f"layer_sizes[{i}]: v_head_dim={v} must be in [1, {head_dim}]")
    if len(pairs) != kv or any(len(p) != qk // 2 for p in pairs):
        raise ValueError(f"layer_sizes[{i}]: rope_pairs must list {qk // 2} pairs for each of {kv} key/value heads")
    for p in pairs:
        if list(p) != sorted(set(p)) or p[0] < 0 or p[-1] >= head_dim // 2:
            raise ValueError(
                f"layer_sizes[{i}]: rope_pairs {list(p)} must be ascending, distinct, in [0, {head_dim // 2})"
            )


def rope_index_from_pairs(pairs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(k/v heads, kept pairs) pair indices -> (k/v heads, 2 * kept pairs) dense dim indices."""
    return torch.cat([pairs, pairs + head_dim // 2], dim=1)


def _resized(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """A linear layer like ``linear`` (bias, device, dtype) with other sizes; its weights come from a load."""
    w = linear.weight
    return nn.Linear(in_features, out_features, bias=linear.bias is not None, device=w.device, dtype=w.dtype)


class HeadDimAttention(nn.Module):
    """Mixin over a family's attention module: q/k and v head widths of their own (see the module doc).

    Subclasses list it before the family's attention class, so ``super().__init__`` builds the stock module.
    """

    # The family's transformers modeling module: its ``rotate_half`` and ``eager_attention_forward``.
    family_module: ClassVar[ModuleType]

    qk_head_dim: int
    v_head_dim: int
    rope_index: torch.Tensor
    # What the family's attention sets up (its constructor runs first).
    config: Any
    layer_idx: int
    head_dim: int
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear

    def __init__(self, config: Any, layer_idx: int) -> None:
        """Build from a per-layer config carrying ``qk_head_dim``, ``v_head_dim`` and ``rope_pairs``."""
        super().__init__(config, layer_idx)  # the family's attention
        qk, v = int(config.qk_head_dim), int(config.v_head_dim)
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        # The stock constructor made dense projections; replace them with the pruned widths.
        self.q_proj = _resized(self.q_proj, config.hidden_size, heads * qk)
        self.k_proj = _resized(self.k_proj, config.hidden_size, kv * qk)
        self.v_proj = _resized(self.v_proj, config.hidden_size, kv * v)
        self.o_proj = _resized(self.o_proj, heads * v, config.hidden_size)
        pairs = torch.tensor(config.rope_pairs, dtype=torch.long).reshape(kv, qk // 2)
        self._set_head_dims(qk, v, rope_index_from_pairs(pairs, self.head_dim))

    def _set_head_dims(self, qk: int, v: int, rope_index: torch.Tensor) -> None:
        self.qk_head_dim, self.v_head_dim = qk, v
        self.register_buffer("rope_index", rope_index, persistent=True)

    # --- updates by the units, after they sliced the weights -----------------------------------------

    def keep_qk_pairs(self, pairs: torch.Tensor) -> None:
        """Keep, for each k/v head g, its current pairs ``pairs[g]`` (sorted, positions in its current pairs)."""
        half = self.qk_head_dim // 2
        cols = torch.cat([pairs, pairs + half], dim=1).to(self.rope_index.device)
        self.rope_index = self.rope_index.gather(1, cols)
        self.qk_head_dim = 2 * pairs.shape[1]

    def keep_v_dims(self, kept: int) -> None:
        """Every k/v head now has ``kept`` v dims."""
        self.v_head_dim = kept

    def keep_kv_heads(self, keep: torch.Tensor) -> None:
        """Only k/v heads ``keep`` (sorted) remain: drop the others' rotary indices."""
        self.rope_index = self.rope_index[keep.to(self.rope_index.device)]

    def rope_pairs(self) -> tuple[tuple[int, ...], ...]:
        """The kept rotary pairs (frequency indices in [0, head_dim/2)) of each k/v head."""
        return tuple(tuple(row[: self.qk_head_dim // 2]) for row in self.rope_index.tolist())

    # --- forward -----------------------------------------------------------------------------------

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE with each k/v head's kept frequencies; its query heads use the same ones."""
        rotate_half: Callable[[torch.Tensor], torch.Tensor] = self.family_module.rotate_half
        # (B, T, head_dim) -> (B, T, kv, qk) -> (B, kv, T, qk)
        cos_k = cos[..., self.rope_index].transpose(1, 2)
        sin_k = sin[..., self.rope_index].transpose(1, 2)
        k = k * cos_k + rotate_half(k) * sin_k
        # Query heads are grouped by k/v head (head h uses k/v head h // n_rep, as in repeat_kv).
        qg = q.unflatten(1, (cos_k.shape[1], -1))  # (B, kv, n_rep, T, qk)
        qg = qg * cos_k.unsqueeze(2) + rotate_half(qg) * sin_k.unsqueeze(2)
        return qg.flatten(1, 2), k

    def norm_heads(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's per-head q/k norms where it has them (``q_norm`` / ``k_norm``), else q and k as they are."""
        q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
        if q_norm is None or k_norm is None:
            return q, k
        if self.qk_head_dim != self.head_dim:
            raise ValueError(f"q/k norms over {self.head_dim} dims cannot run on heads cut to {self.qk_head_dim}")
        return q_norm(q), k_norm(k)

    def attention_kwargs(self) -> dict[str, Any]:
        """The sliding window the stock attention passes to the attention function, where it has one: its own
        (Qwen2: per layer type) or its config's (Mistral); none otherwise (Llama)."""
        window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
        return {} if window is None else {"sliding_window": window}

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # transformers >= 5.24 passes the KV cache as ``cache``, earlier releases as ``past_key_values``.
        cache = cache if cache is not None else past_key_values
        input_shape = hidden_states.shape[:-1]
        q = self.q_proj(hidden_states).view(*input_shape, -1, self.qk_head_dim)  # (B, T, H, qk)
        k = self.k_proj(hidden_states).view(*input_shape, -1, self.qk_head_dim)  # (B, T, kv, qk)
        # Families with per-head q/k norms (Qwen3, Gemma-3) normalise before RoPE; their q/k dims are never pruned
        # (the norm's mean runs over the whole head), so the norms see full heads.
        q, k = self.norm_heads(q, k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, qk), (B, kv, T, qk)
        v = self.v_proj(hidden_states).view(*input_shape, -1, self.v_head_dim).transpose(1, 2)  # (B, kv, T, v)
        q, k = self.rotate(q, k, *position_embeddings)
        if cache is not None:
            # DynamicCache keeps keys and values as separate tensors: their widths may differ.
            k, v = cache.update(k, v, self.layer_idx)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, self.family_module.eager_attention_forward
        )
        out, weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,  # the dense head_dim's: pruned dims contribute zero, nothing rescales
            **self.attention_kwargs(),
            **kwargs,
        )
        out = out.reshape(*input_shape, -1).contiguous()  # (B, T, H * v)
        return self.o_proj(out), weights

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, qk_head_dim={self.qk_head_dim}, v_head_dim={self.v_head_dim}"


def build_layer(
    layer_cls: type[nn.Module], config: Any, idx: int, attention_cls: type[nn.Module], outputs: tuple[str, ...] = ()
) -> nn.Module:
    """Decoder layer ``idx`` with its sizes; ``attention_cls`` replaces the attention if its head dims are pruned,
    and the ``outputs`` projections (paths in the layer) get biases when the config's ``output_bias`` says so."""
    cfg = layer_config(config, idx)
    layer = layer_cls(cfg, idx)
    if getattr(cfg, "qk_head_dim", None) is not None:
        layer.self_attn = attention_cls(cfg, idx)
    if getattr(cfg, OUTPUT_BIAS, False):
        for path in outputs:
            add_bias(cast(nn.Linear, layer.get_submodule(path)))
    return layer


def build_layers(
    layer_cls: type[nn.Module], config: Any, attention_cls: type[nn.Module], outputs: tuple[str, ...] = ()
) -> nn.ModuleList:
    """Decoder layers with per-layer sizes, all sharing ``config`` afterwards.

    Modules keep a reference to the config they were built with and read run-time settings from it
    (``_attn_implementation``); pointing them back at the shared config keeps those settings global.
    """
    n = config.num_hidden_layers
    layers = nn.ModuleList(build_layer(layer_cls, config, i, attention_cls, outputs) for i in range(n))
    for layer in layers:
        for module in layer.modules():
            if getattr(module, "config", None) is not None and module is not layer:
                module.config = config
    return layers


class PerLayerModel:
    """Mixin for a family's base model: rebuild the decoder layers with per-layer sizes."""

    decoder_layer_cls: type[nn.Module]
    attention_cls: type[nn.Module]  # for layers whose head dims are pruned
    output_paths: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")  # biased by ``output_bias``

    def __init__(self, config: Any) -> None:
        super().__init__(config)  # type: ignore[call-arg]
        self.layers = build_layers(self.decoder_layer_cls, config, self.attention_cls, self.output_paths)
        self.post_init()  # type: ignore[attr-defined]


class PerLayerCausalLM:
    """Mixin for a family's causal LM: use the per-layer base model."""

    base_model_cls: type[nn.Module]

    def __init__(self, config: Any) -> None:
        super().__init__(config)  # type: ignore[call-arg]
        self.model = self.base_model_cls(config)
        self.post_init()  # type: ignore[attr-defined]


class ClassNames(NamedTuple):
    """A family's class names in its transformers modeling module (Gemma-3's text classes do not share one prefix)."""

    config: str
    model: str
    causal_lm: str
    attention: str
    decoder_layer: str

    @classmethod
    def of(cls, prefix: str) -> ClassNames:
        """``<prefix>Config``, ``<prefix>Model``, ``<prefix>ForCausalLM``, ``<prefix>Attention``, ...DecoderLayer."""
        return cls(f"{prefix}Config", f"{prefix}Model", f"{prefix}ForCausalLM", f"{prefix}Attention",
                   f"{prefix}DecoderLayer")  # fmt: skip


class PrunedClasses(NamedTuple):
    """A family's classes with per-layer widths."""

    config: type
    model: type
    causal_lm: type
    attention: type  # the family's attention with pruned head dims


def remote_code(config_cls: type[PrunedConfig]) -> str:
    """The source of ``modeling_prunekit.py`` for a pruned config class: this module and its family's line."""
    lines = Path(__file__).read_text(encoding="utf-8").splitlines()
    end = lines.index(_FAMILY_MARKER) if _FAMILY_MARKER in lines else len(lines)  # a saved copy: up to its family
    shared = "\n".join(lines[:end]).rstrip("\n")
    prefix = config_cls.__name__.removeprefix("Pruned").removesuffix("Config")
    module = config_cls.family_module
    package, name = module.rsplit(".", 1)
    names = ", ".join(repr(n) for n in config_cls.family_classes)
    return (
        f"{shared}\n\n\n{_FAMILY_MARKER}\n"
        f"from {package} import {name} as family_modeling  # noqa: E402\n\n"
        f"Pruned{prefix}Config, Pruned{prefix}Model, Pruned{prefix}ForCausalLM, HeadDim{prefix}Attention = "
        f"pruned_classes(family_modeling, {prefix!r}, ClassNames({names}))\n"
    )


class PrunedConfig:
    """Mixin for a family's config with per-layer widths (``layer_sizes``); top-level sizes are the dense model's."""

    family_module: ClassVar[str]  # the family's transformers modeling module, by name
    family_classes: ClassVar[ClassNames]  # the family's class names in it

    def validate_architecture(self) -> None:
        # Stock Llama demands hidden_size % num_attention_heads == 0, which pruned heads need not meet
        # (head_dim is explicit); check what the pruned architecture needs instead.
        check_layer_sizes(self)

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """Save config.json with an ``auto_map`` to ``modeling_prunekit.py``, written beside it."""
        name = type(self).__name__.removesuffix("Config")
        module = REMOTE_CODE_FILE.removesuffix(".py")
        self.auto_map = {
            "AutoConfig": f"{module}.{name}Config",
            "AutoModel": f"{module}.{name}Model",
            "AutoModelForCausalLM": f"{module}.{name}ForCausalLM",
        }
        super().save_pretrained(save_directory, *args, **kwargs)  # type: ignore[misc]
        (Path(save_directory) / REMOTE_CODE_FILE).write_text(remote_code(type(self)), encoding="utf-8")


@functools.cache
def pruned_classes(modeling: ModuleType, prefix: str, names: ClassNames | None = None) -> PrunedClasses:
    """The per-layer-width classes of the family whose transformers modeling module is ``modeling``, named
    ``Pruned<prefix>Config``, ... after the family's classes ``names`` (default ``<prefix>Config``,
    ``<prefix>Model``, ...: :meth:`ClassNames.of`), made once per process."""
    classes = names or ClassNames.of(prefix)
    stock_config = getattr(modeling, classes.config)

    class Attention(HeadDimAttention, getattr(modeling, classes.attention)):  # type: ignore[misc]
        family_module = modeling

    class Config(PrunedConfig, stock_config):  # type: ignore[misc, valid-type]
        family_module = modeling.__name__
        family_classes = classes
        layer_sizes: list | None = None

    class Model(PerLayerModel, getattr(modeling, classes.model)):  # type: ignore[misc]
        config_class = Config
        decoder_layer_cls = getattr(modeling, classes.decoder_layer)
        attention_cls = Attention

    class CausalLM(PerLayerCausalLM, getattr(modeling, classes.causal_lm)):  # type: ignore[misc]
        config_class = Config
        base_model_cls = Model

    named = {"Config": Config, "Model": Model, "ForCausalLM": CausalLM, "Attention": Attention}
    for suffix, cls in named.items():
        cls.__name__ = cls.__qualname__ = f"{'HeadDim' if suffix == 'Attention' else 'Pruned'}{prefix}{suffix}"
    return PrunedClasses(Config, Model, CausalLM, Attention)
