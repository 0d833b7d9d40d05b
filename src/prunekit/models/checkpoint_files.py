"""Which files of a Hugging Face model directory are what: configs, tokenizer, safetensors weights, and the pickled
weights prunekit never loads (they can run code when unpickled)."""

from __future__ import annotations

import fnmatch

# Files that make up a Hugging Face model directory, by name at its top level. Weights are safetensors
# only; anything else (pickled .bin/.pt files, optimizer states, remote code) is left behind.
WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
CONFIG_PATTERNS = ("config.json", "generation_config.json")
TOKENIZER_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
MODEL_FILE_PATTERNS = CONFIG_PATTERNS + TOKENIZER_PATTERNS + WEIGHT_PATTERNS

# What snapshot_download fetches: the files above, nothing heavier.
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def matches(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
