"""Mixed-precision quantization: schemes, RTN, plans, realisation with bitsandbytes, save / load."""

from prunekit.quant.schemes import SCHEMES, QuantSettings, Scheme

__all__ = ["SCHEMES", "QuantSettings", "Scheme"]
