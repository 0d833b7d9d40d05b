"""Gemma-3 (text: Gemma-3 270M, 1B, and the language model of the larger sizes).

What differs from Llama (transformers' ``modeling_gemma3``):

* four norms per block: input, post-attention, pre-FFN and post-FFN; the post norms sit between o_proj /
  down_proj and the residual, so what a block adds to the residual stream is a normalised output;
* norms compute ``x * (1 + w)`` (llama.cpp stores ``1 + w``: :attr:`ModelAdapter.norm_offset`), q/k norms per head;
* the embedding is multiplied by sqrt(hidden_size), attention is scaled by ``query_pre_attn_scalar ** -0.5``;
* ``layer_types`` alternate sliding-window (local RoPE base) and full attention (global base, linear scaling in
  the larger sizes) 5:1; removing a layer keeps its entry out of that list (``units/layers.py``);
* a GELU-tanh MLP; tied embeddings; one KV head in the small sizes, where KV groups cannot be pruned
  (``attn_kv_group`` refuses a model with one KV head per layer: prune query heads instead).

What it refuses, and why, is declared below. llama.cpp's ``gemma3`` graph reads one head count and FFN width for
all layers, so a GGUF export needs the same widths in every layer. Its attention scale is 1/sqrt(head_dim)
(1/sqrt(hidden / heads) for its 62-layer 27B); where the config's ``query_pre_attn_scalar`` says otherwise, the
export folds the ratio into the q norm's weight (exact: the norm's output is scaled before RoPE and the scores).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from transformers.models.gemma3 import modeling_gemma3

from prunekit.models.adapters import ADAPTERS, QK_NORM_REFUSAL, ModelAdapter
from prunekit.models.modeling import ClassNames
from prunekit.models.types import CausalLM

POST_NORMS = (
    "Gemma-3 normalises the attention and MLP outputs (post-attention / post-FFN norms) before they reach the "
    "residual stream"
)


class Gemma3Adapter(ModelAdapter):
    """Gemma-3's text model: sandwich norms, (1 + w) norms, a scaled embedding, sliding and full attention."""

    family = "gemma3"
    model_types = ("gemma3_text",)
    modeling = modeling_gemma3
    prefix = "Gemma3"
    classes = ClassNames("Gemma3TextConfig", "Gemma3TextModel", "Gemma3ForCausalLM", "Gemma3Attention",
                         "Gemma3DecoderLayer")  # fmt: skip
    hidden_norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm")  # fmt: skip
    norm_offset = 1.0
    gguf_architectures = ("gemma3",)
    llama_cpp_arch = "gemma3"
    llama_cpp_rope_types = ("default", "linear")
    llama_cpp_sliding_window = True
    refused_units = MappingProxyType(
        {
            "attn_qk_dim": QK_NORM_REFUSAL,
            "hidden_channel": (
                "Gemma-3 scales the token embedding by sqrt(hidden_size), which a narrower residual stream changes "
                "for every token; prune query heads, MLP channels or layers instead"
            ),
        }
    )
    refused_criteria = MappingProxyType(
        {
            "bip": (
                f"LLM-BIP's bound follows a unit to the block output through a residual add; {POST_NORMS}, so the "
                "bound does not hold. Use activation, flap, transact, a Taylor criterion (param_first) or lora"
            ),
        }
    )
    compensation_refused = (
        f"FLAP's bias keeps the mean of o_proj / down_proj outputs, but {POST_NORMS}, where a mean is not kept; "
        "set prune.bias_compensation: false"
    )
    reconstruction_refused = (
        f"least squares refits o_proj / down_proj outputs, but {POST_NORMS}, so the refit would not aim at what "
        "reaches it; set prune.reconstruct: none"
    )

    def complete_gguf_config(self, config: Any, metadata: Mapping[str, Any], arch: str) -> None:
        # What transformers' GGUF reader leaves out, as llama.cpp's gemma3 graph reads it: the sliding layers (an
        # array, or every n-th layer full; none without a window), the local rope base, the attention scale (a
        # file's q norms carry any other scale: see the module docstring) and the logit soft-capping.
        n_layers = int(metadata[f"{arch}.block_count"])
        pattern = metadata.get(f"{arch}.attention.sliding_window_pattern", 6)
        window = int(metadata.get(f"{arch}.attention.sliding_window", 0))
        if isinstance(pattern, list):
            sliding = [bool(p) for p in pattern]
        else:
            sliding = [int(pattern) > 0 and (i % int(pattern)) < int(pattern) - 1 for i in range(n_layers)]
        config.layer_types = ["sliding_attention" if s and window else "full_attention" for s in sliding]
        if window:
            config.sliding_window = window
        heads = metadata[f"{arch}.attention.head_count"]
        heads = heads[0] if isinstance(heads, list) else heads
        head_dim = int(metadata[f"{arch}.attention.key_length"])
        config.query_pre_attn_scalar = config.hidden_size / heads if n_layers == 62 else head_dim
        local = metadata.get(f"{arch}.rope.freq_base_swa")
        if local is not None:
            config.rope_parameters["sliding_attention"]["rope_theta"] = float(local)
        cap = metadata.get(f"{arch}.final_logit_softcapping")
        if cap:
            config.final_logit_softcapping = float(cap)

    def rope_parameters(self, config: Any) -> dict[str, Any]:
        return dict((getattr(config, "rope_parameters", None) or {}).get("full_attention") or {})

    def llama_cpp_uniform_refusal(self, model: CausalLM, sizes: list[Any]) -> str | None:
        config = model.config
        if getattr(config, "attn_logit_softcapping", None) is not None:
            return "it soft-caps attention logits (attn_logit_softcapping), which that graph does not"
        if getattr(config, "use_bidirectional_attention", False):
            return "it attends in both directions (use_bidirectional_attention); that graph is causal"
        local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            return f"its sliding layers scale their rotary frequencies ({local.get('rope_type')}); that graph does not"
        return None

    def attention_scale_ratio(self, model: CausalLM) -> float:
        """The config's attention scale over the one llama.cpp's gemma3 graph applies."""
        config = model.config
        n_layers, heads = len(self.layers(model)), self.layer_sizes(model, 0).num_attention_heads
        width = config.hidden_size / heads if n_layers == 62 else self.head_dim(model)  # llama.cpp: its 27B by depth
        return math.sqrt(width / float(config.query_pre_attn_scalar))

    def gguf_tensor(self, name: str, tensor: torch.Tensor, model: CausalLM) -> torch.Tensor:
        out = super().gguf_tensor(name, tensor, model)
        if name.endswith("self_attn.q_norm.weight"):
            ratio = self.attention_scale_ratio(model)
            return out * ratio if ratio != 1.0 else out
        return out

    def gguf_metadata(self, writer: Any, model: CausalLM) -> None:
        import gguf

        config = model.config
        types = list(config.layer_types)
        if "sliding_attention" in types:
            writer.add_sliding_window(int(config.sliding_window))
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        local = config.rope_parameters.get("sliding_attention") or {}
        writer.add_rope_freq_base_swa(float(local.get("rope_theta", 10_000.0)))
        full = self.rope_parameters(config)
        if full.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(full["factor"]))
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


ADAPTERS.register(Gemma3Adapter.family)(Gemma3Adapter())
