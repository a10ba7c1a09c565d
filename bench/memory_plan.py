"""Memory plan for TPU slices: what fits per device, and the largest batch that does.

    python bench/memory_plan.py --sizes=small,base,large,xl,xxl --methods=none,global \
        --partitions=1,2,4,8 --cache=bench/memory_plan.json --markdown

For each size, method and NUM_PARTITIONS (the 'model' mesh axis) it compiles the
project's sharded train step (`train_state.make_train_step`, the trainer's) on
host CPU devices (`--xla_force_host_platform_device_count`, in a subprocess)
from abstract inputs (`jax.ShapeDtypeStruct`s: nothing is initialised) and
reads XLA's memory analysis per device (bench/step_analysis.py). Per device:

* parameters and optimizer state: exact, from the shard shapes of the real
  tree under the project's partitioning rules (no compile);
* XLA temporaries (activations kept for the backward pass, gradients,
  workspace): from compiles at 1 and 2 encoder + decoder layers and per-device
  batch 1 and 2, fitted as temp = a + b·L + B·(c + d·L) (L layers, B per-device
  batch) and extrapolated to the size's layers. Only the per-device batch and
  NUM_PARTITIONS enter: the data axis shards the batch and (with T5X's
  1-D parameter partitioning) nothing else, so a slice's data-parallel width
  changes the global batch, not the memory per device (`--validate` compiles
  one configuration at a real device count to check this).

A slice fits per-device batch B when params + optimizer state + temp(B) + the
batch itself <= HBM (v4: 32 GiB, v5e: 16 GiB per chip; a v4-N slice has N/2
chips, v5e-N has N). Reported: the largest such B and the global batch
(data-parallel width x B). XLA:CPU's buffer assignment stands in for the TPU's:
CPU has no bf16 arithmetic (bf16 values are widened to float32 around each op),
so temporaries here are an upper bound for a TPU; parameters and optimizer
state are exact. Results are cached in a JSON file (one compile per key), so
the table can be built in pieces, in the background.

Imports JAX, Flax, optax and the project's model/step modules only.
"""
import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))

from bench import train_step as bench_step  # noqa: E402
from bench import step_analysis  # noqa: E402
from hyperprompt_t5x import partitioning  # noqa: E402
from hyperprompt_t5x.model import network  # noqa: E402

GIB = 2**30
# slice name -> (chips = JAX devices, HBM GiB per chip).
SLICES = {**{f'v4-{n}': (n // 2, 32) for n in (8, 16, 32, 64, 128, 256)},
          **{f'v5e-{n}': (n, 16) for n in (8, 16, 32, 64, 128, 256)}}
# NUM_PARTITIONS of gin/hyperprompt_<size>.gin, used by --partitions=default.
DEFAULT_PARTITIONS = {'tiny': 1, 'small': 1, 'base': 1, 'large': 1, 'xl': 4, 'xxl': 8}
FIT_LAYERS = (1, 2)  # encoder = decoder layers compiled for the fit
FIT_BATCH = (1, 2)  # per-device batch compiled for the fit
# Fast XLA:CPU compiles: the memory analysis comes from HLO buffer assignment,
# which these LLVM-level flags do not change (checked: identical figures).
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def _key(**kw) -> str:
  return json.dumps(kw, sort_keys=True)


def job_key(args, size, method, partitions, kind, layers=None, batch=None, devices=None):
  """The cache key of one measurement (everything that changes its result)."""
  return _key(size=size, method=method, partitions=partitions, kind=kind, layers=layers,
              batch=batch, devices=devices, optimizer=args.optimizer, freeze=args.freeze,
              inputs_len=args.inputs_len, targets_len=args.targets_len, dtype=args.dtype,
              num_tasks=args.num_tasks)


def partitions_for(args, size: str) -> List[int]:
  return [DEFAULT_PARTITIONS[size]] if args.partitions == 'default' else args.partitions


def bench_config(args, size, method, layers=None, batch=1):
  return bench_step.BenchConfig(
      size=size, method=method, freeze=args.freeze, optimizer=args.optimizer, batch=batch,
      inputs_len=args.inputs_len, targets_len=args.targets_len, dtype=args.dtype,
      num_tasks=args.num_tasks, dropout_rate=0.1, num_layers=layers)


def needed_jobs(args) -> List[Dict[str, Any]]:
  """Every measurement the table needs: state bytes at full size, temp at the fit points."""
  jobs = []
  for size in args.sizes:
    for method in args.methods:
      for p in partitions_for(args, size):
        jobs.append(dict(size=size, method=method, partitions=p, kind='state'))
        for layers in FIT_LAYERS:
          for b in FIT_BATCH:
            jobs.append(dict(size=size, method=method, partitions=p, kind='temp',
                             layers=layers, batch=b))
  if args.validate:
    size, method, p, devices = args.validate
    jobs.append(dict(size=size, method=method, partitions=p, kind='validate',
                     batch=FIT_BATCH[-1], devices=devices))
  return jobs


def run_job(args, job) -> Dict[str, Any]:
  """One measurement, in the worker process (host devices already configured)."""
  import jax  # pylint: disable=g-import-not-at-top
  from bench import step_analysis  # pylint: disable=g-import-not-at-top
  p = job['partitions']
  devices = job.get('devices') or p
  mesh = partitioning.make_mesh(p, jax.devices()[:devices])
  if job['kind'] == 'state':
    return step_analysis.state_bytes(bench_config(args, job['size'], job['method']), mesh)
  # 'temp': data axis 1, so the global batch is the per-device batch; 'validate':
  # the full model on `devices` devices, global batch = data width x per-device batch.
  data = devices // p
  cfg = bench_config(args, job['size'], job['method'], job.get('layers'), job['batch'] * data)
  rep = step_analysis.analyze(cfg, mesh)
  return {k: rep[k] for k in ('temp_bytes', 'argument_bytes', 'output_bytes', 'alias_bytes',
                              'compiled_peak_bytes', 'compile_s')}


def _worker(argv):
  """Subprocess entry: runs the jobs in argv[1] (JSON), appending results to the cache."""
  args = parse_args(json.loads(argv[0]))
  jobs = json.loads(argv[1])
  for job in jobs:
    result = run_job(args, job)
    cache = load_cache(args.cache)
    cache[job_key(args, **job)] = result
    save_cache(args.cache, cache)
    print('done', json.dumps(job), flush=True)


def load_cache(path: pathlib.Path) -> Dict[str, Any]:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return {}
  except ValueError as e:
    raise SystemExit(f'memory_plan: cache {path} is not valid JSON ({e}); move it away') from e


def save_cache(path: pathlib.Path, cache: Dict[str, Any]) -> None:
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
  os.replace(tmp, path)


def measure(args, argv: Sequence[str]) -> None:
  """Runs the jobs missing from the cache in one subprocess with enough host devices."""
  cache = load_cache(args.cache)
  todo = [j for j in needed_jobs(args) if job_key(args, **j) not in cache]
  if not todo:
    return
  devices = max(j.get('devices') or j['partitions'] for j in todo)
  flags = os.environ.get('XLA_FLAGS', '')
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS=f'{flags} {FAST_COMPILE} '
                       f'--xla_force_host_platform_device_count={devices}'.strip())
  print(f'memory_plan: {len(todo)} compiles on {devices} host devices', flush=True)
  subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), '--_worker',
                  json.dumps(list(argv)), json.dumps(todo)], env=env, check=True)


def fit_temp(points: Dict[tuple, float]) -> Dict[str, float]:
  """temp(L, B) = a + b·L + B·(c + d·L) through the four (L, B) fit points."""
  (l1, l2), (b1, b2) = FIT_LAYERS, FIT_BATCH
  per_b = {l: (points[(l, b2)] - points[(l, b1)]) / (b2 - b1) for l in FIT_LAYERS}
  fixed = {l: points[(l, b1)] - b1 * per_b[l] for l in FIT_LAYERS}
  d = (per_b[l2] - per_b[l1]) / (l2 - l1)
  b = (fixed[l2] - fixed[l1]) / (l2 - l1)
  return {'a': fixed[l1] - b * l1, 'b': b, 'c': per_b[l1] - d * l1, 'd': d}


def predict_temp(coef: Dict[str, float], layers: int, batch: float) -> float:
  return coef['a'] + coef['b'] * layers + batch * (coef['c'] + coef['d'] * layers)


def batch_bytes(args, per_device_batch: float) -> float:
  """The int32/float32 batch arrays on one device."""
  return per_device_batch * 4 * (args.inputs_len + 3 * args.targets_len + 1)


def plan(args) -> List[Dict[str, Any]]:
  """One row per (size, method, partitions, slice) from the cached measurements."""
  cache = load_cache(args.cache)
  rows = []
  for size in args.sizes:
    layers = network.T5Config.from_size(size).num_encoder_layers
    for method in args.methods:
      for p in partitions_for(args, size):
        get = lambda **kw: cache[job_key(args, size, method, p, **kw)]
        state = get(kind='state')
        coef = fit_temp({(l, b): get(kind='temp', layers=l, batch=b)['temp_bytes']
                         for l in FIT_LAYERS for b in FIT_BATCH})
        fixed = (state['param_bytes_per_device'] + state['opt_state_bytes_per_device']
                 + predict_temp(coef, layers, 0))
        per_example = (predict_temp(coef, layers, 1) - predict_temp(coef, layers, 0)
                       + batch_bytes(args, 1))
        for name in args.slices:
          chips, hbm_gib = SLICES[name]
          if chips % p:
            continue
          max_b = max(0, math.floor((hbm_gib * GIB - fixed) / per_example))
          rows.append(dict(
              size=size, method=method, partitions=p, slice=name, chips=chips,
              hbm_gib=hbm_gib, param_gib=state['param_bytes_per_device'] / GIB,
              opt_state_gib=state['opt_state_bytes_per_device'] / GIB,
              fixed_temp_gib=predict_temp(coef, layers, 0) / GIB,
              activation_gib_per_example=per_example / GIB,
              max_batch_per_device=max_b, max_global_batch=max_b * (chips // p),
              peak_gib_at_max=(fixed + max_b * per_example) / GIB))
  return rows


def validation(args) -> Optional[Dict[str, Any]]:
  """Prediction vs a compile at a real device count (--validate)."""
  if not args.validate:
    return None
  size, method, p, devices = args.validate
  cache = load_cache(args.cache)
  get = lambda **kw: cache[job_key(args, size, method, p, **kw)]
  coef = fit_temp({(l, b): get(kind='temp', layers=l, batch=b)['temp_bytes']
                   for l in FIT_LAYERS for b in FIT_BATCH})
  layers = network.T5Config.from_size(size).num_encoder_layers
  measured = get(kind='validate', batch=FIT_BATCH[-1], devices=devices)['temp_bytes']
  predicted = predict_temp(coef, layers, FIT_BATCH[-1])
  return dict(size=size, method=method, partitions=p, devices=devices,
              per_device_batch=FIT_BATCH[-1], predicted_temp_bytes=predicted,
              measured_temp_bytes=measured, error_pct=100 * (predicted / measured - 1))


def markdown(rows: List[Dict[str, Any]]) -> str:
  """One line per (size, method, NUM_PARTITIONS); per chip type the largest batch per
  device and the global batch on the smallest..largest slice asked for."""
  head = ('| size | method | NUM_PARTITIONS | params GiB | opt state GiB | fixed temp GiB '
          '| GiB per example | v4 (32 GiB): batch / device, global | '
          'v5e (16 GiB): batch / device, global |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  groups: Dict[tuple, List[Dict[str, Any]]] = {}
  for r in rows:
    groups.setdefault((r['size'], r['method'], r['partitions']), []).append(r)
  for (size, method, p), group in groups.items():
    r = group[0]
    cells = []
    for chip in ('v4', 'v5e'):
      on = [g for g in group if g['slice'].startswith(chip + '-')]
      b = on[0]['max_batch_per_device'] if on else None
      if not on:
        cells.append('')
      elif not b:
        cells.append('does not fit')
      else:
        cells.append(f"{b}: {on[0]['max_global_batch']} ({on[0]['slice']})"
                     + (f" .. {on[-1]['max_global_batch']} ({on[-1]['slice']})"
                        if len(on) > 1 else ''))
    lines.append(
        f"| {size} | {method} | {p} | {r['param_gib']:.2f} | {r['opt_state_gib']:.2f} | "
        f"{r['fixed_temp_gib']:.2f} | {r['activation_gib_per_example']:.3f} | "
        f"{cells[0]} | {cells[1]} |")
  return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--sizes', type=bench_step.csv_list(str, bench_step.SIZES), default=['small', 'base'])
  p.add_argument('--methods', type=bench_step.csv_list(str, bench_step.METHODS), default=['none', 'global'])
  p.add_argument('--partitions', default='default',
                 help="NUM_PARTITIONS list, or 'default': each size's gin default "
                      '(1 up to large, xl 4, xxl 8)')
  p.add_argument('--slices', type=bench_step.csv_list(str, SLICES), default=list(SLICES))
  p.add_argument('--optimizer', choices=bench_step.OPTIMIZERS, default='adafactor',
                 help="adafactor: the shipped default (gin/runs/finetune.gin)")
  p.add_argument('--freeze', choices=bench_step.FREEZE, default='all')
  p.add_argument('--inputs_len', type=int, default=512)
  p.add_argument('--targets_len', type=int, default=64)
  p.add_argument('--dtype', default='bfloat16')
  p.add_argument('--num_tasks', type=int, default=8)
  p.add_argument('--validate', type=bench_step.csv_list(str), default=None,
                 help='SIZE,METHOD,PARTITIONS,DEVICES: also compile the full model on '
                      'DEVICES host devices and compare with the prediction')
  p.add_argument('--cache', type=pathlib.Path, default=pathlib.Path('memory_plan.json'),
                 help='JSON of the measurements (reused; extended with missing ones)')
  p.add_argument('--markdown', action='store_true', help='print the table as Markdown')
  p.add_argument('--measure_only', action='store_true', help='fill the cache, no table')
  args = p.parse_args(argv)
  if args.validate is not None:
    if len(args.validate) != 4:
      p.error('--validate takes SIZE,METHOD,PARTITIONS,DEVICES')
    size, method, parts, devices = args.validate
    args.validate = (size, method, int(parts), int(devices))
  if args.partitions != 'default':
    try:
      args.partitions = [int(n) for n in args.partitions.split(',') if n]
    except ValueError:
      p.error(f"--partitions takes integers or 'default', got {args.partitions!r}")
    if not args.partitions or min(args.partitions) < 1:
      p.error(f'--partitions must be >= 1, got {args.partitions}')
  return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  measure(args, argv)
  if args.measure_only:
    return []
  rows = plan(args)
  print(markdown(rows) if args.markdown else json.dumps(rows, indent=1))
  check = validation(args)
  if check:
    print(f"validation: {check['size']} {check['method']} NUM_PARTITIONS={check['partitions']} "
          f"on {check['devices']} devices, {check['per_device_batch']}/device: temp predicted "
          f"{check['predicted_temp_bytes'] / GIB:.3f} GiB, compiled "
          f"{check['measured_temp_bytes'] / GIB:.3f} GiB ({check['error_pct']:+.1f} %)")
  return rows


if __name__ == '__main__':
  if len(sys.argv) > 1 and sys.argv[1] == '--_worker':
    _worker(sys.argv[2:])
  else:
    main()
