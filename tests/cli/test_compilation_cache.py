"""The persistent compilation cache: where it lives, reuse across processes, recompile on change.

Each process below runs the model's forward pass under `compilation_cache.enable()`
with its own temporary cache folder (never the suite's, never the user's) and
reports JAX's cache events: the second process with the same shapes reads the
program (a hit, nothing new stored); a changed shape or XLA flag compiles and
stores a new entry.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from hyperprompt_t5x import compilation_cache

# tests/, where step_helpers.py lives (the folder of the suite's conftest.py).
STEP_HELPERS_DIR = next(p for p in pathlib.Path(__file__).resolve().parents
                        if (p / 'step_helpers.py').is_file())

SCRIPT = r'''
import json, sys
import jax, numpy as np
from hyperprompt_t5x import compilation_cache
from hyperprompt_t5x.model import network
sys.path.insert(0, sys.argv[2])
import step_helpers
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
directory = compilation_cache.enable()
config = step_helpers.tiny_config()
params = network.random_params(config)
length = int(sys.argv[1])
batch = step_helpers.make_batch(0, input_len=length)
logits = jax.jit(network.Transformer(config).apply)(
    {'params': params}, batch['encoder_input_tokens'], batch['decoder_input_tokens'],
    batch['decoder_target_tokens'], batch['task_ids'])
print(json.dumps({'dir': directory, 'shape': list(logits.shape),
                  'hits': events.count('/jax/compilation_cache/cache_hits'),
                  'misses': events.count('/jax/compilation_cache/cache_misses')}))
'''


def _run(cache, length, extra_xla_flags=''):
  tests = str(STEP_HELPERS_DIR)
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_')}
  env.update(HYPERPROMPT_COMPILATION_CACHE=str(cache), JAX_PLATFORMS='cpu',
             XLA_FLAGS=(env.get('XLA_FLAGS', '') + ' ' + extra_xla_flags).strip())
  out = subprocess.run([sys.executable, '-c', SCRIPT, str(length), tests], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def _entries(cache):
  return sorted(p.name for p in cache.iterdir())


def test_second_process_reads_the_program_and_a_changed_shape_or_flag_recompiles(tmp_path):
  cache = tmp_path / 'cache'
  first = _run(cache, 8)
  assert first['dir'] == str(cache) and first['shape'][1] == 4
  assert first['misses'] >= 1 and first['hits'] == 0
  stored = _entries(cache)
  assert stored  # the forward pass compiles for longer than MIN_COMPILE_SECONDS
  again = _run(cache, 8)
  assert again['hits'] >= 1 and again['misses'] == 0, again
  assert _entries(cache) == stored  # read, not compiled again
  longer = _run(cache, 12)  # another input length: another program
  assert longer['misses'] >= 1, longer
  assert set(stored) < set(_entries(cache))
  flagged = _run(cache, 8, '--xla_cpu_enable_fast_math=false')  # same program, other flags
  assert flagged['misses'] >= 1, flagged


def test_where_the_cache_lives(tmp_path, monkeypatch):
  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update('jax_compilation_cache_dir', '')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    monkeypatch.delenv(compilation_cache.ENV, raising=False)
    assert compilation_cache.chosen_dir() == str(tmp_path / 'xdg' / 'hyperprompt_t5x' / 'jax')
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / 'mine'))
    assert compilation_cache.chosen_dir() == str(tmp_path / 'mine')
    for off in ('off', 'OFF', 'none', ''):
      monkeypatch.setenv(compilation_cache.ENV, off)
      assert compilation_cache.chosen_dir() is None
    # JAX's own setting (as the suite's conftest makes it) wins over the default.
    monkeypatch.delenv(compilation_cache.ENV)
    jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'jax_own'))
    assert compilation_cache.chosen_dir() is None
    assert compilation_cache.enable() == str(tmp_path / 'jax_own')
    # A folder that cannot be made is one error naming it and the variable.
    (tmp_path / 'file').write_text('')
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / 'file' / 'sub'))
    with pytest.raises(ValueError, match=f'{tmp_path / "file" / "sub"} cannot be created.*'
                       f'{compilation_cache.ENV}'):
      compilation_cache.enable()
  finally:
    jax.config.update('jax_compilation_cache_dir', before)
