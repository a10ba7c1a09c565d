"""The network: T5 1.1 layers, task conditioning, encoder-decoder, loss and decoding.

Prompts are made in `conditioning.py` (HyperPrompt's hypernetworks, prompt tuning) and
enter attention in `layers.py` (`MultiHeadDotProductAttention`'s prompt keys/values);
`network.py` wires them per layer. Imports JAX and Flax only.
"""
