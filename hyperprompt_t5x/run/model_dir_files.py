"""The run's own records in MODEL_DIR (besides checkpoints and metrics).

* model_config.json: the T5Config the checkpoints were written with; a later run
  with another model config is refused before anything is restored;
* config.gin: the operative gin config of the first run; a later run whose config
  differs saves its own as config_<step>.gin;
* `config_fingerprint`: the hash of the parameter-shaping fields each checkpoint
  carries.

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


def check_model_dir_matches(model_dir: str, config) -> None:
  """A MODEL_DIR trained with another model config fails here, before any restore."""
  path = os.path.join(model_dir, MODEL_CONFIG_FILE)
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{path} is unreadable ({e}); it records the model of this '
                     'MODEL_DIR') from e
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
