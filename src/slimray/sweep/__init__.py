"""Compression search on Ray Tune: trials over prune ratio x quantization, a constrained winner."""
