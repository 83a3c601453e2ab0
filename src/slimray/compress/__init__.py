"""Compression as config object + function (pure torch, no ray).

``prune(model, PruneSpec(...), example_inputs=...)`` removes whole channels/neurons;
``quantize(model, QuantSpec(...), calibration=...)`` returns a quantized copy;
``measure`` scores a model on accuracy, bytes and latency.
"""

from slimray.compress.prune import PruneSpec, prune
from slimray.compress.quantize import QuantSpec, quantize

__all__ = ["PruneSpec", "prune", "QuantSpec", "quantize"]
