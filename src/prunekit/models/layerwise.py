"""A causal LM whose decoder layers stay on disk until they run: one layer in memory at a time.

:class:`LayerwiseModel` builds the model's modules with their parameters on PyTorch's ``meta`` device (shapes
and dtypes, no storage; buffers such as the rotary frequencies are real) and reads tensors from the
directory's safetensors files (memory-mapped) only when asked: :meth:`LayerwiseModel.embed` reads just the
embedding rows of the tokens given, :meth:`LayerwiseModel.loaded` one decoder layer, :meth:`LayerwiseModel.head`
the final norm and the output head.

:meth:`LayerwiseModel.run` carries hidden states through the decoder layer-major: every batch through layer
0, then every batch through layer 1, ... Each layer receives exactly the keyword arguments the model's own
forward gives it (attention mask, rotary embeddings, positions: recorded once per batch by running the
decoder with every layer replaced by a recorder), so a layer computes what it computes inside the model's
forward, and hooks registered on its modules see the same tensors. Hidden states between layers stay in
memory up to ``activations_mib`` and go to a temporary folder of safetensors files beyond it.

Peak memory: the largest of (one decoder layer + the carried hidden states of one batch and its layer
output) and (the final norm and output head, for perplexity); never the whole model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ModelAdapter
from prunekit.models.families import adapter_for
from prunekit.models.hidden import MIB, HiddenStates
from prunekit.models.loading import DTYPES, check_weights, load_config
from prunekit.models.types import CausalLM, Submodule

log = logging.getLogger(__name__)

LAYERS_PREFIX = "model.layers."


class _StopForward(Exception):
    """Raised by the final norm's hook once every layer's arguments are recorded."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer while its arguments are recorded; passes the hidden states through."""

    def __init__(self, layer: Submodule, seen: list[dict[str, Any]]) -> None:
        super().__init__()
        self.seen = seen
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise RuntimeError("decoder layers are expected to receive everything but the hidden states by keyword")
        self.seen.append({k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache")})
        return hidden_states


class LayerwiseModel:
    """A model directory's causal LM with every parameter on the meta device until a layer is loaded."""

    def __init__(self, path: str | Path, dtype: str = "float32", device: str = "cpu") -> None:
        from accelerate import init_empty_weights
        from safetensors import SafetensorError, safe_open
        from transformers import AutoModelForCausalLM

        self.path = Path(path)
        config = load_config(self.path)
        self.adapter: ModelAdapter = adapter_for(config)
        if dtype not in DTYPES:
            raise PrunekitError(f"model.dtype '{dtype}' is not supported; choose one of {', '.join(DTYPES)}")
        check_weights(self.path)
        self.dtype, self.device = DTYPES[dtype], torch.device(device)
        # Which file holds each tensor (a sharded checkpoint has several).
        self.files: dict[str, Path] = {}
        for f in sorted(self.path.glob("*.safetensors")):
            try:
                with safe_open(str(f), framework="pt") as handle:
                    self.files.update(dict.fromkeys(handle.keys(), f))
            except (SafetensorError, OSError) as e:
                raise PrunekitError(
                    f"model at '{self.path}': '{f.name}' is not a readable safetensors file ({e}); restore it with "
                    f"`dvc checkout {self.path}` or rerun the stage that writes it"
                ) from e
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        self.model.eval()
        self.model.tie_weights()
        expected = {name for name, _ in self.model.named_parameters()}  # a tied head is listed once
        missing = sorted(expected - set(self.files))
        if missing:
            raise PrunekitError(
                f"model at '{self.path}' lacks {len(missing)} weight(s) its config needs (first: {missing[0]}); "
                "it is incomplete: restore it or rerun the stage that writes it"
            )
        # Buffers live where the layers run (the rotary frequencies feed every layer's arguments).
        for module in self.model.modules():
            for name, buf in list(module.named_buffers(recurse=False)):
                module._buffers[name] = buf.to(self.device)

    @property
    def layers(self) -> nn.ModuleList:
        return self.adapter.layers(self.model)

    def read(self, name: str) -> torch.Tensor:
        """The stored tensor ``name`` as saved (its file's dtype), read from disk."""
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def _materialize(self, module: nn.Module, prefix: str) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, _ in module.named_parameters():
            set_module_tensor_to_device(
                module, name, self.device, value=self.read(prefix + name).to(self.dtype), dtype=self.dtype
            )
        for name, buf in module.named_buffers():  # persistent buffers (pruned head dims' rotary index)
            if prefix + name in self.files:
                set_module_tensor_to_device(module, name, self.device, value=self.read(prefix + name).to(buf.dtype))

    @staticmethod
    def _release(module: nn.Module) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, _ in module.named_parameters():
            set_module_tensor_to_device(module, name, "meta")

    @contextmanager
    def loaded(self, idx: int) -> Iterator[nn.Module]:
        """Decoder layer ``idx`` with its weights read from disk; back on the meta device on exit."""
        layer = self.layers[idx]
        self._materialize(layer, f"{LAYERS_PREFIX}{idx}.")
        try:
            yield layer
        finally:
            self._release(layer)

    def whole(self, each_layer: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
        """The whole model in memory, its decoder layers read one at a time and each handed to ``each_layer`` as
        soon as it is (to quantize it, say, so the float model never exists whole). The model is this object's:
        use one or the other afterwards, not both."""
        emb, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        tied = head is not None and head.weight is emb.weight
        self._materialize(emb, _module_prefix(self.model, emb))
        self._materialize(self.model.get_decoder().norm, _module_prefix(self.model, self.model.get_decoder().norm))
        if tied:
            self.model.tie_weights()
        elif head is not None:
            self._materialize(head, _module_prefix(self.model, head))
        for idx, layer in enumerate(self.layers):
            self._materialize(layer, f"{LAYERS_PREFIX}{idx}.")
            if each_layer is not None:
                each_layer(idx, layer)
        left = [n for n, p in self.model.named_parameters() if p.device.type == "meta"]
        if left:
            raise RuntimeError(f"parameters not read from '{self.path}': {left[:3]}")
        return self.model

    @contextmanager
    def head(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        """(final norm, output head) with their weights read; a tied head reads the embedding's matrix."""
        decoder = self.model.get_decoder()
        out = self.model.get_output_embeddings()
        head_name = next(n for n, p in self.model.named_parameters() if p is out.weight)
        self._materialize(decoder.norm, _module_prefix(self.model, decoder.norm))
        self._materialize(out, head_name.removesuffix("weight"))
        try:
            yield decoder.norm, out
        finally:
            self._release(decoder.norm)
            self._release(out)
            self.model.tie_weights()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding of ``input_ids`` (B, T), reading only the rows of the tokens present."""
        from safetensors import safe_open

        emb = self.model.get_input_embeddings()
        name = _module_prefix(self.model, emb) + "weight"
        tokens, inverse = torch.unique(input_ids, return_inverse=True)
        if int(tokens.max()) >= emb.num_embeddings or int(tokens.min()) < 0:
            raise PrunekitError(
                f"token ids outside the vocabulary of {emb.num_embeddings} of the model at '{self.path}'"
            )
        with safe_open(str(self.files[name]), framework="pt") as handle:
            table = handle.get_slice(name)
            rows = torch.cat([table[int(t) : int(t) + 1] for t in tokens]).to(self.device, self.dtype)
        scale = getattr(emb, "embed_scale", None)  # an embedding that scales its rows (Gemma-3: sqrt(hidden_size))
        if scale is not None:
            rows = rows * scale.to(self.device, rows.dtype)
        return rows[inverse.to(self.device)]

    @torch.no_grad()
    def layer_arguments(self, embeds: torch.Tensor) -> list[dict[str, Any]]:
        """The keyword arguments every decoder layer receives for a batch with these embeddings, per layer."""
        decoder = self.model.get_decoder()
        layers = self.layers
        seen: list[dict[str, Any]] = []
        stand_ins = nn.ModuleList(_Recorder(layer, seen) for layer in layers)
        stop = decoder.norm.register_forward_pre_hook(_raise_stop)
        decoder.layers = stand_ins
        try:
            decoder(inputs_embeds=embeds, use_cache=False)
        except _StopForward:
            pass
        finally:
            decoder.layers = layers
            stop.remove()
        if len(seen) != len(layers):
            raise RuntimeError(f"recorded arguments of {len(seen)} layers, the model has {len(layers)}")
        return seen

    @torch.no_grad()
    def run(
        self,
        input_ids: torch.Tensor,
        batch_size: int,
        around: Callable[[int, nn.Module], AbstractContextManager[object]] | None = None,
        last: int | None = None,
        forward: bool = True,
        activations_mib: int = 2048,
    ) -> HiddenStates:
        """Run the windows ``input_ids`` (N, T) through layers ``0..last`` (default: all), layer-major.

        ``around(idx, layer)`` is entered with layer ``idx`` loaded, before the batches run through it, and
        left after (hooks registered in it see the layer's forward). ``forward=False`` only visits the layers.
        Returns the hidden states after layer ``last`` per batch (close them when done).
        """
        n_layers = len(self.layers)
        last = n_layers - 1 if last is None else last
        hidden, arguments = (
            self.inputs(input_ids, batch_size, activations_mib) if forward else (HiddenStates(0, self.device), [])
        )
        try:
            for idx in range(last + 1):
                with self.loaded(idx) as layer, around(idx, layer) if around else nullcontext():
                    if not forward:
                        continue
                    for b, h in enumerate(hidden):
                        out = layer(h, **arguments[b][idx])
                        hidden.put(b, out[0] if isinstance(out, tuple) else out)
        except BaseException:
            hidden.close()
            raise
        return hidden

    @torch.no_grad()
    def inputs(
        self, input_ids: torch.Tensor, batch_size: int, activations_mib: int = 2048
    ) -> tuple[HiddenStates, list[list[dict[str, Any]]]]:
        """Layer 0's input per batch of the windows ``input_ids`` (N, T), and per batch the keyword arguments of
        every layer (``arguments[batch][layer]``)."""
        hidden = HiddenStates(activations_mib * MIB, self.device)
        arguments: list[list[dict[str, Any]]] = []
        try:
            for b, start in enumerate(range(0, input_ids.shape[0], batch_size)):
                embeds = self.embed(input_ids[start : start + batch_size])
                arguments.append(self.layer_arguments(embeds))
                hidden.put(b, embeds)
        except BaseException:
            hidden.close()
            raise
        return hidden, arguments


def _raise_stop(_module: nn.Module, _args: tuple[Any, ...]) -> None:
    raise _StopForward


def _module_prefix(model: CausalLM, module: nn.Module) -> str:
    """``"model.norm."`` for the module ``model.model.norm``: its path in ``model``, with a trailing dot."""
    for name, m in model.named_modules():
        if m is module:
            return f"{name}." if name else ""
    raise RuntimeError(f"{type(module).__name__} is not a submodule of the model")
