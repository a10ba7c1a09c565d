"""seqio GLUE / SuperGLUE / demo tasks with task ids, for HyperPrompt.

Importing `hyperprompt_t5x.tasks` registers with seqio (imports TensorFlow):

* tasks `hyperprompt_glue_<t>`, t in cola, sst2, mrpc, qqp, stsb, mnli, qnli,
  rte, wnli, and the MNLI eval tasks `hyperprompt_glue_mnli_matched` /
  `hyperprompt_glue_mnli_mismatched` (split `validation`);
  `hyperprompt_super_glue_<t>`, t in boolq, cb, copa, multirc, record, rte,
  wic, wsc; `hyperprompt_demo_<t>`, t in max, min, has_a (see demo.py);
* mixtures `hyperprompt_glue` (8 GLUE training tasks, no WNLI),
  `hyperprompt_super_glue` (8 tasks), `hyperprompt_demo` (3 tasks),
  `hyperprompt_demo_conflict` (6 tasks that conflict on the same inputs).

Task ids. `task_names(name) -> list[str]` is a mixture's fixed task order;
the task id of a task is its index there (a single task: `[name]`, id 0).
`num_tasks = len(task_names(name))`. Ids are attached by `get_dataset` /
`get_eval_datasets` from the mixture asked for; MNLI's eval tasks get MNLI's
id. Unknown names raise ValueError listing the registered ones.

Trainer interface::

  get_dataset(mixture_or_task_name, split, task_feature_lengths, batch_size,
              shuffle=True, seed=None, shard_id=0, num_shards=1,
              num_epochs=None, drop_remainder=None) -> tf.data.Dataset
      batches {encoder_input_tokens [B, Li], decoder_target_tokens [B, Lt],
      decoder_input_tokens [B, Lt], decoder_loss_weights [B, Lt], task_ids [B]}
      (int32); task_feature_lengths = {'inputs': Li, 'targets': Lt};
      drop_remainder defaults to split == 'train'; num_epochs None = forever.
  get_eval_datasets(mixture_or_task_name, split, task_feature_lengths,
                    batch_size) -> list[EvalDataset(name, task_id, dataset,
                    targets, inputs, num_examples)]
      unshuffled, all examples (last batch short); targets postprocessed.
  decode_predictions(mixture_or_task_name, token_ids [B, L]) -> list[str]
  compute_metrics(task_name, targets, predictions_text) -> {metric: float}
      (percent; invalid predictions count as wrong).
  get_vocabulary(mixture_or_task_name=None) -> seqio.Vocabulary
      the very object the tasks tokenize with (demo: its ByteVocabulary).
  set_vocabulary(spec, extra_ids=None) -> seqio.Vocabulary
      spec: a seqio.Vocabulary, 'byte', a SentencePiece .model path, or None
      (env var HYPERPROMPT_VOCABULARY, unset = T5's
      gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model);
      extra_ids: sentinels added to a .model (None: HYPERPROMPT_VOCABULARY_EXTRA_IDS);
      re-registers the GLUE/SuperGLUE tasks and the mixtures.
  shares_vocabulary(name) -> bool   (False for the demo mixtures: their own bytes)
  use_vocabulary(name, vocabulary_file=None, extra_ids=None)   (T5X's gin)
  set_data_dirs(glue_dir=None, super_glue_dir=None)
      offline folders (else env vars HYPERPROMPT_GLUE_DIR /
      HYPERPROMPT_SUPER_GLUE_DIR; else TFDS glue/<t>, super_glue/<t>).
      GLUE: download_glue_data.py layout (CoLA/dev.tsv, MNLI/dev_matched.tsv,
      ...); SuperGLUE: <Task>/{train,val,test}.jsonl.
  set_temperature(t)  mixing rates = train size ** (1 / t).
  get_dataset(..., pack=True, prompt_positions=0): packed training rows, one
      task per row, plus encoder/decoder_segment_ids and _positions (packing.py).
  mix_examples(task_splits, weights, task_feature_lengths, ...) and
  batch_examples(examples, task_feature_lengths, batch_size, drop_remainder, pack)
      the two halves of get_dataset, for any (task, split) list.
  feature_converter.TaskIdEncDecFeatureConverter  (T5X's FEATURE_CONVERTER_CLS).
"""
from typing import Optional, Union

import seqio

from . import demo
from . import glue
from . import mixtures
from . import super_glue
from . import vocab
from .feature_converter import TaskIdEncDecFeatureConverter
from .free_text import format_inputs, text_fields
from .mixtures import eval_task_names, set_temperature, task_id, task_names
from .pipeline import (EvalDataset, batch_examples, compute_metrics, decode_predictions,
                       get_dataset, get_eval_datasets, get_examples, mix_examples)
from .sources import (DataFormatError, GLUE_DIR_ENV, SUPER_GLUE_DIR_ENV, set_data_dirs)
from .vocab import DEFAULT_SPM_PATH, VOCABULARY_ENV

MIXTURES = tuple(mixtures.MIXTURE_TASKS)


def register_all() -> None:
  """(Re-)registers every task and mixture with the current vocabulary."""
  vocabulary = vocab.current()
  glue.register(vocabulary)
  super_glue.register(vocabulary)
  demo.register()
  mixtures.register()


def get_vocabulary(mixture_or_task_name: Optional[str] = None) -> seqio.Vocabulary:
  """The vocabulary object of a mixture/task (default: the GLUE/SuperGLUE one)."""
  if mixture_or_task_name is None:
    return vocab.current()
  first = seqio.get_mixture_or_task(task_names(mixture_or_task_name)[0])
  return first.output_features['targets'].vocabulary


def set_vocabulary(spec: Union[None, str, seqio.Vocabulary],
                   extra_ids: Optional[int] = None) -> seqio.Vocabulary:
  """Makes `spec` the GLUE/SuperGLUE vocabulary and re-registers; returns it."""
  vocabulary = vocab.replace(spec, extra_ids)
  register_all()
  return vocabulary


def shares_vocabulary(mixture_or_task_name: str) -> bool:
  """Whether the mixture tokenises with the GLUE/SuperGLUE vocabulary (set_vocabulary's)."""
  return get_vocabulary(mixture_or_task_name) is vocab.current()


def use_vocabulary(mixture_or_task_name: str, vocabulary_file: Optional[str] = None,
                   extra_ids: Optional[int] = None) -> seqio.Vocabulary:
  """The mixture's vocabulary, after making `vocabulary_file` (a SentencePiece .model
  or 'byte'; None: HYPERPROMPT_VOCABULARY, else T5's) the GLUE/SuperGLUE one.

  For T5X's gin (gin/t5x/model.gin: VOCABULARY_FILE, VOCABULARY_EXTRA_IDS), so a
  T5X run's vocabulary is in its config.gin.
  """
  if vocabulary_file is not None:
    set_vocabulary(vocabulary_file, extra_ids)
  return get_vocabulary(mixture_or_task_name)


register_all()
