"""The run's own records in MODEL_DIR (besides checkpoints and metrics).

* model_config.json: the T5Config the checkpoints were written with; a later run
  with another model config is refused before anything is restored;
* config.gin: the operative gin config of the first run; a later run whose config
  differs saves its own as config_<step>.gin;
* `config_fingerprint`: the hash of the parameter-shaping fields each checkpoint
  carries;
* vocabulary.json (+ vocabulary.model, a copy of a SentencePiece model): the
  vocabulary the run was trained with; eval, infer, load and analyze of the run,
  and its resumption, tokenise with it (run_setup.select_vocabulary).

A run may resume with T5Config.RUNTIME_FIELDS changed (dtype, dropout, attention
implementation, remat, embedding lookup); any other field changed is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional

import numpy as np

from hyperprompt_t5x.model.network import T5Config
from hyperprompt_t5x.run.metrics_logging import is_chief, log

CONFIG_FILE = 'config.gin'
MODEL_CONFIG_FILE = 'model_config.json'
VOCABULARY_FILE = 'vocabulary.json'
VOCABULARY_MODEL_FILE = 'vocabulary.model'


def config_dict(config) -> dict:
  """The T5Config as JSON-ready values (dtype by name: 'float32', 'bfloat16')."""
  fields = dataclasses.asdict(config)
  if 'dtype' in fields:
    fields['dtype'] = np.dtype(fields['dtype']).name
  return json.loads(json.dumps(fields, default=str))


def config_fingerprint(config: T5Config) -> str:
  """A short hash of the config fields that shape the parameters (all but RUNTIME_FIELDS)."""
  text = json.dumps(config.shape_fields(), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_record(model_dir: str, name: str, what: str) -> Optional[dict]:
  """MODEL_DIR/<name> as JSON (None if absent); unreadable: one ValueError naming it."""
  path = os.path.join(model_dir, name)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{path} is unreadable ({e}); it records {what} of this '
                     'MODEL_DIR') from e


def check_model_dir_matches(model_dir: str, config) -> None:
  """A MODEL_DIR trained with another model config fails here, before any restore."""
  saved = _read_record(model_dir, MODEL_CONFIG_FILE, 'the model')
  if saved is None:
    return
  current = config_dict(config)
  diffs = [f'{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}'
           for k in sorted(set(saved) | set(current))
           if k not in T5Config.RUNTIME_FIELDS and saved.get(k) != current.get(k)]
  if diffs:
    raise ValueError(
        f'MODEL_DIR {model_dir} holds checkpoints of a different model: '
        + '; '.join(diffs) + '. Use a new MODEL_DIR or the matching gin config.')


def save_config_files(model_dir: str, config, config_str: Optional[str], step: int) -> None:
  """model_config.json once; config.gin once, a differing later config as config_<step>.gin."""
  if not is_chief():
    return
  os.makedirs(model_dir, exist_ok=True)
  model_path = os.path.join(model_dir, MODEL_CONFIG_FILE)
  if not os.path.exists(model_path):
    with open(model_path, 'w') as f:
      json.dump(config_dict(config), f, indent=2, sort_keys=True)
  if config_str is None:
    return
  path = os.path.join(model_dir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == config_str:
        return
    path = os.path.join(model_dir, f'config_{step}.gin')
    n = 1
    while os.path.exists(path):
      path = os.path.join(model_dir, f'config_{step}.{n}.gin')
      n += 1
    log(f'gin config differs from {CONFIG_FILE}: this run\'s config is saved as {path}')
  with open(path, 'w') as f:
    f.write(config_str)


def save_vocabulary(model_dir: str, vocabulary) -> None:
  """vocabulary.json once (a SentencePiece model: its copy, vocabulary.model, first)."""
  if not is_chief() or os.path.exists(os.path.join(model_dir, VOCABULARY_FILE)):
    return
  from hyperprompt_t5x.tasks import vocab  # pylint: disable=g-import-not-at-top
  record = vocab.describe(vocabulary)
  model_bytes = vocab.sp_model_bytes(vocabulary)
  os.makedirs(model_dir, exist_ok=True)
  if model_bytes is not None:
    with open(os.path.join(model_dir, VOCABULARY_MODEL_FILE), 'wb') as f:
      f.write(model_bytes)
  path = os.path.join(model_dir, VOCABULARY_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(record, f, indent=2, sort_keys=True)
  os.replace(path + '.tmp', path)


def read_vocabulary(model_dir: str) -> Optional[dict]:
  """The recorded vocabulary of MODEL_DIR (None: none recorded); a SentencePiece
  record gets 'file', its copy in MODEL_DIR, checked against the recorded SHA-256."""
  path = os.path.join(model_dir, VOCABULARY_FILE)
  record = _read_record(model_dir, VOCABULARY_FILE, 'the vocabulary')
  if record is None:
    return None
  if record.get('kind') != 'sentencepiece':
    return record
  copy = os.path.join(model_dir, VOCABULARY_MODEL_FILE)
  trained = f'the SentencePiece model this run was trained with (from {record.get("source")})'
  if not os.path.isfile(copy):
    raise ValueError(f'{copy} is missing: it is {trained}; put it back (sha256 '
                     f'{record.get("sha256")})')
  with open(copy, 'rb') as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  if digest != record.get('sha256'):
    raise ValueError(f'{copy} differs from {trained}: sha256 {digest}, recorded '
                     f'{record.get("sha256")} in {path}')
  return dict(record, file=copy)
