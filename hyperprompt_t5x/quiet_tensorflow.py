"""TensorFlow without its start-up noise, kept off the accelerators.

TensorFlow only feeds the input pipelines (seqio). Its C++ start-up lines (CUDA
probing, oneDNN notes, absl's "log messages before InitializeLog") go to file
descriptor 2 before any Python logging setting applies. `import_tensorflow` is
called by the CLI and before the first `hyperprompt_t5x.tasks` import of a run.
"""
from __future__ import annotations

import os
import sys


def import_tensorflow() -> None:
  """Imports TensorFlow with its C++ start-up lines (CUDA probing, oneDNN) silenced.

  Those lines are written to file descriptor 2 before absl's logging starts, so
  TF_CPP_MIN_LOG_LEVEL does not stop them; stderr is pointed at /dev/null for the
  import only. TensorFlow only feeds the input pipelines: it gets no GPU.
  """
  if 'tensorflow' in sys.modules:
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')
  except ImportError:
    pass  # the import error shows where TensorFlow is first needed
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
