"""HyperPrompt for T5 1.1 in JAX/Flax, T5X-compatible.

Importing this package pulls in no TensorFlow, seqio or gin: the model, the
train step and the benchmarks run where only JAX is installed.
"""

__version__ = '0.1.0'
