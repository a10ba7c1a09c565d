"""`hyperprompt-t5x` (alias `t5x`): train | eval | infer | analyze | params | plot, configured like T5X.

  t5x train --gin_file=demo.gin --gin.MODEL_DIR=/tmp/demo
  t5x train --gin_file=hyperprompt_base.gin --gin.MODEL_DIR=gs://... \\
      --gin.INITIAL_CHECKPOINT_PATH=gs://t5-data/pretrained_models/t5x/t5_1_1_base/checkpoint_1000000
  t5x eval  --gin.MODEL_DIR=/tmp/demo      (a trained run: its own config.gin is used)
  t5x infer --gin.MODEL_DIR=/tmp/demo
  t5x analyze --gin.MODEL_DIR=/tmp/demo    (attention mass on prompts)
  t5x infer --gin.MODEL_DIR=/tmp/demo --input_file=words.txt --task=hyperprompt_demo_max
  t5x params --gin_file=hyperprompt_base.gin [--json]
  t5x plot  --gin.MODEL_DIR=/tmp/demo
  t5x train --help       (the macros of a command, their defaults and meanings)

Flags as T5X's: `--gin_file` (repeatable; as given, else under `--gin_search_paths`,
else in the installed gin folder), `--gin.NAME=value` (a macro, or with a dot a
parameter binding; values that are not Python literals are taken as strings),
`--gin_bindings` (raw gin lines). `--platform cpu|gpu|tpu` picks the JAX backend
before any backend starts; if it cannot start, the run falls back to CPU with a
warning. Usage and configuration errors exit with status 2 and one line on
stderr (HYPERPROMPT_TRACEBACK=1 shows the traceback). TensorFlow (the input
pipelines) is imported quietly and kept off the GPUs.

stdout carries results only (train: its console); status lines go to stderr.
A macro's value is read the same way everywhere (`gin_config.macro_value`:
--gin.MODEL_DIR=/x and T5X's --gin.MODEL_DIR="'/x'" alike) and checked against
its accepted values (`macro_checks.SPECS`) before anything runs. JAX's
persistent compilation cache is on (compilation_cache.py). docs/CLI.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from typing import Optional, Sequence

from hyperprompt_t5x import compilation_cache, gin_config, quiet_tensorflow
from hyperprompt_t5x.cli import macro_checks
from hyperprompt_t5x.run import metrics_logging, model_dir_files

COMMANDS = ('train', 'eval', 'infer', 'analyze', 'params', 'plot')
_RUN_COMMANDS = ('eval', 'infer', 'analyze')  # commands on a trained run (MODEL_DIR enough)
_CONFIGURABLE = {'train': 'train', 'eval': 'evaluate', 'infer': 'infer', 'analyze': 'analyze'}
_JAX_PLATFORM = {'cpu': 'cpu', 'gpu': 'cuda', 'tpu': 'tpu'}


class UsageError(ValueError):
  """A command line the CLI cannot run (exit status 2)."""


def _parser(epilog: Optional[str] = None) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='hyperprompt-t5x', description=__doc__.split('\n\n')[0], epilog=epilog,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('command', choices=COMMANDS)
  parser.add_argument('--gin_file', action='append', default=[],
                      help='gin file (repeatable); looked up as given, in '
                      '--gin_search_paths, then in the installed gin/ folder')
  parser.add_argument('--gin_bindings', action='append', default=[],
                      help='a gin binding, e.g. "train.log_period = 10" (repeatable)')
  parser.add_argument('--gin_search_paths', action='append', default=[],
                      help='extra folders for gin files and includes (repeatable or comma-separated)')
  parser.add_argument('--platform', choices=sorted(_JAX_PLATFORM),
                      help='JAX backend (default: JAX picks; CPU when nothing else is there)')
  parser.add_argument('--json', action='store_true', help='params: print one JSON object')
  parser.add_argument('--input_file',
                      help='infer: decode your own inputs instead of a split: .jsonl (one '
                      'object of the task\'s fields, or a string, per line) or .txt (one '
                      'input per line); stdout gets one JSON line per input line, in order: '
                      '{"input", "prediction", "task"}, or for an empty or blank line '
                      '{"input", "error": "empty input", "task"}')
  parser.add_argument('--task', help='infer --input_file: the task (its input format and '
                      'task id), e.g. hyperprompt_demo_max')
  parser.add_argument('--truncate', action='store_true',
                      help='infer --input_file: cut inputs longer than the run\'s input '
                      'length (default: refuse them)')
  return parser


def _help(rest: Sequence[str]) -> str:
  """`--help`; after a command, with that command's macros (of the given --gin_file)."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument('command', nargs='?')
  pre.add_argument('--gin_file', action='append', default=[])
  pre.add_argument('--gin_search_paths', action='append', default=[])
  known, _ = pre.parse_known_args([a for a in rest if a not in ('-h', '--help')])
  if known.command not in COMMANDS:
    return _parser().format_help()
  from hyperprompt_t5x.cli import macro_help  # pylint: disable=g-import-not-at-top
  search = _search_paths(known)
  return _parser(macro_help.command_help(known.command, known.gin_file, search)).format_help()


def _check_command(rest: Sequence[str]) -> None:
  """A misspelled command gets a suggestion (argparse would only list the choices)."""
  positional = [a for a in rest if not a.startswith('-')]
  if positional and positional[0] not in COMMANDS:
    raise UsageError(f'unknown command {positional[0]!r}'
                     f'{gin_config.did_you_mean(positional[0], COMMANDS)}; '
                     f'commands: {", ".join(COMMANDS)}')


def _given_model_dir(macros) -> Optional[str]:
  """--gin.MODEL_DIR's value (`gin_config.macro_value`: /x and "'/x'" alike), or None."""
  if 'MODEL_DIR' not in dict(macros):
    return None
  value = gin_config.macro_value(dict(macros)['MODEL_DIR'])
  if not isinstance(value, str) or not value.strip():
    raise UsageError(f'--gin.MODEL_DIR must be a directory path, got {value!r}')
  return value


def _model_dir(args, macros) -> str:
  """MODEL_DIR: --gin.MODEL_DIR, else the gin files' (parsed by now)."""
  given = _given_model_dir(macros)
  if given:
    return given
  if not args.gin_file:
    raise UsageError(f'{args.command} needs --gin.MODEL_DIR=DIR')
  import gin  # pylint: disable=g-import-not-at-top
  value = gin.query_parameter('%MODEL_DIR')
  if not isinstance(value, str):
    raise UsageError(f'{args.command} needs --gin.MODEL_DIR=DIR')
  return value


def run_gin_files(command: str, model_dir: str) -> list:
  """The gin files that configure `command` on a trained run: its MODEL_DIR/config.gin,
  plus runs/eval.gin / runs/infer.gin where that config has no bindings of its own."""
  path = os.path.join(model_dir, model_dir_files.CONFIG_FILE)
  if not os.path.isfile(path):
    raise UsageError(
        f'{path} does not exist: --gin.MODEL_DIR alone needs a MODEL_DIR written by '
        f'`hyperprompt-t5x train`; otherwise give --gin_file=... too')
  text = _read_text(path)
  files = [path]
  for configurable, gin_file in (('evaluate', 'runs/eval.gin'), ('infer', 'runs/infer.gin')):
    if f'\n{configurable}.model_dir' not in text:
      files.append(gin_file)
  return files


def _read_text(path: str) -> str:
  """A file the user named, as text; unreadable or not UTF-8 -> an error naming it."""
  try:
    with open(path, encoding='utf-8') as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise UsageError(f'{path} is not UTF-8 text (byte {e.start}: {e.reason})') from e
  except OSError as e:
    raise UsageError(f'cannot read {path}: {e.strerror or e}') from e


def split_gin_overrides(argv: Sequence[str]) -> tuple[list, list]:
  """Pulls `--gin.NAME=value` (or `--gin.NAME value`) out of argv."""
  rest, macros = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--gin.'):
      body = arg[len('--gin.'):]
      if '=' in body:
        name, value = body.split('=', 1)
      elif i + 1 < len(argv):
        name, value = body, argv[i + 1]
        i += 1
      else:
        raise UsageError(f'{arg} needs a value (--gin.NAME=value)')
      macros.append((name, value))
    else:
      rest.append(arg)
    i += 1
  return rest, macros


def select_platform(platform: Optional[str]) -> None:
  """Sets jax_platforms before any backend starts; falls back to CPU with a warning."""
  import jax  # pylint: disable=g-import-not-at-top
  from hyperprompt_t5x import partitioning  # pylint: disable=g-import-not-at-top
  if platform:
    jax.config.update('jax_platforms', _JAX_PLATFORM[platform])
  partitioning.maybe_initialize_distributed()
  if not platform or platform == 'cpu':
    return
  try:
    jax.devices()
  except Exception as e:  # pylint: disable=broad-except
    reason = (str(e) or type(e).__name__).splitlines()[0]
    print(f'warning: --platform {platform} is not available ({reason}); '
          'falling back to CPU', file=sys.stderr)
    jax.config.update('jax_platforms', 'cpu')
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if hasattr(xla_bridge, '_clear_backends'):
      xla_bridge._clear_backends()  # pylint: disable=protected-access
    jax.devices()


def params_table(counts: dict) -> str:
  width = max(len(k) for k in counts)
  lines = []
  for key, value in counts.items():
    if isinstance(value, float):
      value = f'{value:.6g}'
    elif isinstance(value, int) and not isinstance(value, bool):
      value = f'{value:,}'
    lines.append(f'{key:<{width}}  {value}')
  return '\n'.join(lines)


def run(argv: Sequence[str]) -> int:
  rest, macros = split_gin_overrides(list(argv))
  if '-h' in rest or '--help' in rest:
    print(_help(rest))
    return 0
  _check_command(rest)
  args = _parser().parse_args(rest)
  if (args.input_file or args.task or args.truncate) and args.command != 'infer':
    raise UsageError('--input_file, --task and --truncate belong to infer')
  # train's console is its output; every other command's stdout carries only results.
  with metrics_logging.talking_to('stdout' if args.command == 'train' else 'stderr'):
    return _run(args, macros)


def _search_paths(args) -> list:
  """--gin_search_paths, repeated or comma-separated, as one list."""
  return [p for entry in args.gin_search_paths for p in entry.split(',') if p]


def _run(args, macros) -> int:
  search = _search_paths(args)
  given = _given_model_dir(macros)
  if args.command in ('plot', 'infer') and not args.gin_file and (
      args.command == 'plot' or args.input_file):
    return _run_on_model_dir(args, macros)  # the run's own config; no gin file needed
  gin_files = args.gin_file
  if not gin_files and given and args.command in _RUN_COMMANDS:
    gin_files = run_gin_files(args.command, given)  # MODEL_DIR alone: the run's own config
  elif not gin_files and args.command in _RUN_COMMANDS:
    raise UsageError(f'{args.command} needs --gin.MODEL_DIR=DIR (a trained run; its '
                     'config.gin is used) or --gin_file=...')
  gin_config.parse(gin_files, macros=macros, bindings=args.gin_bindings,
                   gin_search_paths=search)
  macro_checks.check_defined()
  if args.command == 'plot' or args.input_file:
    return _run_on_model_dir(args, macros)
  if args.command == 'params':
    from hyperprompt_t5x.model import param_count  # pylint: disable=g-import-not-at-top
    counts = param_count.count_params(gin_config.model_config())
    print(json.dumps(counts, sort_keys=True) if args.json else params_table(counts))
    return 0
  command = _CONFIGURABLE[args.command]
  gin_config.check_required(command)
  if command != 'train':  # train imports it once a finished MODEL_DIR is ruled out
    quiet_tensorflow.import_tensorflow()
  select_platform(args.platform)
  compilation_cache.enable()
  kwargs = {}
  if command == 'train':
    kwargs['config_str'] = gin_config.operative_config_str()
  gin_config.call(command, **kwargs)
  return 0


def _run_on_model_dir(args, macros) -> int:
  """`plot` and `infer --input_file`: read the run's own files in MODEL_DIR."""
  model_dir = _model_dir(args, macros)
  if args.command == 'plot':
    from hyperprompt_t5x.evaluation import plots  # pylint: disable=g-import-not-at-top
    if not os.path.isdir(model_dir):
      raise UsageError(f'MODEL_DIR {model_dir} does not exist')
    written = plots.draw(model_dir)
    if written:
      print('\n'.join(written))
    else:
      metrics_logging.log(f'nothing to plot yet in {model_dir}')
    return 0
  if not args.task:
    raise UsageError('infer --input_file needs --task=NAME (the task whose input format '
                     'and task id to use)')
  from hyperprompt_t5x.evaluation import predictor  # pylint: disable=g-import-not-at-top
  macro_checks.check_given(macros)
  texts = predictor.read_input_file(args.input_file)
  quiet_tensorflow.import_tensorflow()
  select_platform(args.platform)
  compilation_cache.enable()
  checkpoint = dict(macros).get('CHECKPOINT_PATH')
  checkpoint = gin_config.macro_value(checkpoint) if checkpoint is not None else None
  model = predictor.load(
      checkpoint or model_dir, gin_files=args.gin_file, gin_search_paths=_search_paths(args),
      macros=[(k, v) for k, v in macros if k not in ('MODEL_DIR', 'CHECKPOINT_PATH')],
      verbose=True)
  predictions = model.predict(texts, task=args.task, truncate=args.truncate)
  for text, prediction in zip(texts, predictions):
    row = {'input': text, 'prediction': prediction, 'task': args.task}
    if prediction is None:
      row = {'input': text, 'error': predictor.EMPTY_INPUT, 'task': args.task}
    print(json.dumps(row), flush=True)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Console entry point; configuration errors -> one line on stderr, exit 2."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  argv = sys.argv[1:] if argv is None else argv
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  # seqio / orbax advice (uncached FunctionDataset, deprecated options) is noise
  # for users of this CLI; errors still show.
  absl_logging.set_verbosity(absl_logging.ERROR)
  # A failed checkpoint write (e.g. a full disk) is reported as one line; orbax's
  # unretrieved asyncio task errors and failed write threads would repeat it as
  # tracebacks.
  logging.getLogger('asyncio').setLevel(logging.CRITICAL)
  logging.getLogger('absl').addFilter(
      lambda record: 'raised an exception' not in str(record.msg))  # orbax's write threads
  from hyperprompt_t5x.training import divergence  # pylint: disable=g-import-not-at-top
  from hyperprompt_t5x.training import model_dir_lock, preemption  # pylint: disable=g-import-not-at-top
  known = (ValueError, FileNotFoundError, FileExistsError, divergence.TrainingDivergedError,
           model_dir_lock.ModelDirLockedError)
  try:
    return run(argv)
  except preemption.TrainingInterrupted as e:  # SIGTERM / SIGINT: saved; one line
    print(_message(e), file=sys.stderr)
    return e.exit_code
  except KeyboardInterrupt:  # Ctrl-C outside the train loop (set-up, eval, infer)
    print('interrupted; nothing was half-written: rerun the same command to resume '
          '(training continues from the newest checkpoint)', file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    if not isinstance(e, known) and not _is_tensorflow_io_error(e):
      raise
    if os.environ.get('HYPERPROMPT_TRACEBACK'):
      raise
    kind = 'training diverged' if isinstance(e, divergence.TrainingDivergedError) else 'error'
    message = ' '.join(_message(e).split())  # one line
    if _is_tensorflow_io_error(e):  # e.g. gs:// unreachable: vocabulary, TFDS, checkpoint
      message = message + (
          ' (offline? set HYPERPROMPT_VOCABULARY, HYPERPROMPT_GLUE_DIR / '
          'HYPERPROMPT_SUPER_GLUE_DIR and --gin.INITIAL_CHECKPOINT_PATH to local paths)')
    print(f'{kind}: {message}', file=sys.stderr)
    return 2


def _message(e: BaseException) -> str:
  """The error's message without the line gin adds ("In call to configurable ...")."""
  return '\n'.join(line for line in str(e).strip().splitlines()
                   if not line.strip().startswith('In call to configurable')).strip()


def _is_tensorflow_io_error(e: BaseException) -> bool:
  """TensorFlow's I/O errors (tf.errors.OpError), without importing TensorFlow."""
  tf = sys.modules.get('tensorflow')
  return tf is not None and isinstance(e, tf.errors.OpError)


if __name__ == '__main__':
  sys.exit(main())
