"""The one vocabulary object shared by the GLUE/SuperGLUE tasks and the model.

Chosen by the environment variable `HYPERPROMPT_VOCABULARY`:

* unset: T5's public 32k SentencePiece model
  `gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model` (its 100
  sentinel ids are inside the model, so `extra_ids=0`); it is read lazily, on
  the first encode/decode, so importing the tasks offline is fine;
* `byte`: `seqio.ByteVocabulary()` (no file, offline);
* any other value: the path of a SentencePiece `.model` file
  (`HYPERPROMPT_VOCABULARY_EXTRA_IDS`, default 0, sentinel ids to add).

`set_vocabulary(...)` swaps it at run time and re-registers the tasks with the
new object (see `tasks/__init__.py`); the demo tasks always use their own
`seqio.ByteVocabulary`, so ask `get_vocabulary(task_or_mixture_name)` for the
object a given mixture uses.

`describe(vocabulary)` is what a run records of its vocabulary (kind, ids,
extra ids, the SentencePiece model's SHA-256); `same(a, b)` compares two such
records.
"""
import hashlib
import os
from typing import Optional, Union

import seqio
import tensorflow as tf

DEFAULT_SPM_PATH = 'gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model'
VOCABULARY_ENV = 'HYPERPROMPT_VOCABULARY'
EXTRA_IDS_ENV = 'HYPERPROMPT_VOCABULARY_EXTRA_IDS'

# The demo mixture's vocabulary: one object, never swapped.
DEMO_VOCABULARY = seqio.ByteVocabulary()


def make_vocabulary(spec: Union[None, str, seqio.Vocabulary],
                    extra_ids: Optional[int] = None) -> seqio.Vocabulary:
  """A vocabulary from a spec: a Vocabulary, 'byte', a .model path, or None (env / default).

  `extra_ids`: sentinel ids added to a SentencePiece model (None: the env var, else 0).
  """
  if isinstance(spec, seqio.Vocabulary):
    return spec
  if spec is None:
    spec = os.environ.get(VOCABULARY_ENV) or DEFAULT_SPM_PATH
  if not isinstance(spec, str):
    raise TypeError(f'vocabulary spec must be a seqio.Vocabulary, "byte" or a path, got {spec!r}')
  if spec == 'byte':
    return seqio.ByteVocabulary()
  if spec == DEFAULT_SPM_PATH:
    return seqio.SentencePieceVocabulary(spec)
  if not spec.startswith('gs://') and not os.path.isfile(spec):
    raise FileNotFoundError(
        f'SentencePiece model {spec!r} does not exist (from {VOCABULARY_ENV} or '
        'set_vocabulary); set it to a .model file, to "byte", or unset it for '
        f'T5\'s {DEFAULT_SPM_PATH}.')
  if extra_ids is None:
    extra_ids = int(os.environ.get(EXTRA_IDS_ENV, '0'))
  return seqio.SentencePieceVocabulary(spec, extra_ids=extra_ids)


def describe(vocabulary: seqio.Vocabulary) -> dict:
  """What a run records of its vocabulary: {'kind', 'vocab_size'[, 'extra_ids',
  'pieces', 'sha256', 'source']} (SentencePiece: reads the model)."""
  if isinstance(vocabulary, seqio.ByteVocabulary):
    return {'kind': 'byte', 'vocab_size': vocabulary.vocab_size}
  if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
    return {'kind': type(vocabulary).__name__, 'vocab_size': vocabulary.vocab_size}
  return {'kind': 'sentencepiece', 'vocab_size': vocabulary.vocab_size,
          'pieces': vocabulary.vocab_size - vocabulary.extra_ids,
          'extra_ids': vocabulary.extra_ids,
          'sha256': hashlib.sha256(sp_model_bytes(vocabulary)).hexdigest(),
          'source': vocabulary.sentencepiece_model_file}


def same(a: dict, b: dict) -> bool:
  """Two `describe` records tokenise alike (the model file's path may differ)."""
  keys = ('kind', 'vocab_size', 'extra_ids', 'sha256')
  return all(a.get(k) == b.get(k) for k in keys)


def spoken(record: dict) -> str:
  """'sentencepiece /x/spm.model (2000 pieces + 28 extra ids)' / 'byte (384 ids)'."""
  if record.get('kind') == 'sentencepiece':
    return (f'sentencepiece {record.get("source")} ({record.get("pieces")} pieces + '
            f'{record.get("extra_ids")} extra ids)')
  return f'{record.get("kind")} ({record.get("vocab_size")} ids)'


def sp_model_bytes(vocabulary: seqio.Vocabulary) -> Optional[bytes]:
  """The .model file of a SentencePiece `vocabulary` as given (seqio's `sp_model`
  has the extra ids added); None for other kinds."""
  if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
    return None
  with tf.io.gfile.GFile(vocabulary.sentencepiece_model_file, 'rb') as f:
    return f.read()


class _Current:
  vocabulary: Optional[seqio.Vocabulary] = None


def current() -> seqio.Vocabulary:
  """The vocabulary of the GLUE/SuperGLUE tasks (built once from the env var)."""
  if _Current.vocabulary is None:
    _Current.vocabulary = make_vocabulary(None)
  return _Current.vocabulary


def replace(spec: Union[None, str, seqio.Vocabulary],
            extra_ids: Optional[int] = None) -> seqio.Vocabulary:
  """Makes `spec` the current vocabulary (the caller re-registers the tasks)."""
  _Current.vocabulary = make_vocabulary(spec, extra_ids)
  return _Current.vocabulary


TASK_ID_FEATURE = 'task_id'


def add_task_id(task_id: int):
  """Preprocessor: each example gets `task_id` = [task_id] (int32, length 1).

  A length-1 vector, not a scalar: seqio.Evaluator measures every output
  feature's length, and T5X batches it to [batch, 1].
  """
  @seqio.map_over_dataset
  def fn(ex):
    return dict(ex, **{TASK_ID_FEATURE: tf.constant([task_id], tf.int32)})
  return fn


def register_text_task(name: str, vocabulary: seqio.Vocabulary, *, source: seqio.DataSource,
                       preprocessors, postprocess_fn, metric_fns, task_id: int,
                       num_tasks: int) -> str:
  """(Re-)registers a text-to-text task: `preprocessors`, then tokenize + EOS.

  The task emits its id in its home mixture (`task_id` of `num_tasks`) as the
  output feature `task_id`, so per-task pipelines (T5X, seqio.Evaluator) see it.
  """
  features = {key: seqio.Feature(vocabulary, add_eos=True) for key in ('inputs', 'targets')}
  features[TASK_ID_FEATURE] = seqio.Feature(
      seqio.PassThroughVocabulary(num_tasks), add_eos=False, dtype=tf.int32)
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=list(preprocessors) + [seqio.preprocessors.tokenize,
                                           seqio.preprocessors.append_eos_after_trim,
                                           add_task_id(task_id)],
      output_features=features,
      postprocess_fn=postprocess_fn,
      metric_fns=list(metric_fns))
  return name
