"""Model families, one module each (adapter, head-dim attention, per-layer-width classes, registration line).

Import a new family's module here; the contract tests (tests/test_families.py) run over every registered family.
"""

from __future__ import annotations

from prunekit.models.families import llama, mistral, qwen2  # noqa: F401  (registration)
