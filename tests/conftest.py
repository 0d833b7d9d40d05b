"""Tiny models and tokenizers for tests: a 2-4 layer GQA Llama with random weights, no network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import prunekit  # noqa: F401  (registers the pruned Auto classes)


def tiny_config(**overrides: object) -> LlamaConfig:
    """GQA Llama: 8 query heads share 4 k/v heads (2 per group), head_dim 8, hidden 48."""
    kw: dict[str, object] = dict(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_model(seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides)).eval()
    # Random init gives near-zero norms' effect; perturb norms so masking errors cannot hide behind them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on Python's documentation text (offline, deterministic)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[: vocab_size - 40],
        show_progress=False,
    )
    texts = [topics[k] for k in sorted(topics)][:20]
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_model()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny model directory with tokenizer, usable as `model.source`."""
    path = tmp_path_factory.mktemp("tiny_model")
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def block_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny model whose Linear input widths are multiples of llama.cpp's block of 32 (hidden 64, MLP 128),
    with a byte-level BPE tokenizer that has merges (llama.cpp needs them): the whole pipeline through export."""
    path = tmp_path_factory.mktemp("block_model")
    tok = tiny_tokenizer(300)
    model = tiny_model(vocab_size=len(tok), hidden_size=64, intermediate_size=128)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
