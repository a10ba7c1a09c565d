"""The demo mixture's data, and one shared vocabulary object for tasks and model."""
import pytest

seqio = pytest.importorskip('seqio')
spm = pytest.importorskip('sentencepiece')

from hyperprompt_t5x import tasks  # noqa: E402
from hyperprompt_t5x.tasks import demo  # noqa: E402


def test_demo_inputs_are_shared_and_targets_differ():
  train, val = demo.words('train'), demo.words('validation')
  assert len(train) == 4096 and len(val) == 256
  assert not set(train) & set(val)
  assert demo.words('train') == train  # deterministic
  for w in train[:200]:
    assert set(w) <= set(demo.ALPHABET) and 3 <= len(w) <= 7
  # The same word gets different targets per task; only the task id tells which.
  distinct = sum(len({fn(w) for fn in demo.TARGET_FNS.values()}) == 3 for w in train)
  assert distinct == len(train)
  has_a = sum('a' in w for w in train) / len(train)
  assert 0.3 < has_a < 0.7  # neither answer dominates


def test_demo_task_examples_have_no_task_prefix():
  examples = {}
  for name in tasks.task_names('hyperprompt_demo'):
    ds = seqio.get_mixture_or_task(name).get_dataset(
        {'inputs': 16, 'targets': 4}, split='validation', shuffle=False, num_epochs=1)
    examples[name] = list(ds.take(3).as_numpy_iterator())
  firsts = [ex[0]['inputs_pretokenized'] for ex in examples.values()]
  assert len(set(firsts)) == 1  # identical input text in every task
  word = firsts[0].decode()
  assert [ex[0]['targets_pretokenized'].decode() for ex in examples.values()] == [
      max(word), min(word), 'y' if 'a' in word else 'n']


def test_demo_uses_the_byte_vocabulary_object():
  vocab = tasks.get_vocabulary('hyperprompt_demo')
  assert vocab is tasks.vocab.DEMO_VOCABULARY
  assert isinstance(vocab, seqio.ByteVocabulary)
  for name in tasks.task_names('hyperprompt_demo'):
    assert seqio.get_mixture_or_task(name).output_features['inputs'].vocabulary is vocab


def test_default_vocabulary_is_t5_public_model(monkeypatch):
  monkeypatch.delenv(tasks.VOCABULARY_ENV, raising=False)
  vocab = tasks.vocab.make_vocabulary(None)  # lazy: nothing is read from gs:// here
  assert isinstance(vocab, seqio.SentencePieceVocabulary)
  assert vocab.sentencepiece_model_file == tasks.DEFAULT_SPM_PATH
  assert tasks.DEFAULT_SPM_PATH == 'gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model'


@pytest.fixture
def sentencepiece_model(tmp_path):
  text = tmp_path / 'corpus.txt'
  text.write_text('\n'.join(['the cat sat on the mat', 'a dog ran in the park',
                             'rte sentence1: sentence2: entailment not_entailment'] * 30))
  spm.SentencePieceTrainer.train(
      input=str(text), model_prefix=str(tmp_path / 'sp'), vocab_size=28, num_threads=1, hard_vocab_limit=False,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type='unigram', minloglevel=2)
  return tmp_path / 'sp.model'


def test_set_vocabulary_swaps_the_shared_object(sentencepiece_model, monkeypatch):
  previous = tasks.get_vocabulary()
  try:
    vocab = tasks.set_vocabulary(str(sentencepiece_model))
    assert tasks.get_vocabulary() is vocab
    assert tasks.get_vocabulary('hyperprompt_glue') is vocab
    for name in tasks.task_names('hyperprompt_glue') + tasks.task_names('hyperprompt_super_glue'):
      task = seqio.get_mixture_or_task(name)
      assert task.output_features['targets'].vocabulary is vocab
    # The re-registered mixture holds the re-registered tasks.
    mixture = seqio.get_mixture_or_task('hyperprompt_glue')
    assert all(t.output_features['inputs'].vocabulary is vocab for t in mixture.tasks)
    ids = vocab.encode('the cat sat')
    assert vocab.decode(ids) == 'the cat sat'
    # The env var selects the same kind of file.
    monkeypatch.setenv(tasks.VOCABULARY_ENV, str(sentencepiece_model))
    assert tasks.vocab.make_vocabulary(None).sentencepiece_model_file == str(sentencepiece_model)
  finally:
    tasks.set_vocabulary(previous)
  assert tasks.get_vocabulary() is previous
