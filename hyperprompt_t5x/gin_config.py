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
import difflib
import inspect
import logging
import os
import pathlib
import re
from typing import Any, Iterable, Optional, Sequence

from hyperprompt_t5x.model.methods import METHODS
from hyperprompt_t5x.model.network import T5Config

# Names the gin files bind, and the callables behind them (module:attribute).
_CONFIGURABLES = {
    'train': ('hyperprompt_t5x.training.trainer', 'train_from_bindings'),
    'evaluate': ('hyperprompt_t5x.evaluation.evaluator', 'evaluate'),
    'infer': ('hyperprompt_t5x.evaluation.evaluator', 'infer'),
    'analyze': ('hyperprompt_t5x.evaluation.analysis', 'analyze'),
}
_REGISTERED: dict[str, Any] = {}
_DTYPES = ('float32', 'bfloat16', 'float16')


class GinConfigError(ValueError):
  """A gin file, macro or binding the CLI cannot use."""


def installed_gin_dirs() -> list[pathlib.Path]:
  """The folder that holds the shipped gin files (inside the package)."""
  return [pathlib.Path(__file__).resolve().parent / 'gin']


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
      f'gin file {name!r} not found{did_you_mean(name, shipped_gin_files())}; looked in: '
      + ', '.join(str(t) for t in tried))


def read_gin_text(path: pathlib.Path) -> str:
  """A gin file's text; unreadable or not UTF-8 -> GinConfigError naming the file."""
  try:
    return path.read_text(encoding='utf-8')
  except UnicodeDecodeError as e:
    line = path.read_bytes()[:e.start].count(b'\n') + 1
    raise GinConfigError(f'gin file {path} line {line}: bytes are not UTF-8 ({e.reason}); '
                         'save it as UTF-8') from e
  except OSError as e:
    raise GinConfigError(f'gin file {path} cannot be read: {e.strerror or e}') from e


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
  """' (did you mean 'X'?)' for the closest candidate, or ''."""
  close = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.6)
  return f' (did you mean {close[0]!r}?)' if close else ''


def shipped_gin_files() -> list[str]:
  """The installed gin files, as names `--gin_file` accepts (e.g. 'methods/mtl.gin')."""
  names = set()
  for d in installed_gin_dirs():
    names.update(str(p.relative_to(d)) for p in d.rglob('*.gin'))
  return sorted(names)


_INCLUDE = re.compile(r"""^\s*include\s+['"]([^'"]+)['"]""")
_SETS_METHOD = re.compile(r'^\s*(METHOD|T5Config\.method)\s*=')


def _chooses_method(path: pathlib.Path, extra_search_paths: Sequence[str],
                    depth: int = 0) -> Optional[str]:
  """Where `path` sets METHOD / T5Config.method: itself, the include that does, or None."""
  via = None
  for line in read_gin_text(path).splitlines():
    if _SETS_METHOD.match(line):
      return path.name
    include = _INCLUDE.match(line)
    if include and via is None and depth < 20:
      try:
        included = resolve_gin_file(include.group(1), extra_search_paths)
      except GinConfigError:
        continue  # gin reports the missing include itself
      if _chooses_method(included, extra_search_paths, depth + 1):
        via = include.group(1)
  return via


def _check_one_method_file(gin_files: Sequence[str], paths: Sequence[pathlib.Path],
                           extra_search_paths: Sequence[str]) -> None:
  """Two files that each choose a method: the later one would reset the earlier's sizes."""
  choosers = [(name, _chooses_method(path, extra_search_paths))
              for name, path in zip(gin_files, paths)]
  choosers = [(name, via) for name, via in choosers if via]
  if len(choosers) > 1:
    described = ', '.join(name + (f' (via {via})' if via not in (name, pathlib.Path(name).name)
                                  else '') for name, via in choosers)
    raise GinConfigError(
        f'more than one gin file chooses the method: {described}; the later one would '
        'reset the earlier one\'s prompt length and sizes. Give one top-level file and '
        'choose the method with --gin.METHOD=<' + '|'.join(METHODS) + '>')


def _check_method() -> None:
  """METHOD (when the files define it) names a known method."""
  import gin  # pylint: disable=g-import-not-at-top
  if 'METHOD' not in defined_macros():
    return
  value = gin.query_parameter('%METHOD')
  if value not in METHODS:
    raise GinConfigError(
        f'unknown METHOD {value!r}{did_you_mean(value, METHODS)}; '
        f'expected one of {", ".join(METHODS)}')


def _t5_config_factory():
  """A function with T5Config's signature: gin then validates field names."""

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


def macro_value(value: str) -> Any:
  """What `--gin.NAME=value` sets NAME to, for every command alike.

  A Python literal is itself (`8`, `None`, `{'inputs': 8, 'targets': 2}`, and
  T5X's quoted `"'/runs/demo'"` is the string /runs/demo); any other text is
  that string (`/runs/demo`, `share`).
  """
  try:
    return ast.literal_eval(value.strip())
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return value


def _literal(value: str) -> str:
  """A `--gin.X=value` value as gin text: references as is, else `macro_value`'s repr."""
  text = value.strip()
  if text.startswith(('@', '%')):
    return text
  return repr(macro_value(value))


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
  paths = [resolve_gin_file(f, gin_search_paths) for f in gin_files]
  _check_one_method_file(gin_files, paths, gin_search_paths)
  files = [str(p) for p in paths]
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
          f'unknown macro {name!r} in --gin.{name}=...{did_you_mean(name, known)}: no gin '
          f'file defines it; defined macros: {", ".join(sorted(known))}')
    overrides.append(f'{name} = {_literal(value)}')
  for binding in bindings:
    head = binding.split('=', 1)[0].strip()
    if head and '.' not in head and '/' not in head and not head.startswith(
        ('include', 'import')) and head not in known:
      raise GinConfigError(
          f'unknown macro {head!r} in --gin_bindings{did_you_mean(head, known)}: no gin '
          f'file defines it; defined macros: {", ".join(sorted(known))}')
    overrides.append(binding)
  for text in overrides:
    try:
      gin.parse_config(text)
    except (ValueError, SyntaxError) as e:
      raise GinConfigError(f'bad binding {text!r}: {e}') from e
  _check_method()


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
