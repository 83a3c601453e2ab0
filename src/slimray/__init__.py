"""slimray: distil a PyTorch teacher into a student on Ray Train, search pruning x quantization on
Ray Tune, and serve the winner on Ray Serve.

Model families (``slimray.families``: ``classifier``, ``sentence_encoder``) are the plug-in point and, with
``slimray.compress``, never import ray. The Ray stages live in ``slimray.training`` (one Train loop for every
family), ``slimray.sweep`` (the Tune engine) and ``slimray.serving`` (one Serve builder); ``slimray.cli`` is
the entry point.
"""

__version__ = "0.1.0"
