"""The model under google-research/t5x: the only package that imports `t5x`."""
