"""Raw-example sources: TFDS when online, the original GLUE/SuperGLUE files offline.

Both sources yield the same TFDS-shaped examples (`glue/<t>`, `super_glue/<t>`
feature names, integer labels in TFDS's class order, -1 for unlabeled test
rows), so one set of T5 preprocessors serves both.

Which source a task reads is decided when its dataset is built, not at import:
the file source when a directory is set, by `set_data_dirs(...)` or the
environment variables `HYPERPROMPT_GLUE_DIR` / `HYPERPROMPT_SUPER_GLUE_DIR`,
else TFDS. The file readers parse in Python (one pass, every row checked) and
raise `DataFormatError` naming the file and line of a malformed row.
"""
import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import seqio
import tensorflow as tf

GLUE_DIR_ENV = 'HYPERPROMPT_GLUE_DIR'
SUPER_GLUE_DIR_ENV = 'HYPERPROMPT_SUPER_GLUE_DIR'


class DataFormatError(ValueError):
  """A malformed row in an offline data file (the message names file and line)."""


class _Dirs:
  glue: Optional[str] = None
  super_glue: Optional[str] = None


def set_data_dirs(glue_dir: Optional[str] = None, super_glue_dir: Optional[str] = None):
  """Overrides the env vars for the offline directories (None: back to the env var)."""
  _Dirs.glue = None if glue_dir is None else str(glue_dir)
  _Dirs.super_glue = None if super_glue_dir is None else str(super_glue_dir)


def data_dir(benchmark: str) -> Optional[pathlib.Path]:
  """The configured directory of 'glue' / 'super_glue', or None (-> TFDS).

  Raises FileNotFoundError naming the variable when it points nowhere.
  """
  env = GLUE_DIR_ENV if benchmark == 'glue' else SUPER_GLUE_DIR_ENV
  value = getattr(_Dirs, benchmark) or os.environ.get(env)
  if not value:
    return None
  path = pathlib.Path(value)
  if not path.is_dir():
    raise FileNotFoundError(
        f'{benchmark} data directory {str(path)!r} does not exist; set {env} '
        f'(or set_data_dirs({benchmark}_dir=...)) to a folder of the original files.')
  return path


def _require_file(path: pathlib.Path, benchmark: str) -> pathlib.Path:
  if not path.is_file():
    env = GLUE_DIR_ENV if benchmark == 'glue' else SUPER_GLUE_DIR_ENV
    raise FileNotFoundError(
        f'{path} is missing: the {benchmark} directory given by {env} must hold '
        f'{path.parent.name}/{path.name}.')
  return path


# ---------------------------------------------------------------------------
# GLUE: TSV files in the download_glue_data.py layout.


@dataclasses.dataclass(frozen=True)
class GlueFiles:
  """Where one GLUE task lives on disk and how its columns map to TFDS features."""
  folder: str                        # e.g. 'SST-2'
  files: Mapping[str, str]           # split -> file name
  text_features: Mapping[str, str]   # TFDS feature -> column name
  label_column: str
  label_classes: Optional[Sequence[str]]  # None: a float score (STS-B)
  headerless: bool = False           # CoLA train/dev
  # Alternative column names used by some copies (e.g. MRPC test 'index').
  column_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _split_line(line: str) -> List[str]:
  return line.rstrip('\n').rstrip('\r').split('\t')


def _text_lines(path: pathlib.Path) -> List[str]:
  """The file's lines (without newlines) as UTF-8 text; a leading BOM is dropped.

  Bytes that are not UTF-8 raise DataFormatError naming the line and column.
  """
  data = path.read_bytes()
  try:
    text = data.decode('utf-8-sig')  # utf-8-sig: MRPC's BOM
  except UnicodeDecodeError as e:
    line_start = data.rfind(b'\n', 0, e.start) + 1
    lineno = data.count(b'\n', 0, e.start) + 1
    raise DataFormatError(
        f'{path}:{lineno}: bytes {data[e.start:e.end]!r} at column {e.start - line_start + 1} '
        f'are not UTF-8 ({e.reason}); save the file as UTF-8') from None
  lines = text.split('\n')
  if lines and lines[-1] == '':
    lines.pop()
  return lines


def read_glue_tsv(path: pathlib.Path, spec: GlueFiles) -> Dict[str, list]:
  """Parses one GLUE TSV into TFDS-shaped columns; checks every row."""
  columns: Dict[str, list] = {f: [] for f in spec.text_features}
  columns['label'] = []
  columns['idx'] = []
  lines = _text_lines(path)
  header: Optional[List[str]] = None
  start = 0
  cola_layout = spec.headerless and not (lines and lines[0].startswith('index\t'))
  if cola_layout:
    # CoLA: source, label, original label, sentence; no header.
    header = ['source', spec.label_column, 'original_label', 'sentence']
  else:
    if not lines:
      raise DataFormatError(f'{path}:1: empty file, expected a header row')
    header = _split_line(lines[0])
    start = 1
  index = {spec.column_aliases.get(name, name): i for i, name in enumerate(header)}
  for feature, column in spec.text_features.items():
    if column not in index:
      raise DataFormatError(
          f'{path}:1: header {header} has no column {column!r} (for {feature!r})')
  has_label = spec.label_column in index
  for lineno in range(start, len(lines)):
    line = lines[lineno]
    if not line.strip():
      continue
    row = _split_line(line)
    where = f'{path}:{lineno + 1}'
    if len(row) != len(header):
      raise DataFormatError(
          f'{where}: expected {len(header)} tab-separated columns {header}, got {len(row)}')
    for feature, column in spec.text_features.items():
      columns[feature].append(row[index[column]])
    columns['label'].append(
        _parse_glue_label(row[index[spec.label_column]], spec, where) if has_label else -1)
    columns['idx'].append(len(columns['idx']))
  return columns


def _parse_glue_label(text: str, spec: GlueFiles, where: str):
  if spec.label_classes is None:
    try:
      score = float(text)
    except ValueError:
      raise DataFormatError(f'{where}: score {text!r} is not a number') from None
    if not 0.0 <= score <= 5.0:  # also refuses nan / inf
      raise DataFormatError(f'{where}: score {text!r} is outside the range 0..5')
    return score
  if text in spec.label_classes:
    return spec.label_classes.index(text)
  if text.isdigit() and int(text) < len(spec.label_classes):
    return int(text)
  raise DataFormatError(
      f'{where}: unknown label {text!r}; expected one of {list(spec.label_classes)} '
      f'or 0..{len(spec.label_classes) - 1}')


# ---------------------------------------------------------------------------
# SuperGLUE: JSONL files of the official task zips.


def _cast_bool_label(value, where):
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, int) and value in (0, 1):
    return value
  if isinstance(value, str) and value in ('True', 'False', 'true', 'false'):
    return int(value.lower() == 'true')
  raise DataFormatError(f'{where}: unknown label {value!r}; expected a boolean')


def _class_label(classes):
  def cast(value, where):
    if isinstance(value, str) and value in classes:
      return classes.index(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(classes):
      return value
    raise DataFormatError(f'{where}: unknown label {value!r}; expected one of {list(classes)}')
  return cast


def _fix_wsc_span(ex: Dict[str, Any], key: str) -> None:
  """Makes a WSC span text a substring of the text (as TFDS's wsc.fixed does)."""
  span = ex[key + '_text']
  if span in ex['text']:
    return
  words = ex['text'].split()
  index = ex[key + '_index']
  if 0 <= index < len(words) and span:
    first = words[index][0]
    span = (span[0].lower() if first.islower() else span[0].upper()) + span[1:]
  ex[key + '_text'] = span.rstrip('.').replace('\n', ' ')


def _superglue_rows(task: str, row: Mapping[str, Any], where: str, label: Callable):
  """Yields TFDS-shaped examples of one JSONL row (MultiRC/ReCoRD fan out)."""
  if task == 'multirc':
    passage = row['passage']
    for q in passage['questions']:
      for a in q['answers']:
        yield {'paragraph': passage['text'], 'question': q['question'], 'answer': a['text'],
               'label': label(a['label'], where) if 'label' in a else -1,
               'idx': {'paragraph': row['idx'], 'question': q['idx'], 'answer': a['idx']}}
    return
  if task == 'record':
    text = row['passage']['text']
    entities = sorted({text[e['start']:e['end'] + 1] for e in row['passage']['entities']})
    for qa in row['qas']:
      yield {'passage': text, 'query': qa['query'], 'entities': entities,
             'answers': sorted({a['text'] for a in qa.get('answers', [])}),
             'idx': {'passage': row['idx'], 'query': qa['idx']}}
    return
  if task == 'wsc':
    row = {**row, **row['target']}
  ex = {k: row[k] for k in SUPER_GLUE_FEATURES[task]}
  if task == 'wsc':
    _fix_wsc_span(ex, 'span1')
    _fix_wsc_span(ex, 'span2')
  ex['idx'] = row['idx']
  ex['label'] = label(row['label'], where) if 'label' in row else -1
  yield ex


SUPER_GLUE_FEATURES = {
    'boolq': ('question', 'passage'),
    'cb': ('premise', 'hypothesis'),
    'copa': ('premise', 'choice1', 'choice2', 'question'),
    'rte': ('premise', 'hypothesis'),
    'wic': ('word', 'sentence1', 'sentence2', 'start1', 'start2', 'end1', 'end2'),
    'wsc': ('text', 'span1_index', 'span2_index', 'span1_text', 'span2_text'),
}

SUPER_GLUE_LABELS = {
    'boolq': _cast_bool_label, 'multirc': _cast_bool_label, 'wic': _cast_bool_label,
    'wsc': _cast_bool_label,
    'cb': _class_label(('entailment', 'contradiction', 'neutral')),
    'copa': _class_label(('choice1', 'choice2')),
    'rte': _class_label(('entailment', 'not_entailment')),
    'record': None,
}


def read_super_glue_jsonl(path: pathlib.Path, task: str) -> List[Dict[str, Any]]:
  """Parses one SuperGLUE JSONL file into TFDS-shaped examples; checks every row."""
  examples = []
  label = SUPER_GLUE_LABELS[task]
  for lineno, line in enumerate(_text_lines(path), start=1):
    if not line.strip():
      continue
    where = f'{path}:{lineno}'
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataFormatError(f'{where}: bad JSON ({e.msg} at column {e.colno})') from None
    if not isinstance(row, dict):
      raise DataFormatError(f'{where}: expected a JSON object, got {type(row).__name__}')
    try:
      examples.extend(_superglue_rows(task, row, where, label))
    except (KeyError, TypeError, IndexError) as e:
      raise DataFormatError(f'{where}: missing or malformed field {e}') from None
  return examples


def _columns(examples: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
  """Row dicts -> dict of column lists (nested dicts kept nested)."""
  if not examples:
    return {}
  out = {}
  for key, value in examples[0].items():
    if isinstance(value, dict):
      out[key] = _columns([ex[key] for ex in examples])
    else:
      out[key] = [ex[key] for ex in examples]
  return out


_INT32_KEYS = ('idx', 'start1', 'start2', 'end1', 'end2', 'span1_index', 'span2_index')


def _to_tensors(columns: Mapping[str, Any], key: str = '') -> Dict[str, Any]:
  """Column lists -> tensors with TFDS's dtypes (label int64, idx int32, lists ragged)."""
  out = {}
  for k, v in columns.items():
    if isinstance(v, dict):
      out[k] = _to_tensors(v, k)
    elif v and isinstance(v[0], list):
      out[k] = tf.ragged.constant(v, dtype=tf.string, ragged_rank=1)
    elif k == 'label':
      out[k] = tf.constant(v, dtype=tf.float32 if v and isinstance(v[0], float) else tf.int64)
    elif k in _INT32_KEYS or key == 'idx':
      out[k] = tf.constant(v, dtype=tf.int32)
    else:
      out[k] = tf.constant(v, dtype=tf.string)
  return out


# ---------------------------------------------------------------------------
# The seqio DataSource that picks files or TFDS when the dataset is built.


class OfflineOrTfdsSource(seqio.DataSource):
  """Reads the original files when the benchmark's directory is set, else TFDS.

  `read(split) -> list of TFDS-shaped examples` or dict of columns; the parse
  is cached per (directory, split) so evaluation and training share it.
  """

  def __init__(self, benchmark: str, tfds_name: str, splits: Mapping[str, str],
               read: Callable[[pathlib.Path, str], Mapping[str, Any]],
               tfds_splits: Optional[Mapping[str, str]] = None):
    super().__init__(splits=list(splits), num_input_examples=None,
                     caching_permitted=False)
    self._benchmark = benchmark
    self._tfds_name = tfds_name
    self._files = dict(splits)  # split -> relative file path
    self._read = read
    self._tfds_splits = tfds_splits
    self._cache: Dict[tuple, Mapping[str, Any]] = {}

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [split]

  def file_path(self, split: str) -> Optional[pathlib.Path]:
    root = data_dir(self._benchmark)
    if root is None:
      return None
    return _require_file(root / self._files[split], self._benchmark)

  def columns(self, split: str) -> Mapping[str, Any]:
    path = self.file_path(split)
    key = (str(path), path.stat().st_mtime_ns)
    if key not in self._cache:
      self._cache.clear()
      self._cache[key] = self._read(path, split)
    return self._cache[key]

  def num_input_examples(self, split: str) -> Optional[int]:
    if self.file_path(split) is None:
      return None
    cols = self.columns(split)
    return len(cols['idx']) if cols else 0

  def get_dataset(self, split: str = 'train', shuffle: bool = True,
                  seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None,
                  *, sequence_length=None, use_cached=False, num_epochs=1
                  ) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs
    if split not in self._files:
      raise ValueError(f'{self._tfds_name}: unknown split {split!r}; have {list(self._files)}')
    if self.file_path(split) is None:
      source = seqio.TfdsDataSource(self._tfds_name, splits=self._tfds_splits)
      return source.get_dataset(split=split, shuffle=shuffle, seed=seed,
                                shard_info=shard_info)
    cols = self.columns(split)
    if not self.num_input_examples(split):
      raise DataFormatError(f'{self.file_path(split)}: no examples (the {split!r} split '
                            'file has no data rows)')
    ds = tf.data.Dataset.from_tensor_slices(_to_tensors(cols))
    if shard_info and shard_info.num_shards > 1:
      ds = ds.shard(shard_info.num_shards, shard_info.index)
    if shuffle:
      ds = ds.shuffle(100_000, seed=seed, reshuffle_each_iteration=True)
    return ds


def glue_reader(spec: GlueFiles) -> Callable[[pathlib.Path, str], Mapping[str, Any]]:
  return lambda path, split: read_glue_tsv(path, spec)


def super_glue_reader(task: str) -> Callable[[pathlib.Path, str], Mapping[str, Any]]:
  return lambda path, split: _columns(read_super_glue_jsonl(path, task))
