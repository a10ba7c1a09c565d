"""Bad input gives one clear error: file and line, the variable to set, the known names."""
import json
import shutil

import pytest

seqio = pytest.importorskip('seqio')

from hyperprompt_t5x import tasks  # noqa: E402

LENGTHS = {'inputs': 256, 'targets': 16}


@pytest.fixture(scope='module', autouse=True)
def byte_vocabulary(byte_task_vocabulary):
  return byte_task_vocabulary


@pytest.fixture(autouse=True)
def _reset_dirs():
  yield
  tasks.set_data_dirs(None, None)


def _build(name, split):
  task = seqio.get_mixture_or_task(name)
  ds = task.get_dataset(LENGTHS, split=split, shuffle=False, use_cached=False, num_epochs=1)
  return next(ds.as_numpy_iterator())


def _glue_dir(tmp_path, folder, name, text):
  (tmp_path / folder).mkdir(parents=True, exist_ok=True)
  path = tmp_path / folder / name
  path.write_text(text)
  return path


def _cb_file(tmp_path, data: bytes):
  """CB/val.jsonl holding `data`, with the SuperGLUE directory pointed at it."""
  (tmp_path / 'CB').mkdir(exist_ok=True)
  path = tmp_path / 'CB' / 'val.jsonl'
  path.write_bytes(data)
  tasks.set_data_dirs(super_glue_dir=tmp_path)
  return path


def _assert_cb_error(pattern):
  with pytest.raises(tasks.DataFormatError, match=pattern):
    _build('hyperprompt_super_glue_cb', 'validation')


def test_tsv_wrong_column_count_names_file_and_line(tmp_path):
  path = _glue_dir(tmp_path, 'RTE', 'dev.tsv',
                   'index\tsentence1\tsentence2\tlabel\n'
                   '0\tA man runs.\tA person moves.\tentailment\n'
                   '1\tA man runs.\tentailment\n')
  tasks.set_data_dirs(glue_dir=tmp_path)
  with pytest.raises(tasks.DataFormatError, match=f'{path}:3: expected 4 .*got 3'):
    _build('hyperprompt_glue_rte', 'validation')


def test_tsv_unknown_label_names_file_and_line(tmp_path):
  path = _glue_dir(tmp_path, 'SST-2', 'dev.tsv', 'sentence\tlabel\ngood film\t1\nbad film\tmaybe\n')
  tasks.set_data_dirs(glue_dir=tmp_path)
  with pytest.raises(tasks.DataFormatError, match=f"{path}:3: unknown label 'maybe'"):
    _build('hyperprompt_glue_sst2', 'validation')


def test_cola_without_header_and_mrpc_bom(tmp_path):
  _glue_dir(tmp_path, 'CoLA', 'dev.tsv', 'src\t0\t*\tThe dog barked the cat.')  # no final newline
  (tmp_path / 'MRPC').mkdir()
  (tmp_path / 'MRPC' / 'dev.tsv').write_bytes(
      '\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tIt rains.\tIt is dry.\n'
      .encode('utf-8'))
  tasks.set_data_dirs(glue_dir=tmp_path)
  cola = _build('hyperprompt_glue_cola', 'validation')
  assert cola['inputs_pretokenized'].decode() == 'cola sentence: The dog barked the cat.'
  assert cola['targets_pretokenized'].decode() == 'unacceptable'
  mrpc = _build('hyperprompt_glue_mrpc', 'validation')
  assert mrpc['inputs_pretokenized'].decode() == 'mrpc sentence1: It rains. sentence2: It is dry.'
  assert mrpc['targets_pretokenized'].decode() == 'not_equivalent'


def test_test_split_without_labels_gives_unk(tmp_path):
  _glue_dir(tmp_path, 'RTE', 'test.tsv', 'index\tsentence1\tsentence2\n0\tIt rains.\tIt is wet.\n')
  tasks.set_data_dirs(glue_dir=tmp_path)
  ex = _build('hyperprompt_glue_rte', 'test')
  assert ex['targets_pretokenized'].decode() == '<unk>'


def test_bad_json_names_file_and_line(tmp_path):
  good = json.dumps({'premise': 'p', 'hypothesis': 'h', 'label': 'neutral', 'idx': 0})
  path = _cb_file(tmp_path, (good + '\n' + '{"premise": "p", "hypothesis": \n').encode())
  _assert_cb_error(f'{path}:2: bad JSON')


def test_jsonl_unknown_label_and_missing_field(tmp_path):
  path = _cb_file(tmp_path, json.dumps(
      {'premise': 'p', 'hypothesis': 'h', 'label': 'maybe', 'idx': 0}).encode())
  _assert_cb_error(f"{path}:1: unknown label 'maybe'")
  path.write_text(json.dumps({'premise': 'p', 'label': 'neutral', 'idx': 0}))
  _assert_cb_error(f"{path}:1: missing .*hypothesis")


def test_non_utf8_bytes_name_file_line_and_column(tmp_path):
  (tmp_path / 'RTE').mkdir()
  path = tmp_path / 'RTE' / 'dev.tsv'
  path.write_bytes(b'index\tsentence1\tsentence2\tlabel\n'
                   b'0\tA man runs.\tA person moves.\tentailment\n'
                   b'1\tCaf\xe9 time.\tIt is late.\tentailment\n')  # Latin-1, not UTF-8
  tasks.set_data_dirs(glue_dir=tmp_path)
  with pytest.raises(tasks.DataFormatError,
                     match=rf"{path}:3: bytes b'\\xe9' at column 6 are not UTF-8"):
    _build('hyperprompt_glue_rte', 'validation')
  path = _cb_file(tmp_path, b'{"premise": "p\xff", "hypothesis": "h", "label": "neutral", '
                  b'"idx": 0}\n')
  _assert_cb_error(f'{path}:1: .* are not UTF-8')


def test_jsonl_line_that_is_not_an_object(tmp_path):
  path = _cb_file(tmp_path, b'["p", "h", "neutral"]\n')
  _assert_cb_error(f'{path}:1: expected a JSON object, got list')


@pytest.mark.parametrize('benchmark,folder,name,task,text', [
    ('glue', 'RTE', 'dev.tsv', 'hyperprompt_glue_rte', 'index\tsentence1\tsentence2\tlabel\n'),
    ('glue', 'RTE', 'dev.tsv', 'hyperprompt_glue_rte', ''),
    ('super_glue', 'CB', 'val.jsonl', 'hyperprompt_super_glue_cb', '\n'),
])
def test_empty_split_file_is_named(tmp_path, benchmark, folder, name, task, text):
  (tmp_path / folder).mkdir()
  path = tmp_path / folder / name
  path.write_text(text)
  tasks.set_data_dirs(**{f'{benchmark}_dir': tmp_path})
  with pytest.raises(tasks.DataFormatError, match=f'{path}(:1: empty file|: no examples)'):
    _build(task, 'validation')


def test_header_mismatch_names_the_missing_column(tmp_path):
  path = _glue_dir(tmp_path, 'RTE', 'dev.tsv',
                   'index\tpremise\tsentence2\tlabel\n0\tA man runs.\tA person moves.\t0\n')
  tasks.set_data_dirs(glue_dir=tmp_path)
  with pytest.raises(tasks.DataFormatError,
                     match=rf"{path}:1: header .* has no column 'sentence1'"):
    _build('hyperprompt_glue_rte', 'validation')


def test_stsb_score_outside_0_to_5(tmp_path):
  header = 'index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n'
  path = _glue_dir(tmp_path, 'STS-B', 'dev.tsv',
                   header + '0\tg\tf\t2012\t1\ts\ts\tA cat.\tA dog.\t7.5\n')
  tasks.set_data_dirs(glue_dir=tmp_path)
  with pytest.raises(tasks.DataFormatError, match=f"{path}:2: score '7.5' is outside"):
    _build('hyperprompt_glue_stsb', 'validation')


def test_missing_directory_names_the_variable(monkeypatch, tmp_path):
  monkeypatch.setenv(tasks.GLUE_DIR_ENV, str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='HYPERPROMPT_GLUE_DIR'):
    _build('hyperprompt_glue_rte', 'validation')
  monkeypatch.setenv(tasks.SUPER_GLUE_DIR_ENV, str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='HYPERPROMPT_SUPER_GLUE_DIR'):
    _build('hyperprompt_super_glue_boolq', 'validation')


def test_missing_file_names_the_variable(monkeypatch, tmp_path):
  monkeypatch.setenv(tasks.GLUE_DIR_ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r'QQP/dev.tsv.*HYPERPROMPT_GLUE_DIR'):
    _build('hyperprompt_glue_qqp', 'validation')


def test_env_var_selects_file_source(monkeypatch, shared_data, tmp_path):
  shutil.copytree(shared_data / 'glue' / 'RTE', tmp_path / 'RTE')
  monkeypatch.setenv(tasks.GLUE_DIR_ENV, str(tmp_path))
  ex = _build('hyperprompt_glue_rte', 'validation')
  assert ex['inputs_pretokenized'].decode().startswith('rte sentence1: Dana Reeve')


def test_unknown_names_list_the_registered_ones():
  with pytest.raises(ValueError, match='hyperprompt_glue.*hyperprompt_super_glue_wsc'):
    tasks.task_names('hyperprompt_glu')
  with pytest.raises(ValueError, match='hyperprompt_demo'):
    tasks.get_dataset('no_such_mixture', 'train', LENGTHS, batch_size=2)


def test_unknown_split_is_named():
  with pytest.raises(ValueError, match="no split 'dev'.*train"):
    tasks.get_dataset('hyperprompt_demo', 'dev', LENGTHS, batch_size=2)


def test_missing_vocabulary_file_names_the_variable(monkeypatch, tmp_path):
  monkeypatch.setenv(tasks.VOCABULARY_ENV, str(tmp_path / 'missing.model'))
  with pytest.raises(FileNotFoundError, match='HYPERPROMPT_VOCABULARY'):
    tasks.vocab.make_vocabulary(None)
