"""Mixed-precision quantization: schemes, their backends (registered here), the search, realising a plan."""

from prunekit.quant import bnb, ggml, rtn  # noqa: F401  (registration of the backends)
from prunekit.quant.schemes import SCHEMES, QuantSettings, Scheme

__all__ = ["SCHEMES", "QuantSettings", "Scheme"]
