"""Model families, one module each (adapter, capabilities, registration line), and looking them up.

Import a new family's module below; the contract tests (tests/test_families.py) run over every registered family.
Importing this package also registers every family's pruned classes with transformers' Auto classes.
"""

from __future__ import annotations

from typing import Any

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ADAPTERS, ModelAdapter
from prunekit.models.families import gemma3, llama, mistral, qwen2, qwen3  # noqa: F401  (registration)
from prunekit.models.modeling import LEGACY_PREFIX

__all__ = [
    "ADAPTERS",
    "ModelAdapter",
    "adapter_for",
    "family_of_gguf",
    "family_of_model_type",
    "register_auto_classes",
    "supported_model_types",
]


def register_auto_classes() -> None:
    """Map every family's pruned config class to its model classes in ``AutoModel`` / ``AutoModelForCausalLM``
    (idempotent): a pruned config (:func:`prunekit.models.loading.load_config`) builds the pruned model."""
    from transformers import AutoModel, AutoModelForCausalLM

    for _, adapter in ADAPTERS.items():
        config_cls, model_cls, causal_cls, _ = adapter.pruned
        AutoModel.register(config_cls, model_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, causal_cls, exist_ok=True)


def supported_model_types() -> list[str]:
    """Every ``model_type`` a registered family reads."""
    return sorted(t for _, a in ADAPTERS.items() for t in a.model_types)


def supported_gguf_architectures() -> list[str]:
    """Every GGUF ``general.architecture`` a registered family converts."""
    return sorted(arch for _, a in ADAPTERS.items() for arch in a.gguf_architectures)


def family_of_gguf(architecture: str | None) -> ModelAdapter | None:
    """The family that converts GGUF files of ``architecture`` (None if no family does)."""
    for _, adapter in ADAPTERS.items():
        if architecture in adapter.gguf_architectures:
            return adapter
    return None


def family_of_model_type(model_type: str) -> ModelAdapter | None:
    """The family whose configs (stock or pruned; ``prunekit_<type>``: a pruned one written by an earlier version)
    have this ``model_type``, or None."""
    for _, adapter in ADAPTERS.items():
        if model_type.removeprefix(LEGACY_PREFIX) in adapter.model_types:
            return adapter
    return None


def adapter_for(config: Any) -> ModelAdapter:
    """The adapter for a transformers config, or an error listing the supported architectures."""
    model_type = str(getattr(config, "model_type", ""))
    adapter = family_of_model_type(model_type)
    if adapter is not None:
        return adapter
    supported = supported_model_types()
    raise PrunekitError(
        f"Unsupported architecture '{model_type}' (architectures: {getattr(config, 'architectures', None)}). "
        f"Supported model types: {', '.join(supported)}."
    )


register_auto_classes()  # the pruned classes load through transformers' Auto classes wherever a family is known
