"""HyperPrompt for T5 1.1 in JAX/Flax, T5X-compatible.

Importing this package pulls in no TensorFlow, seqio or gin: the model, the
train step and the benchmarks run where only JAX is installed. `load` (a
trained run as a Python object) imports them when called.
"""

__version__ = '0.1.0'


def load(model_dir: str, checkpoint_step=None, **options):
  """A trained run, restored: `.predict(texts, task=...)`, `.score(texts, targets, task=...)`.

  `model_dir`: a MODEL_DIR written by `hyperprompt-t5x train` (its newest
  checkpoint) or MODEL_DIR/checkpoint_<step>. Prints nothing unless
  `verbose=True` (status lines to stderr). Other options (`gin_files`,
  `macros`, ...): `hyperprompt_t5x.evaluation.predictor.load`.
  """
  from hyperprompt_t5x.evaluation import predictor  # pylint: disable=g-import-not-at-top
  return predictor.load(model_dir, checkpoint_step, **options)
