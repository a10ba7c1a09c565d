"""JAX's persistent compilation cache for the CLI and `hyperprompt_t5x.load`.

A second `eval`, `infer` or `train` of the same shapes reads its compiled programs
from disk instead of compiling them again. Where the cache lives, first match:

* `HYPERPROMPT_COMPILATION_CACHE=DIR`: that folder; `=off` adds no cache;
* JAX's own setting, when one is made (`JAX_COMPILATION_CACHE_DIR`, or
  `jax.config.update('jax_compilation_cache_dir', ...)` before the call): kept as is;
* else a per-user folder: `$XDG_CACHE_HOME/hyperprompt_t5x/jax`
  (`~/.cache/hyperprompt_t5x/jax` by default).

A stale program is never served: JAX keys each entry by the program itself (its
HLO: shapes, dtypes, shardings), the compile options and XLA flags, the devices and
the jax / jaxlib versions, so any change compiles afresh under a new key. Programs
that compile in under `MIN_COMPILE_SECONDS` are not stored (JAX's default is 1 s,
which leaves out most of a tiny model's programs).
"""
from __future__ import annotations

import os
import pathlib
from typing import Optional

import jax

ENV = 'HYPERPROMPT_COMPILATION_CACHE'
OFF_VALUES = ('off', 'none', 'false', '0', '')
MIN_COMPILE_SECONDS = 0.1
_JAX_MIN_TIME_ENV = 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'


def default_dir() -> pathlib.Path:
  """The per-user cache folder ($XDG_CACHE_HOME, else ~/.cache)."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(base) / 'hyperprompt_t5x' / 'jax'


def chosen_dir() -> Optional[str]:
  """The folder `enable` would use, or None (off, or JAX's own setting stays)."""
  value = os.environ.get(ENV)
  if value is not None:
    return None if value.strip().lower() in OFF_VALUES else os.path.expanduser(value.strip())
  if jax.config.jax_compilation_cache_dir:
    return None  # JAX's own setting (its env var or a config update) is kept
  return str(default_dir())


def enable() -> Optional[str]:
  """Points JAX's persistent cache at `chosen_dir()`; returns the folder in use or None."""
  directory = chosen_dir()
  if directory is None:
    return jax.config.jax_compilation_cache_dir or None
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise ValueError(f'compilation cache folder {directory} cannot be created '
                     f'({e.strerror or e}); set {ENV} to another folder or to off') from e
  jax.config.update('jax_compilation_cache_dir', directory)
  if _JAX_MIN_TIME_ENV not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECONDS)
  return directory
