"""Token streams from documents: the one tokenization that calibration, training and evaluation share."""

from __future__ import annotations

from typing import Any

import torch

from prunekit.errors import PrunekitError

# LLM-Pruner's evaluation joins rows with a blank line and tokenizes the whole string once.
JOIN = "\n\n"


def token_stream(tokenizer: Any, documents: list[str], join: str = JOIN) -> torch.Tensor:
    """All documents joined with ``join`` and tokenized once (tokenizer defaults) -> (n_tokens,) int64."""
    if not documents:
        raise PrunekitError("no documents to tokenize: the data source gave an empty split")
    ids = tokenizer(join.join(documents), return_tensors="pt", verbose=False)["input_ids"][0]
    return ids.long()


def random_windows(stream: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens at seeded random offsets -> (samples, seq_len)."""
    if stream.numel() < seq_len:
        raise PrunekitError(
            f"calibration text has {stream.numel()} tokens, fewer than calibrate.seq_len={seq_len}; "
            "lower calibrate.seq_len or use a larger data.calibration source"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (samples,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def mixed_windows(streams: list[torch.Tensor], samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens split as evenly as they divide over ``streams`` (the first ones
    take the remainder), each stream's at seeded random offsets (:func:`random_windows`, seed + its index), all in
    a seeded random order, so that a share a later step holds out (every fourth window, say) draws on each text
    alike -> (samples, seq_len). One stream: :func:`random_windows` itself."""
    if len(streams) == 1:
        return random_windows(streams[0], samples, seq_len, seed)
    k = len(streams)
    counts = [samples // k + (i < samples % k) for i in range(k)]
    parts = [random_windows(s, n, seq_len, seed + i) for i, (s, n) in enumerate(zip(streams, counts, strict=True)) if n]
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed))
    return torch.cat(parts)[order]


def chunks(stream: torch.Tensor, seq_len: int, what: str) -> torch.Tensor:
    """Non-overlapping chunks of ``seq_len`` tokens (the tail shorter than one chunk is dropped)."""
    n = stream.numel() // seq_len
    if n == 0:
        raise PrunekitError(
            f"{what} text has {stream.numel()} tokens, fewer than one chunk of {seq_len}; "
            "lower the sequence length or use a larger source"
        )
    return stream[: n * seq_len].view(n, seq_len)
