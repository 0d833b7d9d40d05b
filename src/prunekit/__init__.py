"""prunekit: structured pruning, LoRA recovery and mixed-precision quantization of Llama-family models.

Importing prunekit registers its pruned model classes with transformers' Auto classes, so that
``AutoModelForCausalLM.from_pretrained(path)`` loads checkpoints whose layers differ in width.
"""

from __future__ import annotations

__version__ = "0.1.0"


def _register() -> None:
    # Deferred import keeps `import prunekit.pipeline.params` free of torch until a model is needed.
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return
    from prunekit.models.families import register_auto_classes

    register_auto_classes()


_register()
