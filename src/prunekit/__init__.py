"""prunekit: structured pruning, LoRA recovery and mixed-precision quantization of language models.

Importing prunekit imports nothing heavy: the params, their validation and the command line parse without torch.
Loading a model registers prunekit's pruned model classes with transformers' Auto classes (importing
:mod:`prunekit.models.families` does), so that ``AutoModelForCausalLM.from_pretrained(path)`` loads checkpoints
whose layers differ in width.
"""

from __future__ import annotations

__version__ = "0.1.0"
