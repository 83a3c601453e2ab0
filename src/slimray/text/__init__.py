"""Sentence-embedding compression (issue #9): MiniLM teacher, layer-dropped student, KD on Ray Train.

Pure-torch modules (``data``, ``models``, ``compress``, ``evaluate``) never import ray; the Ray code lives
in ``distill`` (Ray Train), ``search`` (Ray Tune) and ``pipeline``.
"""
