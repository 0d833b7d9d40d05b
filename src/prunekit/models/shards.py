"""A model directory written one tensor group at a time: safetensors shards, their index, and a config checked
against what was written (so a model held one layer at a time is saved as ``from_pretrained`` reads it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

INDEX_FILE = "model.safetensors.index.json"


def shard_name(i: int, n: int) -> str:
    """Shard ``i`` (1-based) of ``n``, as transformers names them."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


class ShardWriter:
    """Writes ``n_files`` shards into ``out_dir``, in order, and then their index."""

    def __init__(self, out_dir: Path, n_files: int) -> None:
        self.out_dir, self.n_files = out_dir, n_files
        self.weight_map: dict[str, str] = {}
        self.total = 0  # bytes written
        self.written = 0  # shards written

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Save ``tensors`` as the next shard."""
        from safetensors.torch import save_file

        self.written += 1
        name = shard_name(self.written, self.n_files)
        save_file(tensors, str(self.out_dir / name), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.total += sum(t.numel() * t.element_size() for t in tensors.values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor written, read back from the shards' headers."""
        from safetensors import safe_open

        out = {}
        for name, shard in self.weight_map.items():
            with safe_open(str(self.out_dir / shard), framework="pt") as f:
                out[name] = tuple(f.get_slice(name).get_shape())
        return out

    def finish(self) -> None:
        """The shard index (after every shard)."""
        if self.written != self.n_files:
            raise RuntimeError(f"wrote {self.written} shards of {self.n_files}")
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def save_checked_config(config: Any, dtype: torch.dtype, shapes: dict[str, tuple[int, ...]], out_dir: Path,
                        generation_source: Path) -> None:  # fmt: skip
    """config.json and the generation config (``generation_source``'s, else one made from the config), after checking
    that the class ``from_pretrained`` will build from ``config`` expects exactly the tensors ``shapes`` describes."""
    from accelerate import init_empty_weights
    from transformers import GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # a causal LM class (the mapping's type says a pair)
    with init_empty_weights():
        fresh = cls(config)
    fresh.tie_weights()
    expected = {n: tuple(t.shape) for n, t in fresh.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    if expected != shapes:
        diff = sorted(set(expected.items()) ^ set(shapes.items()))
        raise RuntimeError(f"the written tensors do not match the pruned config's model: {diff[:3]}")
    config.architectures = [cls.__name__]
    config.dtype = dtype
    config.save_pretrained(out_dir)
    source = generation_source / "generation_config.json"
    generation = (
        GenerationConfig.from_pretrained(generation_source)
        if source.is_file()
        else GenerationConfig.from_model_config(config)
    )
    generation.save_pretrained(out_dir)
