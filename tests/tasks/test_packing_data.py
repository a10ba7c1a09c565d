"""Packed training rows (tasks/packing.py): seqio's features, one task per row, the
mixture's proportions per example, prompt slots, and a resumable stream."""
import collections
import io
import json
import pathlib
import re
import signal
import sys

import numpy as np
import pytest

seqio = pytest.importorskip('seqio')
tf = pytest.importorskip('tensorflow')

from hyperprompt_t5x import tasks  # noqa: E402
from hyperprompt_t5x.cli import commands  # noqa: E402
from hyperprompt_t5x.run import metrics_logging  # noqa: E402
from hyperprompt_t5x.tasks import packing  # noqa: E402
from hyperprompt_t5x.tasks.feature_converter import TaskIdEncDecFeatureConverter  # noqa: E402
from hyperprompt_t5x.training import train_data  # noqa: E402

REPO = next(p for p in pathlib.Path(__file__).resolve().parents if (p / 'setup.py').is_file())
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
from bench import kill_harness  # noqa: E402


@pytest.fixture(scope='module', autouse=True)
def real_glue(byte_task_vocabulary, shared_data):
  tasks.set_data_dirs(glue_dir=shared_data / 'glue', super_glue_dir=shared_data / 'super_glue')
  return byte_task_vocabulary


# Real GLUE files of very different lengths (bytes): CoLA ~40, RTE ~350, MRPC/STS-B ~100-200.
SOURCES = [('hyperprompt_glue_cola', 'validation', 8551), ('hyperprompt_glue_rte', 'train', 2490),
           ('hyperprompt_glue_mrpc', 'train', 3668), ('hyperprompt_glue_stsb', 'train', 5749)]


def _examples(lengths, seed=0, **kw):
  return tasks.mix_examples([(n, s) for n, s, _ in SOURCES], [r for _, _, r in SOURCES],
                            lengths, seed=seed, **kw)


def test_rows_are_seqio_packed_rows_with_task_ids():
  """One task: exactly the rows of seqio.EncDecFeatureConverter(pack=True), plus task_ids."""
  lengths = {'inputs': 256, 'targets': 8}
  rows = packing.row_lengths(lengths)
  assert rows == {'inputs': 256, 'targets': 32}
  task = seqio.get_mixture_or_task('hyperprompt_glue_cola')
  ds = task.get_dataset(lengths, split='validation', shuffle=False, use_cached=False).take(60)
  ours = list(TaskIdEncDecFeatureConverter(pack=True, bins=1)(ds, lengths).as_numpy_iterator())
  plain = ds.map(lambda ex: {'inputs': ex['inputs'], 'targets': ex['targets']})
  theirs = list(seqio.EncDecFeatureConverter(pack=True)(plain, rows).as_numpy_iterator())
  assert len(ours) == len(theirs) and 10 < len(ours) < 60  # several examples per row
  for a, b in zip(ours, theirs):
    assert set(a) == set(b) | {'task_ids'} and a['task_ids'] == 0
    for k in b:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_rows_are_single_task_and_keep_every_example():
  lengths = {'inputs': 512, 'targets': 16}
  stream = list(_examples(lengths).take(300).as_numpy_iterator())
  packer = packing.TaskPacker(lengths)
  rows = list(packer.pack((ex['inputs'], ex['targets'], ex['task_id'][0]) for ex in stream))
  by_task = collections.defaultdict(list)
  for ex in stream:
    by_task[int(ex['task_id'][0])].append((ex['inputs'].tolist(), ex['targets'].tolist()))
  unpacked = collections.defaultdict(list)
  for row in rows:
    for seg in range(1, row['encoder_segment_ids'].max() + 1):
      enc = row['encoder_input_tokens'][row['encoder_segment_ids'] == seg]
      tgt = row['decoder_target_tokens'][row['decoder_segment_ids'] == seg]
      unpacked[int(row['task_ids'])].append((enc.tolist(), tgt.tolist()))
  # Every example once, in its task's row; several rows open per task may reorder a task's
  # examples, so compare as multisets.
  assert {t: sorted(v) for t, v in unpacked.items()} == {t: sorted(v) for t, v in by_task.items()}


def test_each_tasks_share_of_trained_examples_is_the_mixtures():
  """Over 10,000 examples, per example (not per row), within 2 percentage points."""
  lengths = {'inputs': 512, 'targets': 16}
  n = 10_000
  chunks = _examples(lengths).take(n + 2000).map(
      lambda ex: dict(ex, n_in=tf.size(ex['inputs']), n_tgt=tf.size(ex['targets'])))
  stream = [(c['inputs'][i, :c['n_in'][i]], c['targets'][i, :c['n_tgt'][i]], int(t))
            for c in chunks.padded_batch(1000).as_numpy_iterator()
            for i, t in enumerate(c['task_id'][:, 0])]
  unpacked = collections.Counter(t for _, _, t in stream[:n])
  packed, rows, total = collections.Counter(), collections.Counter(), 0
  for row in packing.TaskPacker(lengths).pack(stream):  # the converter's rows, in order
    count = int(row['encoder_segment_ids'].max())
    packed[int(row['task_ids'])] += count
    rows[int(row['task_ids'])] += 1
    total += count
    if total >= n:
      break
  num_rows = sum(rows.values())
  for task_id in range(len(SOURCES)):
    share = packed[task_id] / total
    assert abs(share - unpacked[task_id] / n) < 0.02, (task_id, share, unpacked)
  # Rows alone would not do: short CoLA examples share rows, long RTE ones do not.
  assert rows[0] / num_rows < packed[0] / total - 0.1
  assert rows[1] / num_rows > packed[1] / total + 0.1


def test_prompt_tuning_reserves_prompt_positions_per_example():
  lengths = {'inputs': 64, 'targets': 8}
  packer = packing.TaskPacker(lengths, reserve=3, bins=1)
  rows = list(packer.pack([(np.array([7, 8, 1]), np.array([5, 1]), 2),
                           (np.array([9, 1]), np.array([6, 1]), 2)]))
  assert len(rows) == 1
  row = rows[0]
  np.testing.assert_array_equal(row['encoder_input_tokens'][:10], [0, 0, 0, 7, 8, 1, 0, 0, 0, 9])
  np.testing.assert_array_equal(row['encoder_segment_ids'][:12], [1] * 6 + [2] * 5 + [0])
  np.testing.assert_array_equal(row['encoder_positions'][:11], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4])
  np.testing.assert_array_equal(row['decoder_input_tokens'][:5], [0, 5, 0, 6, 0])
  assert row['task_ids'] == 2
  # An example longer than the row keeps the reserved slots and loses its tail.
  long = list(packing.TaskPacker(lengths, reserve=3).pack([(np.arange(2, 80), np.array([1]), 0)]))
  assert (long[0]['encoder_segment_ids'] == 1).all()
  np.testing.assert_array_equal(long[0]['encoder_input_tokens'][:4], [0, 0, 0, 2])
  with pytest.raises(ValueError, match='reserved prompt positions'):
    packing.TaskPacker({'inputs': 4, 'targets': 4}, reserve=4)


def test_resumed_stream_skips_to_the_same_packed_batches():
  """What a restart does (train_data.train_batches with skip): the same rows as before."""
  lengths = {'inputs': 128, 'targets': 8}
  whole = train_data.train_batches('hyperprompt_demo', lengths, 8, seed=3, skip=0, pack=True)
  first = [next(whole) for _ in range(5)]
  resumed = train_data.train_batches('hyperprompt_demo', lengths, 8, seed=3, skip=3, pack=True)
  for want in first[3:]:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert 'encoder_segment_ids' in first[0] and first[0]['encoder_segment_ids'].max() > 1


def test_batch_counts_examples_and_fill():
  lengths = {'inputs': 16, 'targets': 4}
  rows = list(packing.TaskPacker(lengths, bins=1).pack(
      [(np.array([3, 1]), np.array([4, 1]), 0), (np.array([5, 6, 1]), np.array([1]), 0),
       (np.array([7, 1]), np.array([8, 1]), 1)]))
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  # 3 examples; inputs 7 of 32 positions, targets 5 of 2 x row targets (max(4, 16 // 8)).
  np.testing.assert_array_equal(metrics_logging.batch_counts(batch), [3, 7, 32, 5, 8])
  unpacked = {'encoder_input_tokens': np.array([[3, 1, 0, 0]]),
              'decoder_target_tokens': np.array([[4, 1]])}
  np.testing.assert_array_equal(metrics_logging.batch_counts(unpacked), [1, 2, 4, 2, 2])


PACKED_DEMO = ('--gin.PACK=True', "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 2}")


def test_kill_9_and_rerun_trains_on_the_same_packed_examples(tmp_path, compilation_cache,
                                                              capsys):
  """`train` with PACK=True killed (SIGKILL) after a checkpoint, then rerun: the same
  parameters and losses as an uninterrupted run (the resumed stream skips packed batches)."""
  steps, save = 6, 2
  reference = tmp_path / 'reference'
  assert commands.main(kill_harness.demo_args(reference, *PACKED_DEMO, steps=steps,
                                              save=save)) == 0
  records = [r for _, r in kill_harness.metrics_by_kind(reference)['train']]
  assert all(r['examples_per_sec'] > 0 and 0 < r['input_fill'] <= 1 for r in records)
  model_dir = tmp_path / 'killed'
  args = kill_harness.demo_args(model_dir, *PACKED_DEMO, steps=steps, save=save)
  attempt = kill_harness.Attempt(args, model_dir, kill_harness.subprocess_env(compilation_cache))
  assert attempt.wait_until(lambda: (attempt.last_step() or 0) >= 3, 600), attempt.output()
  attempt.signal(signal.SIGKILL)
  assert attempt.finish() == -signal.SIGKILL
  capsys.readouterr()
  assert commands.main(args) == 0
  resumed = re.search(r'^Starting at step (\d+)', capsys.readouterr().out, re.M)
  assert resumed and 2 <= int(resumed.group(1)) < steps, resumed
  comparison = kill_harness.compare_runs(reference, model_dir, steps)
  assert comparison['params_identical'] and comparison['problems'] == [], comparison


def test_train_records_count_real_examples_and_fill(tmp_path):
  """examples_per_sec counts examples (all processes: this one's shard x their number);
  the fills are the window's; the progress line shows both."""
  lengths = {'inputs': 16, 'targets': 4}
  rows = list(packing.TaskPacker(lengths, bins=1).pack(
      [(np.array([3, 1]), np.array([4, 1]), 0), (np.array([5, 6, 1]), np.array([1]), 0),
       (np.array([7, 1]), np.array([8, 1]), 1)]))
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}  # 3 examples in 2 rows
  stream = io.StringIO()
  logger = metrics_logging.MetricsLogger(str(tmp_path), tensorboard=False, stream=stream)
  log = metrics_logging.TrainLog(logger, schedule=lambda step: 0.1, start_step=0,
                                 total_steps=10, tokens_per_step=2 * (16 + 4),
                                 num_processes=2)
  for _ in range(2):
    log.count(batch)
  log.record(2, [(0, {'loss': 1.0}), (1, {'loss': 3.0})])
  record = json.loads((tmp_path / 'metrics.jsonl').read_text().splitlines()[-1])
  # 2 steps x 3 examples x 2 processes over the window's seconds (= 2 steps / steps_per_sec).
  assert record['examples_per_sec'] == pytest.approx(6 * record['steps_per_sec'])
  assert record['input_fill'] == pytest.approx(7 / 32)
  assert record['target_fill'] == pytest.approx(5 / 8)
  line = stream.getvalue().strip()
  assert ' ex/s  fill 22%/62%  ETA ' in line and len(line) <= 80, line


@pytest.mark.parametrize('method, reserved', [('prompt_tuning', 3), ('global', 0)])
def test_t5x_models_converter_reserves_prompt_tuning_slots(method, reserved):
  """T5X builds FEATURE_CONVERTER_CLS(pack=cfg.pack): packed prompt tuning reserves
  PROMPT_LENGTH slots per example, other methods none; unpacked rows are unchanged."""
  pytest.importorskip('t5x', reason='t5x not importable')
  from t5x import optimizers as t5x_optimizers  # pylint: disable=g-import-not-at-top
  from hyperprompt_t5x.model import network  # pylint: disable=g-import-not-at-top
  from hyperprompt_t5x.t5x_adapter import t5x_model  # pylint: disable=g-import-not-at-top
  config = network.T5Config.from_size('tiny', method=method, num_tasks=3, prompt_length=3)
  vocab = seqio.PassThroughVocabulary(config.vocab_size, eos_id=1)  # ids = the model's rows
  model = t5x_model.HyperPromptEncoderDecoderModel(network.Transformer(config), vocab, vocab,
                                                   t5x_optimizers.sgd(0.1))
  ds = tf.data.Dataset.from_tensors({'inputs': tf.constant([5, 6, 1]),
                                     'targets': tf.constant([7, 1]),
                                     'task_id': tf.constant([2], tf.int32)}).repeat(2)
  lengths = {'inputs': 32, 'targets': 4}
  row = next(model.FEATURE_CONVERTER_CLS(pack=True, use_custom_packing_ops=False)(
      ds, lengths).as_numpy_iterator())
  first = [0] * reserved + [5, 6, 1]
  np.testing.assert_array_equal(row['encoder_input_tokens'][:2 * len(first)], first * 2)
  np.testing.assert_array_equal(row['encoder_positions'][:len(first)], range(len(first)))
  assert row['task_ids'] == 2 and row['decoder_target_tokens'].shape == (4,)
  unpacked = next(model.FEATURE_CONVERTER_CLS(pack=False)(ds, lengths).as_numpy_iterator())
  np.testing.assert_array_equal(unpacked['encoder_input_tokens'][:4], [5, 6, 1, 0])
  assert 'encoder_segment_ids' not in unpacked
