"""Several hosts at once, as on a TPU pod: two processes on CPU (jax.distributed with
a local coordinator, gloo collectives), each with one device and half of every batch.

* `python -m t5x.train` with hyperprompt_small.gin (the README's T5X fine-tuning)
  from the real tiny T5X checkpoint: step 0 calibrates the prompt scale on the
  global batch, so both processes hold bit-identical calibrated parameters; one
  calibration line (process 0's); the checkpoint both wrote restores.
* the project's own `train` likewise, on RTE with a SentencePiece vocabulary.

Each process runs under tests/calibration_probe.py, which saves the parameters step
0's calibration returned on that process. docs/PODS.md says how a pod run starts.
"""
import hashlib
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import FAST_XLA_FLAGS, REPO_ROOT, SPM_EXTRA_IDS, shared_file

PROBE = pathlib.Path(__file__).resolve().parent / 'calibration_probe.py'
RATIO_LINE = 'prompt/real key-value norm ratio per block on the first batch'
T5X_STEPS = 3
LEAN_STEPS = 2
SHAPES = dict(emb_dim=8, num_heads=4, head_dim=3, num_encoder_layers=2, num_decoder_layers=2,
              mlp_dim=16)   # test_t5_tiny's; its 32128 embedding rows are model.gin's default
# Packing: rows are never packed today (gin/t5x/finetune.gin, DatasetConfig.pack = False).
# When packed batches land, run both fixtures a second time with packing on here.
PACKING_BINDINGS = ()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(cache, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', XLA_FLAGS=FAST_XLA_FLAGS,
             PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get('PYTHONPATH', '')]),
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(name, None)
  env.update(extra)
  return env


def run_two_processes(root, argv_of, env_of) -> dict:
  """Starts process 0 and 1 (`argv_of(i)`, `env_of(i)`), waits for both: their
  exit codes, outputs, calibrated parameters and the wall time. Output goes to files:
  a pipe left unread while the other process is awaited would fill and stall both."""
  start = time.perf_counter()
  procs, files = [], []
  for i in range(2):
    out, err = (open(root / f'process_{i}.{kind}', 'w+') for kind in ('out', 'err'))
    files.append((out, err))
    procs.append(subprocess.Popen(
        [sys.executable, str(PROBE), str(root / f'calibrated_{i}.npz'), *argv_of(i)],
        cwd=root, env=env_of(i), stdout=out, stderr=err, text=True))
  try:
    for p in procs:
      p.wait(timeout=600)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  seconds = time.perf_counter() - start
  outputs = []
  for out, err in files:
    out.seek(0)
    err.seek(0)
    outputs.append((out.read(), err.read()))
    out.close()
    err.close()
  for i, (p, (_, err)) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f'process {i}: {err[-4000:]}'
  params = [dict(np.load(root / f'calibrated_{i}.npz')) for i in range(2)]
  return {'outputs': outputs, 'params': params, 'seconds': seconds}


def assert_restores(checkpoint, calibrated) -> None:
  """Every parameter of `checkpoint` reads back finite; the conditioning has trained on
  from the calibrated values."""
  from hyperprompt_t5x.checkpoints import pretrained
  restored = pretrained.flatten_params(pretrained.load_t5x_params(str(checkpoint)))
  assert restored['token_embedder/embedding'].shape == (32128, SHAPES['emb_dim'])
  assert all(np.isfinite(v).all() for v in restored.values())
  conditioning = {k[len('task_conditioning/'):]: v for k, v in restored.items()
                  if k.startswith('task_conditioning/')}
  assert sorted(conditioning) == sorted(calibrated)
  assert any(not np.array_equal(conditioning[k], calibrated[k]) for k in calibrated)


def assert_bit_identical(params) -> None:
  first, second = params
  assert first and sorted(first) == sorted(second)
  for name in first:
    assert first[name].tobytes() == second[name].tobytes(), name


@pytest.fixture(scope='module')
def t5x_two_processes(tmp_path_factory, t5x_tiny_checkpoint, compilation_cache):
  pytest.importorskip('t5x', reason='t5x not importable (install it with scripts/install_t5x.sh)')
  root = tmp_path_factory.mktemp('t5x_pod')
  initial = root / 'checkpoint_0'   # T5X's layout: checkpoint_<step>/checkpoint
  initial.mkdir()
  (initial / 'checkpoint').symlink_to(t5x_tiny_checkpoint)
  model_dir = root / 'run'
  port = _free_port()
  bindings = [f"MODEL_DIR='{model_dir}'", f"INITIAL_CHECKPOINT_PATH='{initial}'",
              "MIXTURE_OR_TASK_NAME='hyperprompt_demo'", 'NUM_TASKS=3',
              "TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 2}", f'TRAIN_STEPS={T5X_STEPS}',
              'BATCH_SIZE=8', 'RANDOM_SEED=0', 'train/utils.DatasetConfig.seed=0',
              'train.infer_eval_dataset_cfg=None', 'train.train_eval_dataset_cfg=None',
              "METHOD='global'", 'PROMPT_LENGTH=4', 'BOTTLENECK=8', *PACKING_BINDINGS,
              *[f'network.T5Config.{k}={v}' for k, v in SHAPES.items()]]

  def argv(i):
    return ['t5x.train', '--gin_file=hyperprompt_t5x/gin/t5x/hyperprompt_small.gin',
            f'--gin_search_paths={REPO_ROOT}', *[f'--gin.{b}' for b in bindings],
            '--multiprocess_gpu', f'--coordinator_address=127.0.0.1:{port}',
            '--process_count=2', f'--process_index={i}']

  result = run_two_processes(root, argv, lambda i: _env(compilation_cache))
  return model_dir, result


def test_t5x_train_on_two_processes_calibrates_alike(t5x_two_processes):
  model_dir, result = t5x_two_processes
  (_, err0), (_, err1) = result['outputs']
  assert f'[{T5X_STEPS}] collection=train' in err0   # T5X's summaries: process 0
  assert err0.count(RATIO_LINE) == 1 and RATIO_LINE not in err1
  assert_bit_identical(result['params'])
  # The checkpoint both processes wrote restores (in one process), every parameter.
  assert_restores(model_dir / f'checkpoint_{T5X_STEPS}', result['params'][0])
  print(f'\nt5x.train, 2 processes x 1 CPU device, {T5X_STEPS} steps: '
        f'{result["seconds"]:.1f} s wall; calibrated parameters bit-identical '
        f'({len(result["params"][0])} arrays)')


@pytest.fixture(scope='module')
def lean_two_processes(tmp_path_factory, t5x_tiny_checkpoint, sentencepiece_model,
                       compilation_cache):
  root = tmp_path_factory.mktemp('lean_pod')
  model_dir = root / 'run'
  port = _free_port()
  argv = ['hyperprompt_t5x.cli.commands', 'train', '--gin_file=demo.gin',
          f'--gin.MODEL_DIR={model_dir}', '--gin.XLA_FLAGS=None',
          "--gin.MIXTURE_OR_TASK_NAME='hyperprompt_glue_rte'", '--gin.NUM_TASKS=1',
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", '--gin.BATCH_SIZE=8',
          f'--gin.TRAIN_STEPS={LEAN_STEPS}', f'--gin.SAVE_PERIOD={LEAN_STEPS}',
          '--gin.EVAL_PERIOD=None', '--gin.LOG_PERIOD=1',
          f'--gin.INITIAL_CHECKPOINT_PATH={t5x_tiny_checkpoint}',
          '--gin_bindings=T5Config.vocab_size = 32128',
          *[f'--gin_bindings=T5Config.{k} = {v}' for k, v in SHAPES.items()]]
  glue = shared_file('glue/RTE/train.tsv').parents[1]

  def env(i):
    return _env(compilation_cache, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i), HYPERPROMPT_GLUE_DIR=str(glue),
                HYPERPROMPT_VOCABULARY=str(sentencepiece_model),
                HYPERPROMPT_VOCABULARY_EXTRA_IDS=str(SPM_EXTRA_IDS))

  result = run_two_processes(root, lambda i: argv, env)
  return model_dir, result


def test_project_train_on_two_processes_calibrates_alike(lean_two_processes,
                                                         sentencepiece_model):
  model_dir, result = lean_two_processes
  (out0, _), (out1, _) = result['outputs']
  assert out0.count(RATIO_LINE) == 1 and RATIO_LINE not in out1
  assert re.search(r'devices\s+2 x cpu \(2 processes\)', out0), out0
  assert_bit_identical(result['params'])
  from hyperprompt_t5x.run import model_dir_files
  assert_restores(model_dir / f'checkpoint_{LEAN_STEPS}', result['params'][0])
  copy = model_dir / model_dir_files.VOCABULARY_MODEL_FILE   # written once, by process 0
  assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(
      sentencepiece_model.read_bytes()).digest()
  print(f'\nhyperprompt-t5x train, 2 processes x 1 CPU device, {LEAN_STEPS} steps: '
        f'{result["seconds"]:.1f} s wall; calibrated parameters bit-identical')
