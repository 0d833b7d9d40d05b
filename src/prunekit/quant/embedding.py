"""A token embedding held as a quantized matrix."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class QuantizedEmbedding(nn.Module):
    """A token embedding stored as a quantized module of its (vocab x hidden) matrix (``linear``: any backend's
    module with ``dequantized_weight()``); looking tokens up dequantizes the rows they need (``dequantize_rows``
    where the module has it, else the whole matrix). A tied output head is ``linear`` itself."""

    def __init__(self, linear: Any, dtype: torch.dtype) -> None:
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
