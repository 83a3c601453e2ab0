"""Training: the pure-torch loop (``loop``) and its data-parallel run on Ray Train (``distill``)."""
