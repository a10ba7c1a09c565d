"""Gin for the CLI: registering the configurables, finding gin files, checking macros.

T5X configures runs with gin files plus `--gin.MACRO=value` overrides. This module
does the same for `hyperprompt-t5x`: it registers the configurables the shipped gin
files bind (`T5Config`, `train`, `evaluate`, `infer`), resolves `--gin_file` names
against the installed `hyperprompt_t5x/gin/` folder and `--gin_search_paths`, and
turns gin's silent cases (an override of a macro no file defines, a required macro
left unset) into one clear error each.

gin is imported lazily: nothing the model or the train step imports pulls it in.
"""
from __future__ import annotations

import ast
import importlib.resources
import inspect
import logging
import os
import pathlib
from typing import Any, Iterable, Sequence

import hyperprompt_t5x

# Names the gin files bind, and the callables behind them (module:attribute).
_CONFIGURABLES = {
    'train': ('hyperprompt_t5x.trainer', 'train'),
    'evaluate': ('hyperprompt_t5x.evaluation', 'evaluate'),
    'infer': ('hyperprompt_t5x.evaluation', 'infer'),
}
_REGISTERED: dict[str, Any] = {}
_DTYPES = ('float32', 'bfloat16', 'float16')


class GinConfigError(ValueError):
  """A gin file, macro or binding the CLI cannot use."""


def installed_gin_dirs() -> list[pathlib.Path]:
  """Folders that hold the shipped gin files (installed package, then source tree)."""
  dirs = []
  try:
    dirs.append(pathlib.Path(str(importlib.resources.files('hyperprompt_t5x.gin'))))
  except (ModuleNotFoundError, TypeError):
    pass  # Editable installs map `hyperprompt_t5x.gin` only for regular packages.
  package = pathlib.Path(hyperprompt_t5x.__file__).resolve().parent
  dirs += [package / 'gin', package.parent / 'gin']
  unique = []
  for d in dirs:
    if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
      unique.append(d)
  return unique


def search_paths(extra: Iterable[str] = ()) -> list[pathlib.Path]:
  """Where gin files and their `include`s are looked up, in order."""
  return [pathlib.Path(p) for p in extra] + installed_gin_dirs()


def resolve_gin_file(name: str, extra_search_paths: Iterable[str] = ()) -> pathlib.Path:
  """`name` as given, else under each search path; error lists every place tried."""
  tried = [pathlib.Path(name)]
  if tried[0].is_file():
    return tried[0]
  if not os.path.isabs(name):
    for d in search_paths(extra_search_paths):
      candidate = d / name
      tried.append(candidate)
      if candidate.is_file():
        return candidate
  raise GinConfigError(
      f'gin file {name!r} not found; looked in: ' + ', '.join(str(t) for t in tried))


def _t5_config_factory():
  """A function with T5Config's signature: gin then validates field names."""
  from hyperprompt_t5x.network import T5Config  # pylint: disable=g-import-not-at-top

  def make_t5_config(**fields):
    # gin files name dtypes as strings ('bfloat16'); the config holds the jnp type.
    if isinstance(fields.get('dtype'), str):
      import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
      name = fields['dtype']
      if name not in _DTYPES:
        raise GinConfigError(f'T5Config.dtype={name!r}; expected one of {sorted(_DTYPES)}')
      fields['dtype'] = getattr(jnp, name)
    return T5Config(**fields)

  make_t5_config.__signature__ = inspect.signature(T5Config)
  make_t5_config.__doc__ = T5Config.__doc__
  return make_t5_config


def register() -> dict[str, Any]:
  """Registers the configurables once; returns name -> gin-wrapped callable."""
  import gin  # pylint: disable=g-import-not-at-top
  if _REGISTERED:
    return _REGISTERED
  _REGISTERED['T5Config'] = gin.external_configurable(
      _t5_config_factory(), name='T5Config', module='hyperprompt_t5x')
  for name, (module_name, attr) in _CONFIGURABLES.items():
    module = __import__(module_name, fromlist=[attr])
    _REGISTERED[name] = gin.external_configurable(
        getattr(module, attr), name=name, module='hyperprompt_t5x')
  return _REGISTERED


def _literal(value: str) -> str:
  """A `--gin.X=value` value as gin text: literals and references as is, else a string."""
  text = value.strip()
  if text.startswith(('@', '%')):
    return text
  try:
    ast.literal_eval(text)
    return text
  except (ValueError, SyntaxError):
    return repr(value)


def defined_macros() -> list[str]:
  """Names of the macros the parsed gin files define."""
  import gin  # pylint: disable=g-import-not-at-top
  return sorted(scope for scope, selector in gin.config._CONFIG  # pylint: disable=protected-access
                if selector == 'gin.macro')


def parse(gin_files: Sequence[str],
          macros: Sequence[tuple[str, str]] = (),
          bindings: Sequence[str] = (),
          gin_search_paths: Sequence[str] = ()) -> None:
  """Parses gin files, then `--gin.NAME=value` overrides, then `--gin_bindings`.

  Raises GinConfigError naming the file, macro or binding that is wrong.
  """
  import gin  # pylint: disable=g-import-not-at-top
  register()
  gin.clear_config(clear_constants=False)
  for d in search_paths(gin_search_paths):
    gin.add_config_file_search_path(str(d))
  if not gin_files:
    raise GinConfigError('no --gin_file given; e.g. --gin_file=demo.gin')
  files = [str(resolve_gin_file(f, gin_search_paths)) for f in gin_files]
  previous = logging.root.manager.disable
  logging.disable(logging.ERROR)  # gin logs every include path it tries and misses
  try:
    gin.parse_config_files_and_bindings(files, None, finalize_config=False)
  except IOError as e:  # a missing `include`
    raise GinConfigError(
        f'{e} (searched {", ".join(str(p) for p in search_paths(gin_search_paths))})') from e
  except (ValueError, SyntaxError) as e:
    raise GinConfigError(f'bad gin file: {e}') from e
  finally:
    logging.disable(previous)
  known = set(defined_macros())
  overrides = []
  for name, value in macros:
    if '.' in name or '/' in name:  # --gin.train.batch_size=8: a parameter binding
      overrides.append(f'{name} = {_literal(value)}')
      continue
    if name not in known:
      raise GinConfigError(
          f'unknown macro {name!r} in --gin.{name}=...: no gin file defines it; '
          f'defined macros: {", ".join(sorted(known))}')
    overrides.append(f'{name} = {_literal(value)}')
  for binding in bindings:
    head = binding.split('=', 1)[0].strip()
    if head and '.' not in head and '/' not in head and not head.startswith(
        ('include', 'import')) and head not in known:
      raise GinConfigError(
          f'unknown macro {head!r} in --gin_bindings: no gin file defines it; '
          f'defined macros: {", ".join(sorted(known))}')
    overrides.append(binding)
  for text in overrides:
    try:
      gin.parse_config(text)
    except (ValueError, SyntaxError) as e:
      raise GinConfigError(f'bad binding {text!r}: {e}') from e


def _walk_required(name: str, seen: set[str]) -> list[str]:
  """Macros (or parameters) set to gin.REQUIRED that configurable `name` would receive."""
  import gin  # pylint: disable=g-import-not-at-top
  if name in seen:
    return []
  seen.add(name)
  fn = register()[name]
  missing = []
  for param, default in inspect.signature(fn).parameters.items():
    if param in ('self',) or default.kind in (default.VAR_POSITIONAL, default.VAR_KEYWORD):
      continue
    try:
      value = gin.query_parameter(f'{name}.{param}')
    except ValueError:
      if default.default is gin.REQUIRED or default.default is inspect.Parameter.empty:
        missing.append(f'{name}.{param}')
      continue
    label = f'{name}.{param}'
    while isinstance(value, gin.config.ConfigurableReference):
      ref_name = value.configurable.name
      if ref_name == 'macro':
        label = value.scoped_selector.split('/')[0]
        try:
          value = gin.query_parameter(f'%{label}')
        except ValueError:
          missing.append(label)
          break
      elif ref_name == 'constant':
        if value.scoped_selector.split('/')[0] == 'gin.REQUIRED':
          missing.append(label)
        break
      else:
        if ref_name in register():
          missing += _walk_required(ref_name, seen)
        break
  return missing


def check_required(command: str) -> None:
  """Errors out naming every required macro the `command` configurable needs unset."""
  missing = sorted(set(_walk_required(command, set())))
  if missing:
    flags = ' '.join(f'--gin.{m}=...' for m in missing)
    raise GinConfigError(
        f'required macro{"s" if len(missing) > 1 else ""} not set: '
        f'{", ".join(missing)}; pass {flags}')


def call(command: str, **kwargs):
  """Calls the gin-configured `command` (train/evaluate/infer/T5Config)."""
  check_required(command)
  return register()[command](**kwargs)


def model_config():
  """The T5Config the gin files describe (what `train.model_config` gets)."""
  check_required('T5Config')
  return register()['T5Config']()


def operative_config_str() -> str:
  """Every binding in force (the files plus overrides), as gin text."""
  import gin  # pylint: disable=g-import-not-at-top
  return gin.config_str()
