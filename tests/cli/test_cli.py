"""The `hyperprompt-t5x` / `t5x` command line: flags, `params`, platform, errors."""
import hashlib
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from hyperprompt_t5x.cli import commands, macro_checks, macro_help
from hyperprompt_t5x import gin_config
from hyperprompt_t5x.evaluation import predictor
from hyperprompt_t5x.model import param_count


def snapshot(directory) -> dict:
  root = pathlib.Path(directory)
  return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob('*')) if p.is_file()}


def test_split_gin_overrides():
  rest, macros = commands.split_gin_overrides(
      ['train', '--gin_file=a.gin', '--gin.MODEL_DIR=/tmp/x', '--gin.TRAIN_STEPS', '5',
       "--gin.train.seed=3", '--platform=cpu'])
  assert rest == ['train', '--gin_file=a.gin', '--platform=cpu']
  assert macros == [('MODEL_DIR', '/tmp/x'), ('TRAIN_STEPS', '5'), ('train.seed', '3')]


def _leaf_count(config) -> int:
  """Parameter count of the model itself, from its abstract init (independent of param_count)."""
  import jax
  from hyperprompt_t5x.model import models
  params = models.EncoderDecoderModel(config).init_abstract(1, 8, 2)['params']
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


def test_params_json_matches_param_count_and_the_model(capsys):
  assert commands.main(['params', '--gin_file=demo.gin', '--json']) == 0
  printed = json.loads(capsys.readouterr().out)
  config = gin_config.model_config()
  assert printed == json.loads(json.dumps(param_count.count_params(config)))
  assert printed['total'] == _leaf_count(config)
  assert printed['method'] == 'global' and printed['num_tasks'] == 3


def test_params_table(capsys):
  assert commands.main(['params', '--gin_file=hyperprompt_small.gin']) == 0
  out = capsys.readouterr().out
  counts = param_count.count_params(gin_config.model_config())
  assert f'{counts["total"]:,}' in out and f'{counts["added"]:,}' in out
  assert out.splitlines()[0].split()[0] == 'total'


@pytest.mark.parametrize('argv, message', [
    (['train', '--gin_file=nope.gin'], "gin file 'nope.gin' not found"),
    (['train', '--gin_file=dmeo.gin'], "(did you mean 'demo.gin'?)"),
    (['train', '--gin_file=demo.gin', '--gin.METHOD=shared'], "(did you mean 'share'?)"),
    (['train', '--gin_file=demo.gin', '--gin.MIXTURE_OR_TASK_NAME=hyperprompt_dem',
      '--gin.XLA_FLAGS=None'],
     "(did you mean 'hyperprompt_demo'?)"),
    (['train', '--gin_file=demo.gin', '--gin.TRAIN_STEPS=0', '--gin.XLA_FLAGS=None'],
     'TRAIN_STEPS=0 is not accepted: TRAIN_STEPS takes an integer >= 1'),
    (['trian', '--gin_file=demo.gin'], "unknown command 'trian' (did you mean 'train'?)"),
    (['train', '--gin_file=demo.gin', '--gin.MODEL_DIR'], '--gin.MODEL_DIR needs a value'),
    (['plot'], 'plot needs --gin.MODEL_DIR'),
    (['train', '--gin_file=demo.gin', '--gin.TRAIN_STEP=5'], "unknown macro 'TRAIN_STEP'"),
    (['train', '--gin_file=demo.gin', '--gin_bindings=train.bogus = 1'], 'bogus'),
    (['train', '--gin_file=demo.gin'], 'required macro not set: MODEL_DIR'),
    (['eval', '--gin_file=runs/finetune.gin'], 'evaluate.model_dir'),
])
def test_config_errors_are_one_line_and_touch_nothing(argv, message, tmp_path, capsys):
  model_dir = tmp_path / 'model'
  model_dir.mkdir()
  (model_dir / 'config.gin').write_text('# an earlier run\n')
  before = snapshot(model_dir)
  if 'MODEL_DIR' not in message:
    argv = argv + [f'--gin.MODEL_DIR={model_dir}']
  assert commands.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and message in err, err
  assert 'Traceback' not in err and 'In call to configurable' not in err
  assert len(err.splitlines()) == 1, err
  assert snapshot(model_dir) == before


@pytest.mark.parametrize('content, message', [
    (b"TRAIN_STEPS = 5\n# caf\xe9\n", 'line 2: bytes are not UTF-8'),
    (b"TRAIN_STEPS = \n", 'bad gin file')])
def test_a_bad_gin_file_is_named(content, message, tmp_path, capsys):
  path = tmp_path / 'mine.gin'
  path.write_bytes(content)
  assert commands.main(['train', f'--gin_file={path}']) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err and path.name in err, err


def test_eval_without_checkpoint_is_a_clear_error(tmp_path, capsys):
  assert commands.main(['eval', '--gin_file=demo.gin', f'--gin.MODEL_DIR={tmp_path / "none"}']) == 2
  assert 'no checkpoint' in capsys.readouterr().err


def _bin(name: str) -> str:
  path = pathlib.Path(sys.executable).parent / name
  if not path.exists():
    pytest.skip(f'console script {name} is not installed next to {sys.executable} '
                '(pip install -e . creates it)')
  return str(path)


def test_console_scripts_and_platform_fallback():
  """`t5x` and `hyperprompt-t5x` run; --platform gpu without a GPU falls back to CPU."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  out = subprocess.run([_bin('t5x'), 'params', '--gin_file=demo.gin', '--json'],
                       capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout)['method'] == 'global'
  assert _bin('hyperprompt-t5x')
  code = ('import jax; from hyperprompt_t5x.cli import commands; commands.select_platform("gpu"); '
          'print(jax.devices()[0].platform)')
  probe = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         env=env, timeout=120)
  assert probe.returncode == 0, probe.stderr
  import jax
  if any(d.platform == 'gpu' for d in jax.devices()):
    pytest.skip('this machine has a GPU: no fallback to test')
  assert probe.stdout.split()[-1] == 'cpu'
  assert 'falling back to CPU' in probe.stderr


def test_the_users_main_command_offline_is_one_clear_error(tmp_path):
  """`t5x train --gin_file=hyperprompt_base.gin`, exactly: MODEL_DIR has a default,
  and an unreachable gs:// vocabulary is reported in one line; nothing is written.

  The vocabulary is a gs:// path that exists nowhere, so the check is the same
  with or without internet (the default is T5's public 32k model).
  """
  vocab = 'gs://hyperprompt-t5x-no-such-bucket/sentencepiece.model'
  env = {k: v for k, v in os.environ.items()
         if k not in ('HYPERPROMPT_GLUE_DIR', 'HYPERPROMPT_TRACEBACK')}
  env['HYPERPROMPT_VOCABULARY'] = vocab
  run = subprocess.run([_bin('t5x'), 'train', '--gin_file=hyperprompt_base.gin'],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
  errors = [l for l in run.stderr.splitlines() if l.startswith('error:')]
  assert run.returncode == 2, run.stderr[-2000:]
  assert len(errors) == 1 and vocab in errors[0], run.stderr[-2000:]
  assert 'Traceback' not in run.stderr
  assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------
# Help, quiet start-up, a light package import.
# ----------------------------------------------------------------------------


def test_command_help_lists_macros_with_defaults_and_meanings(capsys):
  assert commands.main(['train', '--help']) == 0
  out = capsys.readouterr().out
  assert '--gin.TRAIN_STEPS=REQUIRED' in out and '--gin.LEARNING_RATE=0.001' in out
  assert "--gin.METHOD='global'" in out
  assert 'global | share | sep | prompt_tuning | hyperformer | none' in out
  assert 'fine-tuning steps, counted from 0' in out  # a meaning continued on a 2nd line
  assert commands.main(['train', '--gin_file=demo.gin', '--help']) == 0
  demo = capsys.readouterr().out
  assert '--gin.TRAIN_STEPS=150' in demo and "--gin.OPTIMIZER='adamw'" in demo
  assert commands.main(['infer', '--help']) == 0
  assert '--input_file' in capsys.readouterr().out


def test_tensorflow_start_up_is_silent():
  """The CLI's quiet import: TensorFlow's CUDA / oneDNN / absl lines never reach stderr."""
  code = ('from hyperprompt_t5x import quiet_tensorflow; quiet_tensorflow.import_tensorflow()\n'
          'from hyperprompt_t5x import tasks\n'
          "ds = tasks.get_dataset('hyperprompt_demo', split='train', task_feature_lengths="
          "{'inputs': 8, 'targets': 2}, batch_size=2, shuffle=False, seed=0, num_epochs=1)\n"
          'print(next(ds.as_numpy_iterator())["task_ids"].shape)')
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       env=env, timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == '(2,)'
  assert out.stderr.strip() == '', out.stderr


def test_package_import_is_light():
  code = ('import sys, hyperprompt_t5x\n'
          "heavy = {'tensorflow', 'seqio', 'gin', 'orbax', 'matplotlib'} & set(sys.modules)\n"
          'assert not heavy, heavy\nassert callable(hyperprompt_t5x.load)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr


# ----------------------------------------------------------------------------
# Every macro checked up front, by name; one parser for every command.
# ----------------------------------------------------------------------------

# (macro, a bad value as typed) per family; the error must name the macro, the value
# and the accepted values of macro_checks.SPECS.
BAD_MACROS = [
    # integers with a range
    ('TRAIN_STEPS', 'abc'), ('TRAIN_STEPS', '2.5'), ('BATCH_SIZE', '0'), ('SAVE_PERIOD', '-2'),
    ('LOG_PERIOD', '0'), ('WARMUP_STEPS', '-1'), ('NUM_PARTITIONS', '0'), ('SEED', '-1'),
    ('NUM_TASKS', '0'), ('PROMPT_LENGTH', '0'), ('BOTTLENECK', '1.5'), ('ADAPTER_DIM', 'True'),
    # optional integers (None means something)
    ('EVAL_PERIOD', '-1'), ('KEEP_CHECKPOINTS', '0'), ('EVAL_MAX_EXAMPLES', '0'),
    ('EVAL_BATCH_SIZE', 'None'),
    # numbers with a range
    ('LEARNING_RATE', 'fast'), ('LEARNING_RATE', '0'), ('WEIGHT_DECAY', '-0.1'),
    ('Z_LOSS', 'nan'), ('LABEL_SMOOTHING', '1.0'), ('DROPOUT_RATE', '1.5'),
    # choices
    ('OPTIMIZER', 'sgd'), ('LR_SCHEDULE', 'linear'), ('FREEZE', 'none'),
    # booleans
    ('RESTORE_OPTIMIZER_STATE', 'yes'), ('CALIBRATE_PROMPT_SCALE', '1'),
    ('USE_HARDWARE_RNG', 'maybe'),
    # strings and paths
    ('MIXTURE_OR_TASK_NAME', '3'), ('EVAL_SPLIT', "''"), ('XLA_FLAGS', '3'),
    ('INITIAL_CHECKPOINT_PATH', '5'), ('CHECKPOINT_PATH', '7'), ('INFER_OUTPUT_PATH', '[1]'),
    # feature lengths
    ('TASK_FEATURE_LENGTHS', "{'inputs': 8}"), ('TASK_FEATURE_LENGTHS', "{'inputs': 0, 'targets': 2}"),
    ('TASK_FEATURE_LENGTHS', 'long'),
]


@pytest.mark.parametrize('name, text', BAD_MACROS)
def test_each_macro_is_checked_by_name_before_anything_runs(name, text, tmp_path, capsys):
  model_dir = tmp_path / 'run'
  assert commands.main(['train', '--gin_file=demo.gin', f'--gin.MODEL_DIR={model_dir}',
                        f'--gin.{name}={text}']) == 2
  err = capsys.readouterr().err.strip()
  value = gin_config.macro_value(text)
  assert err == (f'error: {name}={value!r} is not accepted: {name} takes '
                 f'{macro_checks.SPECS[name].accepted}'), err
  assert not model_dir.exists()


def test_infer_on_own_texts_checks_its_macros_too(tmp_path, capsys):
  words = tmp_path / 'words.txt'
  words.write_text('fbhde\n')
  assert commands.main(['infer', f'--gin.MODEL_DIR={tmp_path}', '--task=t',
                        f'--input_file={words}', '--gin.CHECKPOINT_PATH=3']) == 2
  assert capsys.readouterr().err.strip() == (
      f'error: CHECKPOINT_PATH=3 is not accepted: CHECKPOINT_PATH takes '
      f'{macro_checks.SPECS["CHECKPOINT_PATH"].accepted}')


def test_every_shipped_macro_has_a_spec_and_a_docs_row():
  """The CLI's gin files (not gin/t5x/, which T5X reads) define no macro without a spec;
  docs/CLI.md lists each with its accepted values; --help shows them."""
  root = gin_config.installed_gin_dirs()[0]
  files = [str(p.relative_to(root)) for p in root.rglob('*.gin') if p.parts[-2] != 't5x']
  defined = set()
  for name in files:
    defined |= set(macro_help.read_macros([name]))
  assert defined == set(macro_checks.SPECS), defined ^ set(macro_checks.SPECS)
  repo = next(p for p in pathlib.Path(__file__).resolve().parents if (p / 'setup.py').is_file())
  docs = (repo / 'docs' / 'CLI.md').read_text()
  for name, spec in macro_checks.SPECS.items():
    assert f'| `{name}` | {spec.accepted} |' in docs, name


def test_help_shows_accepted_values(capsys):
  assert commands.main(['train', '--help']) == 0
  out = ' '.join(capsys.readouterr().out.split())
  for name in ('LR_SCHEDULE', 'TRAIN_STEPS', 'EVAL_PERIOD'):
    assert f'(accepts {macro_checks.SPECS[name].accepted})' in out, name


@pytest.mark.parametrize('text, value', [
    ('/runs/demo', '/runs/demo'), ("'/runs/demo'", '/runs/demo'), ('"/runs/demo"', '/runs/demo'),
    ('8', 8), ('1e-3', 0.001), ('None', None), ('share', 'share'), ("'share'", 'share'),
    ("{'inputs': 8, 'targets': 2}", {'inputs': 8, 'targets': 2}), ('gs://b/x', 'gs://b/x')])
def test_one_parser_for_macro_values(text, value):
  assert gin_config.macro_value(text) == value


@pytest.mark.parametrize('argv', [
    ['eval'], ['infer'], ['analyze'], ['plot'],
    ['infer', '--task=hyperprompt_demo_max', '--input_file={words}']])
def test_model_dir_means_the_same_in_either_quoting_for_every_command(argv, tmp_path, capsys):
  """--gin.MODEL_DIR=/x and T5X's --gin.MODEL_DIR="'/x'" name the same directory."""
  words = tmp_path / 'words.txt'
  words.write_text('fbhde\n')
  argv = [a.format(words=words) for a in argv]
  model_dir = tmp_path / 'no_run'
  errors = []
  for form in (f'{model_dir}', f"'{model_dir}'"):
    assert commands.main(argv + [f'--gin.MODEL_DIR={form}']) == 2
    errors.append(capsys.readouterr().err.strip())
  assert errors[0] == errors[1], errors
  assert f'{model_dir}' in errors[0] and f"'{model_dir}" not in errors[0], errors[0]
  assert len(errors[0].splitlines()) == 1


def test_train_reads_model_dir_in_either_quoting(tmp_path):
  import gin
  for form in ('/x/run', "'/x/run'"):
    gin_config.parse(['demo.gin'], macros=[('MODEL_DIR', form)])
    assert gin.query_parameter('%MODEL_DIR') == '/x/run'


def test_model_dir_alone_adds_eval_and_infer_bindings_only_when_missing(tmp_path):
  (tmp_path / 'config.gin').write_text("MODEL_DIR = 'x'\nevaluate.model_dir = %MODEL_DIR\n")
  assert commands.run_gin_files('eval', str(tmp_path)) == [
      str(tmp_path / 'config.gin'), 'runs/infer.gin']
  (tmp_path / 'config.gin').write_bytes(b"MODEL_DIR = '\xe9'\n")
  with pytest.raises(commands.UsageError, match=f'{tmp_path / "config.gin"} is not UTF-8'):
    commands.run_gin_files('eval', str(tmp_path))


# ----------------------------------------------------------------------------
# --input_file: one input per line, blank lines included; errors name the file.
# ----------------------------------------------------------------------------


def test_input_file_keeps_every_line(tmp_path):
  txt = tmp_path / 'in.txt'
  txt.write_bytes(b'fbhde\r\n\n   \ncadg')
  assert predictor.read_input_file(str(txt)) == ['fbhde', '', '   ', 'cadg']
  jsonl = tmp_path / 'in.jsonl'
  jsonl.write_text('"fbhde"\n\n{"inputs": "cadg"}\n')
  assert predictor.read_input_file(str(jsonl)) == ['fbhde', '', {'inputs': 'cadg'}]
  assert [predictor.is_blank(x) for x in ['', ' \t', {'inputs': ' '}, 'a', {'inputs': 'a'}]] == [
      True, True, True, False, False]


@pytest.mark.parametrize('name, content, message', [
    ('missing.txt', None, '{path} does not exist'),
    ('folder.txt', 'dir', '{path} does not exist (it is a directory)'),
    ('empty.txt', b'', '{path} is empty'),
    ('latin1.txt', b'ok\ncaf\xe9\n', "{path} line 2: bytes b'\\xe9' at column 4 are not UTF-8"),
    ('bad.jsonl', b'"a"\n{"inputs": \n', '{path} line 2: not JSON'),
    ('number.jsonl', b'"a"\n"b"\n3\n', '{path} line 3: expected a string or an object'),
])
def test_input_file_errors_name_the_file_and_line(name, content, message, tmp_path, capsys):
  path = tmp_path / name
  if content == 'dir':
    path.mkdir()
  elif content is not None:
    path.write_bytes(content)
  before = snapshot(tmp_path)
  assert commands.main(['infer', f'--gin.MODEL_DIR={tmp_path}', '--task=t',
                        f'--input_file={path}']) == 2
  captured = capsys.readouterr()
  assert captured.out == ''
  assert captured.err.strip() == f'error: --input_file {message.format(path=path)}' or \
      captured.err.startswith(f'error: --input_file {message.format(path=path)}'), captured.err
  assert len(captured.err.strip().splitlines()) == 1
  assert snapshot(tmp_path) == before
