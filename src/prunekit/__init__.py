"""prunekit: structured pruning, LoRA recovery and mixed-precision quantization of language models.

Importing prunekit imports nothing heavy: the params, their validation and the command line parse without torch.
Checkpoints whose layers differ in width load with :func:`prunekit.models.loading.load_pretrained` (prunekit's
classes) or, without prunekit, with ``trust_remote_code=True`` (the modeling file saved beside them).
"""

from __future__ import annotations

__version__ = "0.1.0"
