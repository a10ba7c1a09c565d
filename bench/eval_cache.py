"""First vs second wall time of `t5x eval` on the demo: JAX's persistent compilation cache.

Each eval is a fresh process (`t5x eval --gin.MODEL_DIR=DIR`, the run's own
config) with HYPERPROMPT_COMPILATION_CACHE pointing at a new, empty folder: the
first run compiles and fills it, the second reads its programs from it. A third
run with the cache off is the reference. Prints the wall times, the cache's
entries and the machine's load (the rest of an eval's time is Python and
TensorFlow start-up and the input pipeline, which no compilation cache removes).

  python bench/eval_cache.py [--model_dir DIR]   # default: trains the demo in a temp dir
"""
import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def cli(*argv: str, cache: str) -> float:
  """Runs `hyperprompt-t5x ARGV` in a fresh process; its wall time in seconds."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', HYPERPROMPT_COMPILATION_CACHE=cache,
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
  t0 = time.perf_counter()
  result = subprocess.run([sys.executable, '-m', 'hyperprompt_t5x.cli.commands', *argv],
                          env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - t0
  if result.returncode != 0:
    raise SystemExit(f'{" ".join(argv)} failed:\n{result.stderr[-3000:]}')
  return seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model_dir', help='a trained demo run (default: train one)')
  args = parser.parse_args()
  work = pathlib.Path(tempfile.mkdtemp(prefix='eval_cache_'))
  try:
    model_dir = args.model_dir
    if not model_dir:
      model_dir = str(work / 'demo')
      seconds = cli('train', '--gin_file=demo.gin', f'--gin.MODEL_DIR={model_dir}', cache='off')
      print(f'trained the demo in {seconds:.1f} s ({model_dir})')
    cache = work / 'cache'
    first = cli('eval', f'--gin.MODEL_DIR={model_dir}', cache=str(cache))
    entries = len(list(cache.iterdir()))
    second = cli('eval', f'--gin.MODEL_DIR={model_dir}', cache=str(cache))
    off = cli('eval', f'--gin.MODEL_DIR={model_dir}', cache='off')
    print(f'eval, empty cache (compiles, fills it with {entries} programs): {first:.1f} s')
    print(f'eval, same shapes again (reads them): {second:.1f} s '
          f'({len(list(cache.iterdir())) - entries} new entries)')
    print(f'eval, cache off: {off:.1f} s')
    print(f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end')
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
