"""slimray: distil a PyTorch teacher into a student on Ray Train, search pruning x quantization on
Ray Tune, and serve the winner on Ray Serve.

The pure-torch parts (``slimray.models``, ``slimray.compress``) never import ray; the Ray parts live
in ``slimray.training``, ``slimray.sweep`` and ``slimray.serving``; ``slimray.cli`` is the entry point.
"""

__version__ = "0.1.0"
