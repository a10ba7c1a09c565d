"""Task ids reach the batch aligned with their examples, through whole mixtures."""
import os
import pathlib

import numpy as np
import pytest

seqio = pytest.importorskip('seqio')
tf = pytest.importorskip('tensorflow')

from hyperprompt_t5x import tasks  # noqa: E402
from hyperprompt_t5x.tasks import demo  # noqa: E402
from hyperprompt_t5x.tasks.feature_converter import TaskIdEncDecFeatureConverter  # noqa: E402

FIXTURES = str(next(p for p in pathlib.Path(__file__).resolve().parents if (p / 'setup.py').is_file())
               / 'tests' / 'data_fixtures')
BYTE = seqio.ByteVocabulary()


@pytest.fixture(scope='module', autouse=True)
def byte_vocabulary(byte_task_vocabulary):
  return byte_task_vocabulary


@pytest.fixture(scope='module')
def glue_dir(shared_data, tmp_path_factory):
  """A small GLUE folder: the real RTE, the heads of the other real dev files (header
  and 6 rows, kept short for speed) and the layout fixtures for QQP, MNLI and QNLI."""
  root = tmp_path_factory.mktemp('glue')
  os.symlink(shared_data / 'glue' / 'RTE', root / 'RTE')
  for folder in ('CoLA', 'SST-2', 'MRPC', 'STS-B'):
    (root / folder).mkdir()
    lines = (shared_data / 'glue' / folder / 'dev.tsv').read_bytes().split(b'\n')
    (root / folder / 'dev.tsv').write_bytes(b'\n'.join(lines[:7]) + b'\n')
  for folder in ('QQP', 'MNLI', 'QNLI'):
    os.symlink(os.path.join(FIXTURES, 'glue', folder), root / folder)
  return root


def _text(row):
  return BYTE.decode([int(i) for i in row])


def test_demo_mixture_task_ids_match_targets():
  names = tasks.task_names('hyperprompt_demo')
  assert names == ['hyperprompt_demo_max', 'hyperprompt_demo_min', 'hyperprompt_demo_has_a']
  ds = tasks.get_dataset('hyperprompt_demo', 'train', {'inputs': 16, 'targets': 4},
                         batch_size=32, shuffle=True, seed=3)
  seen = set()
  for batch in ds.take(6).as_numpy_iterator():
    assert batch['task_ids'].shape == (32,) and batch['task_ids'].dtype == np.int32
    assert batch['encoder_input_tokens'].shape == (32, 16)
    assert batch['decoder_target_tokens'].shape == (32, 4)
    targets = batch['decoder_target_tokens']
    np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 0], 0)
    np.testing.assert_array_equal(batch['decoder_input_tokens'][:, 1:], targets[:, :-1])
    np.testing.assert_array_equal(batch['decoder_loss_weights'], targets != 0)
    for inp, tgt, tid in zip(batch['encoder_input_tokens'], targets, batch['task_ids']):
      word = _text(inp)
      task = names[tid][len(demo.PREFIX):]
      assert _text(tgt) == demo.TARGET_FNS[task](word), (word, task)
      seen.add(int(tid))
  assert seen == {0, 1, 2}


def test_glue_mixture_task_ids_match_inputs(glue_dir):
  tasks.set_data_dirs(glue_dir=glue_dir)
  names = tasks.task_names('hyperprompt_glue')
  prefixes = [n[len('hyperprompt_glue_'):] + ' ' for n in names]
  ds = tasks.get_dataset('hyperprompt_glue', 'validation', {'inputs': 24, 'targets': 8},
                         batch_size=128, shuffle=True, seed=0, num_epochs=1)
  counts = np.zeros(len(names), int)
  for batch in ds.as_numpy_iterator():
    for inp, tid in zip(batch['encoder_input_tokens'], batch['task_ids']):
      assert _text(inp).startswith(prefixes[tid]), (_text(inp), names[tid])
      counts[tid] += 1
  # One epoch: every dev row of every task once (CoLA's file has no header).
  files = ['CoLA/dev.tsv', 'SST-2/dev.tsv', 'MRPC/dev.tsv', 'QQP/dev.tsv', 'STS-B/dev.tsv',
           'MNLI/dev_matched.tsv', 'QNLI/dev.tsv', 'RTE/dev.tsv']
  rows = [len((glue_dir / f).read_text(encoding='utf-8-sig').splitlines()) - (f[:4] != 'CoLA')
          for f in files]
  assert counts.tolist() == rows


def test_eval_datasets_cover_every_example_with_its_id(glue_dir, shared_data):
  tasks.set_data_dirs(glue_dir=glue_dir)
  evals = tasks.get_eval_datasets('hyperprompt_glue', 'validation',
                                  {'inputs': 32, 'targets': 16}, batch_size=64)
  by_name = {e.name: e for e in evals}
  assert [e.name for e in evals] == [
      'hyperprompt_glue_cola', 'hyperprompt_glue_sst2', 'hyperprompt_glue_mrpc',
      'hyperprompt_glue_qqp', 'hyperprompt_glue_stsb', 'hyperprompt_glue_mnli_matched',
      'hyperprompt_glue_mnli_mismatched', 'hyperprompt_glue_qnli', 'hyperprompt_glue_rte']
  assert by_name['hyperprompt_glue_mnli_matched'].task_id == 5
  assert by_name['hyperprompt_glue_mnli_mismatched'].task_id == 5
  rte = by_name['hyperprompt_glue_rte']
  assert rte.task_id == 7
  rows = (shared_data / 'glue' / 'RTE' / 'dev.tsv').read_text().count('\n') - 1
  assert [e.num_examples for e in evals] == [7, 6, 6, 2, 6, 2, 1, 1, 277]
  assert rte.num_examples == len(rte.targets) == rows == 277
  ids = np.concatenate([b['task_ids'] for b in rte.dataset.as_numpy_iterator()])
  assert ids.shape == (rows,) and set(ids.tolist()) == {7}
  # Targets are postprocessed labels in file order: the first dev row is not_entailment.
  assert rte.targets[0] == 1
  # Decoding the targets and scoring them gives 100.
  tgt = np.concatenate([b['decoder_target_tokens'] for b in rte.dataset.as_numpy_iterator()])
  texts = tasks.decode_predictions('hyperprompt_glue_rte', tgt)
  assert tasks.compute_metrics(rte.name, rte.targets, texts) == {'accuracy': 100.0}


def test_standalone_task_has_id_zero():
  ds = tasks.get_dataset('hyperprompt_demo_min', 'validation', {'inputs': 16, 'targets': 4},
                         batch_size=16, shuffle=False, num_epochs=1)
  batches = list(ds.as_numpy_iterator())
  assert sum(len(b['task_ids']) for b in batches) == demo.SPLIT_SIZES['validation']
  assert all((b['task_ids'] == 0).all() for b in batches)


def test_converter_rejects_missing_task_id():
  ds = tf.data.Dataset.from_tensors({'inputs': tf.constant([5, 1]), 'targets': tf.constant([6, 1])})
  with pytest.raises(ValueError, match='task_id'):
    TaskIdEncDecFeatureConverter()(ds, {'inputs': 4, 'targets': 4})


def test_converter_pads_and_keeps_task_id():
  ds = tf.data.Dataset.from_tensors({'inputs': tf.constant([5, 6, 1]), 'targets': tf.constant([7, 1]),
                                     'task_id': tf.constant([4], tf.int32)})
  out = next(TaskIdEncDecFeatureConverter()(ds, {'inputs': 5, 'targets': 3}).as_numpy_iterator())
  np.testing.assert_array_equal(out['encoder_input_tokens'], [5, 6, 1, 0, 0])
  np.testing.assert_array_equal(out['decoder_target_tokens'], [7, 1, 0])
  np.testing.assert_array_equal(out['decoder_input_tokens'], [0, 7, 1])
  np.testing.assert_array_equal(out['decoder_loss_weights'], [1, 1, 0])
  assert out['task_ids'] == 4


@pytest.mark.parametrize('pack', [False, True])
def test_converter_refuses_task_ids_outside_the_models_tasks(pack):
  """A lone task of a larger mixture brings its home id (RTE: 7 in GLUE); a model of
  NUM_TASKS=1 must stop on it, not gather a missing conditioning row."""
  rows = [{'inputs': tf.constant([5, 6, 1]), 'targets': tf.constant([7, 1]),
           'task_id': tf.constant([task_id], tf.int32)} for task_id in (0, 7)]
  ds = tf.data.Dataset.from_tensor_slices({k: tf.stack([r[k] for r in rows]) for k in rows[0]})
  lengths = {'inputs': 16, 'targets': 4}
  fits = TaskIdEncDecFeatureConverter(pack=pack, num_tasks=8)(ds, lengths)
  assert sorted(int(r['task_ids']) for r in fits.as_numpy_iterator()) == [0, 7]
  with pytest.raises(tf.errors.OpError, match=r'task id out of range \[0, num_tasks=1\)'):
    list(TaskIdEncDecFeatureConverter(pack=pack, num_tasks=1)(ds, lengths).as_numpy_iterator())


def test_super_glue_eval_scores_decoded_targets_100(shared_data, tmp_path):
  """Every SuperGLUE eval set (real CB/COPA/RTE/WiC, fixtures for the rest): decoded
  target tokens scored as predictions give 100 on every metric, ids 0..7 in order."""
  for folder in ('CB', 'COPA', 'RTE', 'WiC'):
    os.symlink(shared_data / 'super_glue' / folder, tmp_path / folder)
  for folder in ('BoolQ', 'MultiRC', 'ReCoRD', 'WSC'):
    os.symlink(os.path.join(FIXTURES, 'super_glue', folder), tmp_path / folder)
  tasks.set_data_dirs(super_glue_dir=tmp_path)
  evals = tasks.get_eval_datasets('hyperprompt_super_glue', 'validation',
                                  {'inputs': 48, 'targets': 16}, batch_size=64)
  assert [e.task_id for e in evals] == list(range(8))
  # ReCoRD is scored once per query (2), not once per answer (3).
  assert {e.name: e.num_examples for e in evals}['hyperprompt_super_glue_record'] == 2
  for e in evals:
    batches = list(e.dataset.as_numpy_iterator())
    assert all((b['task_ids'] == e.task_id).all() for b in batches)
    tgt = np.concatenate([b['decoder_target_tokens'] for b in batches])
    results = tasks.compute_metrics(e.name, e.targets, tasks.decode_predictions(e.name, tgt))
    assert results and all(v == 100.0 for v in results.values()), (e.name, results)


def test_same_seed_same_batches():
  """A resumed run relies on this: the seeded training stream repeats exactly."""
  def first(seed):
    ds = tasks.get_dataset('hyperprompt_demo', 'train', {'inputs': 8, 'targets': 2},
                           batch_size=16, shuffle=True, seed=seed)
    return [b['encoder_input_tokens'].tolist() + b['task_ids'].tolist()
            for b in ds.take(3).as_numpy_iterator()]
  seven = first(7)
  assert first(7) == seven
  assert first(8) != seven


def test_each_task_emits_its_home_mixture_id():
  """Per-task pipelines (T5X, seqio.Evaluator) get the id from the task itself."""
  import seqio
  from hyperprompt_t5x.tasks import mixtures
  for name in ('hyperprompt_demo_min', 'hyperprompt_demo_has_a'):
    ex = next(seqio.get_mixture_or_task(name).get_dataset(
        {'inputs': 8, 'targets': 2}, split='validation', shuffle=False).as_numpy_iterator())
    assert ex['task_id'].tolist() == [mixtures.task_id(mixtures.DEMO, name)]
  assert glue_home_ids() == {'hyperprompt_glue_mnli_matched': 5, 'hyperprompt_glue_rte': 7,
                             'hyperprompt_glue_wnli': 0, 'hyperprompt_glue_cola': 0}


def glue_home_ids():
  from hyperprompt_t5x.tasks import glue
  names = ('mnli_matched', 'rte', 'wnli', 'cola')
  return {glue.PREFIX + n: glue.home_task_id(n) for n in names}
