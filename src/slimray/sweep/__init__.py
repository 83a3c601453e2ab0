"""Sweeps on Ray Tune: distillation hyperparameters (``distill_search``: each trial a Ray Train run) and
compression settings (``search``: prune ratio x quantization x runtime), on one shared machinery
(``engine``: Tune config, resume, resource planning), with space files (``space``) and winner selection
(``select``)."""
