"""GLUE/SuperGLUE tasks build from the real files, the fixtures, and TFDS mock data.

Expected strings are written by hand from each file's first row in T5's format.
"""
import json
import pathlib

import pytest

seqio = pytest.importorskip('seqio')
tfds = pytest.importorskip('tensorflow_datasets')

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from hyperprompt_t5x import tasks  # noqa: E402

FIXTURES = (next(p for p in pathlib.Path(__file__).resolve().parents if (p / 'setup.py').is_file())
            / 'tests' / 'data_fixtures')
LENGTHS = {'inputs': 4096, 'targets': 32}


@pytest.fixture(scope='module', autouse=True)
def byte_vocabulary(byte_task_vocabulary):
  return byte_task_vocabulary


def _dataset(name, split):
  task = seqio.get_mixture_or_task(name)
  return task.get_dataset(LENGTHS, split=split, shuffle=False, use_cached=False, num_epochs=1)


def _examples(name, split):
  return list(_dataset(name, split).as_numpy_iterator())


@tf.autograph.experimental.do_not_convert
def _count(ds):
  """Counts in graph mode (iterating thousands of examples in Python is slow)."""
  return int(ds.reduce(np.int64(0), lambda n, _: n + 1))


def _check_first(ds, inputs, targets):
  first = next(ds.take(1).as_numpy_iterator())
  assert first['inputs_pretokenized'].decode() == inputs
  assert first['targets_pretokenized'].decode() == targets
  vocab = tasks.get_vocabulary()
  # Tokenized with EOS (id 1) at the end, and decodes back to the same strings.
  assert first['targets'][-1] == 1 and first['inputs'][-1] == 1
  assert vocab.decode(first['targets'].tolist()) == targets
  assert vocab.decode(first['inputs'].tolist()) == inputs


def _tsv_rows(path, header=True):
  lines = [l for l in path.read_text(encoding='utf-8-sig').split('\n') if l.strip()]
  return len(lines) - (1 if header else 0)


def _jsonl_rows(path):
  return sum(1 for l in path.read_text().splitlines() if l.strip())


REAL_GLUE = [
    ('rte', 'train', 'RTE/train.tsv',
     'rte sentence1: No Weapons of Mass Destruction Found in Iraq Yet. sentence2: Weapons of '
     'Mass Destruction Found in Iraq.', 'not_entailment'),
    ('rte', 'validation', 'RTE/dev.tsv',
     'rte sentence1: Dana Reeve, the widow of the actor Christopher Reeve, has died of lung '
     'cancer at age 44, according to the Christopher Reeve Foundation. sentence2: Christopher '
     'Reeve had an accident.', 'not_entailment'),
    ('cola', 'validation', 'CoLA/dev.tsv',
     'cola sentence: The sailors rode the breeze clear of the rocks.', 'acceptable'),
    ('mrpc', 'train', 'MRPC/train.tsv',
     'mrpc sentence1: Amrozi accused his brother, whom he called "the witness", of deliberately '
     'distorting his evidence. sentence2: Referring to him as only "the witness", Amrozi accused '
     'his brother of deliberately distorting his evidence.', 'equivalent'),
    ('mrpc', 'validation', 'MRPC/dev.tsv',
     'mrpc sentence1: He said the foodservice pie business doesn\'t fit the company\'s long-term '
     'growth strategy. sentence2: "The foodservice pie business does not fit our long-term '
     'growth strategy.', 'equivalent'),
    ('stsb', 'train', 'STS-B/train.tsv',
     'stsb sentence1: A plane is taking off. sentence2: An air plane is taking off.', '5.0'),
    ('stsb', 'validation', 'STS-B/dev.tsv',
     'stsb sentence1: A man with a hard hat is dancing. sentence2: A man wearing a hard hat is '
     'dancing.', '5.0'),
    ('wnli', 'train', 'WNLI/train.tsv',
     'wnli sentence1: I stuck a pin through a carrot. When I pulled the pin out, it had a hole. '
     'sentence2: The carrot had a hole.', 'entailment'),
    ('wnli', 'validation', 'WNLI/dev.tsv',
     'wnli sentence1: The drain is clogged with hair. It has to be cleaned. sentence2: The hair '
     'has to be cleaned.', 'not_entailment'),
    ('sst2', 'validation', 'SST-2/dev.tsv',
     "sst2 sentence: it 's a charming and often affecting journey . ", 'positive'),
]


@pytest.mark.parametrize('task,split,path,inputs,targets', REAL_GLUE,
                         ids=[f'{t}-{s}' for t, s, *_ in REAL_GLUE])
def test_glue_real_files(shared_data, task, split, path, inputs, targets):
  tasks.set_data_dirs(glue_dir=shared_data / 'glue')
  ds = _dataset(f'hyperprompt_glue_{task}', split)
  assert _count(ds) == _tsv_rows(shared_data / 'glue' / path, header=task != 'cola')
  _check_first(ds, inputs, targets)


def test_stsb_rounds_to_fifth(shared_data):
  tasks.set_data_dirs(glue_dir=shared_data / 'glue')
  second = list(_dataset('hyperprompt_glue_stsb', 'train').take(2).as_numpy_iterator())[1]
  # 3.800 -> "3.8"
  assert second['targets_pretokenized'].decode() == '3.8'


REAL_SUPER_GLUE = [
    ('cb', 'train', 'CB/train.jsonl',
     'cb hypothesis: the language was peeled down premise: It was a complex language. Not '
     'written down but handed down. One might say it was peeled down.', 'entailment'),
    ('cb', 'validation', 'CB/val.jsonl',
     "cb hypothesis: Valence was helping premise: Valence the void-brain, Valence the virtuous "
     "valet. Why couldn't the figger choose his own portion of titanic anatomy to shaft? Did he "
     "think he was helping?", 'contradiction'),
    ('copa', 'train', 'COPA/train.jsonl',
     'copa choice1: The sun was rising. choice2: The grass was cut. premise: My body cast a '
     'shadow over the grass. question: cause', 'choice1'),
    ('copa', 'validation', 'COPA/val.jsonl',
     'copa choice1: The toilet filled with water. choice2: Water flowed from the spout. '
     'premise: The man turned on the faucet. question: effect', 'choice2'),
    ('rte', 'validation', 'RTE/val.jsonl',
     'rte hypothesis: Christopher Reeve had an accident. premise: Dana Reeve, the widow of the '
     'actor Christopher Reeve, has died of lung cancer at age 44, according to the Christopher '
     'Reeve Foundation.', 'not_entailment'),
    ('wic', 'validation', 'WiC/val.jsonl',
     'wic sentence1: An emerging professional class. sentence2: Apologizing for losing your '
     'temper, even though you were badly provoked, showed real class. word: class', 'False'),
]


@pytest.mark.parametrize('task,split,path,inputs,targets', REAL_SUPER_GLUE,
                         ids=[f'{t}-{s}' for t, s, *_ in REAL_SUPER_GLUE])
def test_super_glue_real_files(shared_data, task, split, path, inputs, targets):
  tasks.set_data_dirs(super_glue_dir=shared_data / 'super_glue')
  ds = _dataset(f'hyperprompt_super_glue_{task}', split)
  assert _count(ds) == _jsonl_rows(shared_data / 'super_glue' / path)
  _check_first(ds, inputs, targets)


FIXTURE_TASKS = [
    ('glue_qqp', 'train', 3, 'qqp question1: How do I learn to cook rice? question2: What is the '
     'best way to cook rice?', 'duplicate'),
    ('glue_qqp', 'validation', 2, 'qqp question1: Is tea healthier than coffee? question2: Is '
     'coffee healthier than tea?', 'not_duplicate'),
    ('glue_mnli', 'train', 3, 'mnli hypothesis: A cat is sitting. premise: The cat sat on the '
     'mat.', 'entailment'),
    ('glue_mnli_matched', 'validation', 2, 'mnli hypothesis: Animals are outside. premise: Two '
     'dogs play in the snow.', 'entailment'),
    ('glue_mnli_mismatched', 'validation', 1, 'mnli hypothesis: The report was written in May. '
     'premise: The report was long.', 'neutral'),
    ('glue_qnli', 'train', 2, 'qnli question: When was the bridge built? sentence: The bridge was '
     'built in 1890 by local workers.', 'entailment'),
    ('super_glue_boolq', 'train', 2, 'boolq passage: The Moon is smaller than the Earth. '
     'question: is the moon bigger than the earth', 'False'),
    # MultiRC: one example per answer (5), markup removed.
    ('super_glue_multirc', 'train', 5, 'multirc question: What color is the bike? answer: Red '
     'paragraph: Sent 1: Tom has a red bike. Sent 2: He rides it to school.', 'True'),
    # ReCoRD: one example per answer (1 + 2); @highlight lines become sentences.
    ('super_glue_record', 'train', 3, 'record query: @placeholder met Ben. entities: Anna, Ben, '
     'Louvre, Paris passage: Anna met Ben in Paris. They visited the Louvre. Ben liked it.',
     'Anna'),
    ('super_glue_wsc', 'train', 2, 'wsc text: * Mark * told Pete many lies about himself, which '
     'Pete included in his book. # He # should have been more skeptical.', 'False'),
]


@pytest.mark.parametrize('task,split,count,inputs,targets', FIXTURE_TASKS,
                         ids=[f'{t}-{s}' for t, s, *_ in FIXTURE_TASKS])
def test_fixture_files(task, split, count, inputs, targets):
  tasks.set_data_dirs(FIXTURES / 'glue', FIXTURES / 'super_glue')
  ds = _dataset(f'hyperprompt_{task}', split)
  assert _count(ds) == count
  _check_first(ds, inputs, targets)


def test_record_fixture_keeps_all_answers():
  tasks.set_data_dirs(FIXTURES / 'glue', FIXTURES / 'super_glue')
  examples = _examples('hyperprompt_super_glue_record', 'validation')
  second = examples[1]
  assert [a.decode() for a in second['answers']] == ['Louvre', 'Paris']
  assert [bool(e['record_first_answer']) for e in examples] == [True, True, False]


MOCK_TASKS = [
    ('glue_qqp', 'train', 'qqp question1: ', ('not_duplicate', 'duplicate')),
    ('glue_mnli', 'train', 'mnli hypothesis: ', ('entailment', 'neutral', 'contradiction')),
    ('glue_qnli', 'train', 'qnli question: ', ('entailment', 'not_entailment')),
    ('super_glue_boolq', 'train', 'boolq passage: ', ('False', 'True')),
    ('super_glue_multirc', 'train', 'multirc question: ', ('False', 'True')),
    ('super_glue_record', 'train', 'record query: ', None),
    ('super_glue_wsc', 'train', 'wsc text: ', ('False', 'True')),
]


@pytest.mark.parametrize('task,split,prefix,labels', MOCK_TASKS, ids=[t for t, *_ in MOCK_TASKS])
def test_tfds_mock_data(monkeypatch, task, split, prefix, labels):
  monkeypatch.delenv(tasks.GLUE_DIR_ENV, raising=False)
  monkeypatch.delenv(tasks.SUPER_GLUE_DIR_ENV, raising=False)
  tasks.set_data_dirs(None, None)
  with tfds.testing.mock_data(num_examples=4):
    examples = _examples(f'hyperprompt_{task}', split)
  assert len(examples) >= 4  # ReCoRD fans out per answer
  for ex in examples:
    assert ex['inputs_pretokenized'].decode().startswith(prefix)
    target = ex['targets_pretokenized'].decode()
    if labels is not None:
      assert target in labels
    else:
      answers = [a.decode() for a in ex['answers']]
      assert target in answers or (target == '<unk>' and not answers)
