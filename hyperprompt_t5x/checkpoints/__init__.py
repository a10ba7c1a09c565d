"""Checkpoints: reading T5X and Hugging Face formats, a pretrained backbone into fresh
parameters, the run's own store of `checkpoint_<step>` folders, and their health."""
