"""Shared pytest set-up: quiet, offline, and where the real test data lives."""
import os
import pathlib

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('USE_TF', '0')
os.environ.setdefault('TFDS_DISABLE_GCS', '1')
# XLA's CPU compile dominates this suite (tiny models, many configs): skip
# LLVM's expensive passes, and use XLA:CPU's classic loop fusion emitter instead
# of the MLIR fusion emitters (a tiny train step compiles in ~40 % less time,
# runs a little slower). Tests that start their own JAX processes pass these on.
FAST_XLA_FLAGS = ('--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true '
                  '--xla_cpu_use_fusion_emitters=false')
os.environ.setdefault('XLA_FLAGS', FAST_XLA_FLAGS)
# The CLI and load() turn on a per-user persistent compilation cache by default
# (compilation_cache.py); the suite writes nothing to the user's cache folder. Tests
# that want a cache use `compilation_cache` below (JAX's own setting, which the CLI
# keeps) or their own folder.
os.environ.setdefault('HYPERPROMPT_COMPILATION_CACHE', 'off')

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (CI lays a copy there too).
SHARED_DATA = pathlib.Path(
    os.environ.get('HYPERPROMPT_SHARED_DATA', REPO_ROOT.parent / 'shared' / 'data'))


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
  """The real GLUE/SuperGLUE files and T5X checkpoint in ../shared/data."""
  if not SHARED_DATA.is_dir():
    raise FileNotFoundError(
        f'{SHARED_DATA} is missing: these tests read the real data in ../shared/data '
        '(set HYPERPROMPT_SHARED_DATA to its location).')
  return SHARED_DATA


def shared_file(relative: str) -> pathlib.Path:
  """../shared/data/<relative>, or one line naming the missing file."""
  path = SHARED_DATA / relative
  if not path.exists():
    raise FileNotFoundError(2, 'missing from ../shared/data (HYPERPROMPT_SHARED_DATA)',
                            str(path))
  return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """A test that fails because a file of ../shared/data is missing says which, in one line."""
  outcome = yield
  report = outcome.get_result()
  error = call.excinfo.value if call.excinfo is not None else None
  if report.failed and error is not None and type(error).__name__ in (
      'FileNotFoundError', 'NotFoundError') and str(SHARED_DATA) in str(error):
    missing = getattr(error, 'filename', None)
    report.longrepr = (f'{item.name} needs ../shared/data ({SHARED_DATA}, '
                       'HYPERPROMPT_SHARED_DATA): '
                       + (f'{missing} is missing' if missing else str(error).splitlines()[0]))


@pytest.fixture(scope='session')
def t5x_tiny_checkpoint(shared_data) -> pathlib.Path:
  """A real T5X legacy checkpoint of a tiny T5 1.1 (emb 8, 4x3 heads, 2+2 layers)."""
  del shared_data
  return shared_file('t5x/test_t5_tiny.checkpoint_0')


# The GLUE training files the test SentencePiece model learns from (T5's learnt from C4).
SPM_TRAINING_FILES = ('glue/RTE/train.tsv', 'glue/MRPC/train.tsv', 'glue/STS-B/train.tsv',
                      'glue/WNLI/train.tsv')
SPM_PIECES = 2000
SPM_EXTRA_IDS = 28   # sentinels: 2028 ids, fewer than the model's 2048 (or T5's 32128) rows


@pytest.fixture(scope='session')
def sentencepiece_model(tmp_path_factory) -> pathlib.Path:
  """A SentencePiece model (T5's conventions: pad 0, eos 1, unk 2, no bos) of 2000
  pieces trained by the sentencepiece package on the text fields of GLUE training files."""
  import sentencepiece as spm
  texts = []
  for relative in SPM_TRAINING_FILES:
    rows = shared_file(relative).read_text(encoding='utf-8').splitlines()[1:]
    texts += [field for row in rows for field in row.split('\t')
              if sum(c.isalpha() for c in field) > 8]
  prefix = tmp_path_factory.mktemp('spm') / 'glue'
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_prefix=str(prefix), vocab_size=SPM_PIECES,
      model_type='unigram', character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      num_threads=1, minloglevel=2)
  return prefix.with_suffix('.model')


def _session_root(tmp_path_factory) -> pathlib.Path:
  """The test run's temp root: shared by pytest-xdist's workers (each has a child of it)."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


@pytest.fixture(scope='module')
def compilation_cache(tmp_path_factory):
  """JAX's persistent compilation cache, one for the whole test run (and its subprocesses).

  One XLA compile per distinct program across every module, worker and
  subprocess that uses it: the trainer, demo, reliability and T5X tests build
  the same tiny programs many times. Entries are written whole or not read
  (JAX recompiles on an unreadable entry), so the workers can share it.
  """
  import jax
  cache = _session_root(tmp_path_factory) / 'xla_cache'
  cache.mkdir(exist_ok=True)
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  before = {n: getattr(jax.config, n) for n in names}
  jax.config.update('jax_compilation_cache_dir', str(cache))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  yield cache
  for n, v in before.items():
    jax.config.update(n, v)


@pytest.fixture(scope='module')
def byte_task_vocabulary():
  """GLUE/SuperGLUE tasks on seqio's byte vocabulary for one module, restored after.

  The default T5 SentencePiece model is on gs://, unreachable offline. Also
  clears any data folders the module set.
  """
  from hyperprompt_t5x import tasks
  previous = tasks.get_vocabulary()
  vocabulary = tasks.set_vocabulary('byte')
  yield vocabulary
  tasks.set_vocabulary(previous)
  tasks.set_data_dirs(None, None)


def run_t5x(script: str, gin_file: str, cwd, *bindings: str, cache=None,
            expect_rc: int = 0) -> str:
  """`python -m t5x.<script>` (real T5X) on hyperprompt_t5x/gin/t5x/<gin_file>: its stderr.

  The editable install keeps the gin files in the checkout: its root holds
  hyperprompt_t5x/gin (a link to gin/), the path the gin includes use.
  `cache`: a persistent XLA cache (`compilation_cache`) the run shares.
  """
  import subprocess
  import sys
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu')
  if cache is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  argv = [sys.executable, '-m', f't5x.{script}',
          f'--gin_file=hyperprompt_t5x/gin/t5x/{gin_file}',
          f'--gin_search_paths={REPO_ROOT}', *[f'--gin.{b}' for b in bindings]]
  result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == expect_rc, result.stderr[-4000:]
  return result.stderr
