"""Attention with pruned head dimensions: q/k heads ``qk_head_dim`` wide, v heads ``v_head_dim`` wide.

Stock transformers attention has one ``head_dim`` for q, k and v. TransAct prunes dims inside heads:
q/k dims in rotary pairs (dims i and i + head_dim/2 rotate together in the ``rotate_half`` convention),
chosen per KV group (the k head and all query heads that share it keep the same pairs), and v/o dims per
KV group. Each family's attention is subclassed; the subclass overrides only ``forward`` (views with the
two widths and rotary cos/sin gathered at each k/v head's kept pairs) and resizes the projections at
construction. It keeps the dense model's ``head_dim`` and ``scaling`` (1/sqrt(head_dim)), so the pruned
model computes exactly what the dense model computes with the pruned dims zeroed.

``rope_index`` (k/v heads, qk_head_dim) holds, for each k/v head, the dense head_dim position of every kept
q/k dim: ``[pairs, pairs + head_dim/2]``. It is a persistent buffer (saved with the weights, loaded even
when transformers builds the model on the meta device) and is also rebuilt from the config's
``rope_pairs`` at construction.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any, ClassVar, cast

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


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

    # The family's modeling module: its ``rotate_half`` and ``eager_attention_forward``.
    family_module: ClassVar[ModuleType]

    qk_head_dim: int
    v_head_dim: int
    rope_index: torch.Tensor

    def __init__(self, config: Any, layer_idx: int) -> None:
        """Build from a per-layer config carrying ``qk_head_dim``, ``v_head_dim`` and ``rope_pairs``."""
        super().__init__(config, layer_idx)  # type: ignore[call-arg]  # the family's attention
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

    def attention_kwargs(self) -> dict[str, Any]:
        """Family-specific keyword arguments of the attention function (none for Llama)."""
        return {}

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
        q = self.q_proj(hidden_states).view(*input_shape, -1, self.qk_head_dim).transpose(1, 2)  # (B, H, T, qk)
        k = self.k_proj(hidden_states).view(*input_shape, -1, self.qk_head_dim).transpose(1, 2)  # (B, kv, T, qk)
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


def enable_head_dims(attn: nn.Module, family: str) -> HeadDimAttention:
    """Turn a family's stock attention into its head-dim subclass in place: same weights, same outputs.

    The subclass adds only state (widths equal to head_dim, identity rotary index), so switching the class
    of the live module keeps its parameters, hooks and place in the model.
    """
    if isinstance(attn, HeadDimAttention):
        return attn
    from prunekit.models.adapters import ADAPTERS

    cls = ADAPTERS.get(family).head_dim_attention
    if type(attn) not in cls.__bases__:
        raise TypeError(f"cannot prune head dims of {type(attn).__name__}: expected the {family} attention")
    hd = int(attn.head_dim)
    kv = attn.k_proj.out_features // hd
    index = torch.arange(hd, device=attn.k_proj.weight.device).expand(kv, hd).clone()
    attn.__class__ = cls
    converted = cast(HeadDimAttention, attn)
    converted._set_head_dims(hd, hd, index)
    return converted
