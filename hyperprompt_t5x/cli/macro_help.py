"""The macro table of `hyperprompt-t5x <command> --help`, read from the gin files' text.

A macro's line in a gin file is `NAME = value  # meaning`, possibly continued by
comment-only lines aligned under the comment. Files are read in gin's order
(includes first, where they appear); a later definition replaces the value and,
when it has its own comment, the meaning. No gin import: --help stays fast.
"""
from __future__ import annotations

import dataclasses
import re
import textwrap
from typing import Sequence

from hyperprompt_t5x import gin_config
from hyperprompt_t5x.cli import macro_checks

# The gin files each command reads when no --gin_file is given.
COMMAND_FILES = {
    'train': ['runs/finetune.gin', 'methods/conditioning.gin'],
    'eval': ['runs/finetune.gin', 'methods/conditioning.gin', 'runs/eval.gin'],
    'infer': ['runs/finetune.gin', 'methods/conditioning.gin', 'runs/eval.gin',
              'runs/infer.gin'],
    'analyze': ['runs/finetune.gin', 'methods/conditioning.gin', 'runs/eval.gin'],
    'params': ['methods/conditioning.gin'],
}
_MACRO = re.compile(r'^([A-Z][A-Z0-9_]*)\s*=\s*(.*?)\s*(?:#\s?(.*))?$')
_INCLUDE = re.compile(r"""^\s*include\s+['"]([^'"]+)['"]""")
_CONTINUATION = re.compile(r'^\s{8,}#\s?(.*)$')


@dataclasses.dataclass
class Macro:
  name: str
  value: str
  meaning: str
  source: str


def read_macros(gin_files: Sequence[str], search_paths: Sequence[str] = ()) -> dict:
  """name -> Macro over `gin_files` and their includes, in gin's order."""
  macros: dict = {}
  seen_depth = [0]

  def read(name: str) -> None:
    if seen_depth[0] > 30:
      return
    seen_depth[0] += 1
    path = gin_config.resolve_gin_file(name, search_paths)
    last = None
    for line in gin_config.read_gin_text(path).splitlines():
      include = _INCLUDE.match(line)
      if include:
        read(include.group(1))
        last = None
        continue
      match = _MACRO.match(line)
      if match:
        key, value, meaning = match.group(1), match.group(2), (match.group(3) or '').strip()
        previous = macros.get(key)
        if not meaning and previous is not None:
          meaning = previous.meaning
        macros[key] = last = Macro(key, value, meaning, name)
        continue
      more = _CONTINUATION.match(line)
      if more and last is not None:
        last.meaning = f'{last.meaning} {more.group(1).strip()}'.strip()
      else:
        last = None
    seen_depth[0] -= 1

  for f in gin_files:
    read(f)
  return macros


def format_macros(macros: dict, width: int = 80) -> str:
  """`NAME = value` and its one-line meaning, aligned; `value` gin.REQUIRED = must be set."""
  if not macros:
    return '  (no macros)'
  lines = []
  for macro in sorted(macros.values(), key=lambda m: m.name):
    value = 'REQUIRED' if macro.value == '%gin.REQUIRED' else macro.value
    lines.append(f'  --gin.{macro.name}={value}')
    spec = macro_checks.SPECS.get(macro.name)
    meaning = ' '.join(part for part in (
        macro.meaning, f'(accepts {spec.accepted})' if spec else '') if part)
    if meaning:
      lines.append(textwrap.fill(meaning, width, initial_indent=' ' * 6,
                                 subsequent_indent=' ' * 6, break_long_words=False))
  return '\n'.join(lines)


def command_help(command: str, gin_files: Sequence[str],
                 search_paths: Sequence[str] = ()) -> str:
  """The macro section of `<command> --help` (for `gin_files`, else the command's own)."""
  files = list(gin_files) or COMMAND_FILES.get(command, [])
  header = (f'macros of {", ".join(files)}\n(set with --gin.NAME=value; '
            'REQUIRED: no default, must be set):')
  return header + '\n' + format_macros(read_macros(files, search_paths))
