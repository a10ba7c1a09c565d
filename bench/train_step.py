"""Times the project's real jitted train step on synthetic batches.

    python bench/train_step.py --sizes=base --methods=none,global \
        --batch=64 --inputs_len=512 --targets_len=64 --out=/tmp/bench.json

For every combination of the list flags (sizes × methods × freeze × attention
implementations × remat policies) it builds the model, optimizer and sharded
train state with the project's own code (`models`, `optim`, `partitioning`,
`train_state`), calls the step function `make_train_step(...)` returns, as the
trainer does (its first call compiles: compile_s = first call − median step),
runs `--warmup` untimed steps, then `--steps` timed ones. Each timed step is synchronised by `block_until_ready` on its loss and on
nothing else; batches and per-step RNG keys are on the device before the loop,
so the loop does no other host transfer. The train state is threaded through,
as the step donates it.

Reported per configuration (table on stdout, JSON in --out): step ms (median,
p10, p90), tokens/s (input + target positions, padding included, as computed),
model TFLOP/s (bench/flops.py), peak memory (the device's `peak_bytes_in_use`
where the backend reports it; on the CPU the process's peak RSS; both cumulative
over the configurations run in one process: `peak_memory_source` says which),
compile time, and the overhead of each method against 'none' with the same
other settings in the same run.

Imports JAX, Flax, optax and the project's model/step modules only: no gin,
seqio or TensorFlow (a GPU host needs none of them).
"""
import argparse
import dataclasses
import datetime
import itertools
import json
import os
import pathlib
import platform
import resource
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a script from a bare checkout
  sys.path.insert(0, str(_REPO))

from bench import flops as flops_lib  # noqa: E402
from bench import step_analysis  # noqa: E402
from hyperprompt_t5x import optim, partitioning  # noqa: E402
from hyperprompt_t5x.run import train_state  # noqa: E402

SIZES = ('tiny', 'small', 'base', 'large', 'xl', 'xxl')
METHODS = flops_lib.ALL_METHODS
FREEZE = ('all', 'conditioning')
OPTIMIZERS = ('adamw', 'adafactor')
# Keys every successful record carries, in train_step.py and hf_peer.py alike.
RESULT_KEYS = (
    'impl', 'size', 'method', 'freeze', 'optimizer', 'batch', 'inputs_len', 'targets_len',
    'dtype', 'attention_impl', 'remat_policy', 'num_params', 'num_trainable_params',
    'step_ms_median', 'step_ms_p10', 'step_ms_p90', 'steps', 'warmup', 'tokens_per_s',
    'model_flops_per_step', 'model_tflops_per_s', 'peak_memory_bytes', 'peak_memory_source',
    'compile_s', 'overhead_vs_none_pct', 'final_loss', 'error')


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """One timed configuration."""
  size: str = 'base'
  method: str = 'global'
  freeze: str = 'all'
  optimizer: str = 'adamw'
  batch: int = 64
  inputs_len: int = 512
  targets_len: int = 64
  dtype: str = 'bfloat16'
  attention_impl: str = 'xla'
  remat_policy: str = 'none'
  embedding_lookup: Optional[str] = None  # None: the config's default
  prompt_length: Optional[int] = None  # None: the config's default
  num_tasks: int = 8
  dropout_rate: float = 0.1
  attention_dropout_rate: Optional[float] = None  # None: dropout_rate (T5X)
  learning_rate: float = 1e-4
  weight_decay: float = 0.01  # torch.optim.AdamW's default, so the peer matches
  warmup: int = 3
  steps: int = 10
  num_batches: int = 2  # distinct device batches the loop rotates through
  seed: int = 0
  num_layers: Optional[int] = None  # None: the size's; else this many encoder and decoder layers
  vocab_size: Optional[int] = None  # None: the size's


def percentile(values: Sequence[float], q: float) -> float:
  """Linear-interpolated percentile (q in [0, 100]) of a non-empty sequence."""
  xs = sorted(values)
  if not xs:
    raise ValueError('percentile of an empty sequence')
  pos = (len(xs) - 1) * q / 100.0
  lo = int(pos)
  hi = min(lo + 1, len(xs) - 1)
  return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def synthetic_batch(rng, batch: int, inputs_len: int, targets_len: int, vocab_size: int,
                    num_tasks: int) -> Dict[str, Any]:
  """A T5X-style unpacked batch of random tokens with random-length padding and task ids.

  Each row keeps between half and all of its positions (token 0 pads the rest,
  EOS=1 closes the real part); decoder inputs are the targets shifted right.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  def tokens(length):
    # [batch, length] random ids in [2, vocab); a random real length per row.
    ids = rng.integers(2, vocab_size, size=(batch, length), dtype=np.int32)
    real = rng.integers(max(1, length // 2), length + 1, size=(batch, 1))
    pos = np.arange(length)[None, :]
    ids = np.where(pos < real - 1, ids, np.where(pos == real - 1, 1, 0)).astype(np.int32)
    return ids
  enc = tokens(inputs_len)
  tgt = tokens(targets_len)
  # [batch, targets_len] -> shifted right by one, 0 (BOS) first.
  dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
  return {
      'encoder_input_tokens': enc,
      'decoder_target_tokens': tgt,
      'decoder_input_tokens': dec_in,
      'decoder_loss_weights': (tgt > 0).astype(np.float32),
      'task_ids': rng.integers(0, num_tasks, size=(batch,), dtype=np.int32),
  }


def _peak_memory():
  """(bytes, source): the device's peak allocation, else the process's peak RSS."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device.memory_stats.peak_bytes_in_use'
  # Linux reports ru_maxrss in KiB.
  return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          'process_peak_rss (cumulative over this process)')


def _count(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def build(cfg: BenchConfig):
  """Builds (config, mesh, state, step_fn) with the project's own code, as the trainer does."""
  import jax  # pylint: disable=g-import-not-at-top

  config, model, optimizer, rules = step_analysis.model_and_optimizer(cfg)
  mesh = partitioning.make_mesh(1)
  # Parameters are initialised from an 'unsafe_rbg' key: their values do not matter
  # here, and XLA:CPU compiles a threefry init of the whole tree several times slower
  # (59 s vs 11 s for 'tiny' on 2 loaded cores). Dropout keys use --prng_impl.
  init_key = jax.random.key(cfg.seed, impl='unsafe_rbg')
  state, shardings = train_state.create_train_state(
      model, optimizer, init_key, mesh, rules, cfg.inputs_len, cfg.targets_len)
  step_fn = train_state.make_train_step(model, optimizer, mesh, shardings, freeze=cfg.freeze)
  return config, mesh, state, step_fn


class Runner:
  """One configuration, built and compiled, ready to time in one go or in rounds."""

  def __init__(self, cfg: BenchConfig):
    """Builds the state and step, places the batches and keys, compiles, warms up."""
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    self.cfg = cfg
    self.config, mesh, self.state, self.step_fn = build(cfg)
    np_rng = np.random.default_rng(cfg.seed)
    self.batches = [partitioning.shard_batch(
        synthetic_batch(np_rng, cfg.batch, cfg.inputs_len, cfg.targets_len,
                        self.config.vocab_size, self.config.num_tasks), mesh)
                    for _ in range(max(1, cfg.num_batches))]
    self.keys = list(jax.random.split(jax.random.PRNGKey(cfg.seed + 1),
                                      cfg.warmup + cfg.steps + 1))
    jax.block_until_ready((self.batches, self.keys))
    leaves = jax.tree_util.tree_leaves(self.state.params)
    mask = jax.tree_util.tree_leaves(optim.trainable_mask(self.state.params, cfg.freeze))
    self.num_params = int(sum(x.size for x in leaves))
    self.num_trainable = int(sum(x.size for x, m in zip(leaves, mask) if m))
    self.calls = 0
    self.times: List[float] = []
    self.loss = None
    # Compiled ahead of the first call (the trainer's jitted step, lowered on these
    # arguments), so XLA's FLOP and memory analysis come with every record.
    t0 = time.perf_counter()
    self.compiled = self.step_fn.jitted.lower(self.state, self.batches[0],
                                              self.keys[0]).compile()
    self.compile_s = time.perf_counter() - t0
    self.analysis = step_analysis.compiled_report(self.compiled, mesh.size)
    t0 = time.perf_counter()
    self._call()
    self.first_call_s = time.perf_counter() - t0
    for _ in range(cfg.warmup):
      self._call()

  def _call(self):
    i = self.calls
    self.state, metrics = self.compiled(self.state, self.batches[i % len(self.batches)],
                                        self.keys[i % len(self.keys)])
    self.calls += 1
    self.loss = metrics['loss'].block_until_ready()  # the only sync in the loop

  def time_steps(self, n: int) -> None:
    """Runs n timed steps, each synchronised on its loss."""
    for _ in range(n):
      t0 = time.perf_counter()
      self._call()
      self.times.append(time.perf_counter() - t0)

  def record(self) -> Dict[str, Any]:
    """The result record of the steps timed so far."""
    cfg, config = self.cfg, self.config
    peak, peak_source = _peak_memory()
    prompt_length = int(getattr(config, 'prompt_length', 0) or 0)
    flops = step_analysis.formula_flops(cfg, config)
    median_s = percentile(self.times, 50)
    return {
        'impl': 'hyperprompt_t5x (jax)', 'size': cfg.size, 'method': cfg.method,
        'freeze': cfg.freeze, 'optimizer': cfg.optimizer, 'batch': cfg.batch,
        'inputs_len': cfg.inputs_len, 'targets_len': cfg.targets_len, 'dtype': cfg.dtype,
        'attention_impl': cfg.attention_impl, 'remat_policy': cfg.remat_policy,
        'embedding_lookup': getattr(config, 'embedding_lookup', None),
        'prompt_length': prompt_length, 'dropout_rate': cfg.dropout_rate,
        'attention_dropout_rate': getattr(config, 'attention_dropout', cfg.dropout_rate),
        'num_params': self.num_params, 'num_trainable_params': self.num_trainable,
        'step_ms_median': 1e3 * median_s, 'step_ms_p10': 1e3 * percentile(self.times, 10),
        'step_ms_p90': 1e3 * percentile(self.times, 90), 'steps': len(self.times),
        'warmup': cfg.warmup,
        'tokens_per_s': cfg.batch * (cfg.inputs_len + cfg.targets_len) / median_s,
        'model_flops_per_step': flops, 'model_tflops_per_s': flops / median_s / 1e12,
        'peak_memory_bytes': peak, 'peak_memory_source': peak_source,
        'compile_s': self.compile_s, 'first_call_s': self.first_call_s,
        'overhead_vs_none_pct': None, 'final_loss': float(self.loss), 'error': None,
        **self.analysis, 'xla_flops_ratio': self.analysis['xla_flops'] / flops,
    }


def analyze_one(cfg: BenchConfig) -> Dict[str, Any]:
  """Compiles one configuration from abstract inputs (nothing initialised or run)."""
  return dict(dataclasses.asdict(cfg), impl='hyperprompt_t5x (jax)', compile_only=True,
              error=None, **step_analysis.analyze(cfg))


def run_one(cfg: BenchConfig) -> Dict[str, Any]:
  """Builds, compiles and times one configuration; returns its result record."""
  runner = Runner(cfg)
  runner.time_steps(cfg.steps)
  return runner.record()


_SAME_RUN_KEYS = ('impl', 'size', 'freeze', 'optimizer', 'batch', 'inputs_len', 'targets_len',
                  'dtype', 'attention_impl', 'remat_policy')


def add_overheads(results: List[Dict[str, Any]]) -> None:
  """Sets overhead_vs_none_pct = 100·(t / t_none − 1) against 'none' with equal other keys."""
  base = {tuple(r.get(k) for k in _SAME_RUN_KEYS): r.get('step_ms_median')
          for r in results if r.get('method') == 'none' and r.get('error') is None}
  for r in results:
    t_none = base.get(tuple(r.get(k) for k in _SAME_RUN_KEYS))
    if r.get('error') is None and t_none and r.get('step_ms_median'):
      r['overhead_vs_none_pct'] = 100.0 * (r['step_ms_median'] / t_none - 1.0)


def environment() -> Dict[str, Any]:
  """Machine and versions, for the JSON's 'meta'."""
  import jax  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  dev = jax.local_devices()[0]
  return {
      'date_utc': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M'),
      'backend': jax.default_backend(), 'device_kind': dev.device_kind,
      'num_devices': jax.device_count(), 'cpu_count': os.cpu_count(),
      'platform': platform.platform(), 'python': platform.python_version(),
      'jax': jax.__version__, 'flax': flax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'prng_impl': str(getattr(jax.config, 'jax_default_prng_impl', 'unknown')),
  }


def format_table(results: List[Dict[str, Any]]) -> str:
  """A fixed-width table of the results (errors shown in place of numbers)."""
  head = (f"{'impl':<22} {'size':<6} {'method':<13} {'freeze':<12} {'attn':<21} "
          f"{'remat':<6} {'batch':>5} {'in/tgt':>8} {'ms med':>9} {'p10':>9} {'p90':>9} "
          f"{'tok/s':>9} {'TFLOP/s':>8} {'peakMiB':>8} {'comp s':>7} {'ovh %':>6} "
          f"{'xla/mdl':>7} {'XLA peak GiB':>12}")
  lines = [head, '-' * len(head)]
  for r in results:
    pre = (f"{str(r.get('impl'))[:22]:<22} {r.get('size', ''):<6} {r.get('method', ''):<13} "
           f"{r.get('freeze', ''):<12} {str(r.get('attention_impl'))[:21]:<21} "
           f"{str(r.get('remat_policy'))[:6]:<6} {r.get('batch', 0):>5} "
           f"{str(r.get('inputs_len')) + '/' + str(r.get('targets_len')):>8}")
    if r.get('error'):
      lines.append(f"{pre} ERROR: {r['error'][:100]}")
      continue
    num = lambda key, scale=1.0: float('nan') if r.get(key) is None else r[key] * scale
    lines.append(
        f"{pre} {num('step_ms_median'):>9.2f} {num('step_ms_p10'):>9.2f} "
        f"{num('step_ms_p90'):>9.2f} {num('tokens_per_s'):>9.0f} "
        f"{num('model_tflops_per_s'):>8.3f} {num('peak_memory_bytes', 2**-20):>8.0f} "
        f"{num('compile_s'):>7.1f} {num('overhead_vs_none_pct'):>6.1f} "
        f"{num('xla_flops_ratio'):>7.3f} {num('compiled_peak_bytes', 2**-30):>12.2f}")
  return '\n'.join(lines)


def write_json(path: pathlib.Path, meta: Dict[str, Any], results: List[Dict[str, Any]]) -> None:
  """Writes {'meta', 'results'} atomically (a partial run still leaves valid JSON)."""
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps({'meta': meta, 'results': results}, indent=1, default=str))
  os.replace(tmp, path)


def markdown_table(results: List[Dict[str, Any]]) -> str:
  """The results as a Markdown table (for bench/README.md)."""
  head = ('| impl | size | method | freeze | attention | remat | batch | in/tgt | ms/step '
          '(median) | p10–p90 | tokens/s | model TFLOP/s | peak MiB | compile s | vs none |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for r in results:
    pre = (f"| {r.get('impl')}{' [' + r['job'] + ']' if r.get('job') else ''} | {r.get('size')} | {r.get('method')} | {r.get('freeze')} | "
           f"{r.get('attention_impl')} | {r.get('remat_policy')} | {r.get('batch')} | "
           f"{r.get('inputs_len')}/{r.get('targets_len')} |")
    if r.get('error'):
      lines.append(pre + f" {r['error'][:80]} |" + ' |' * 6)
      continue
    ovh = r.get('overhead_vs_none_pct')
    mem = r.get('peak_memory_bytes')
    comp = r.get('compile_s')
    lines.append(
        pre + f" {r['step_ms_median']:.1f} | {r['step_ms_p10']:.1f}–{r['step_ms_p90']:.1f} | "
        f"{r['tokens_per_s']:.0f} | {r['model_tflops_per_s']:.4g} | "
        f"{'' if mem is None else f'{mem / 2**20:.0f}'} | "
        f"{'' if comp is None else f'{comp:.0f}'} | "
        f"{'' if ovh is None else f'{ovh:+.1f} %'} |")
  return '\n'.join(lines)


def summarize(out_dir) -> str:
  """Merges every <job>.json in out_dir into summary.json; returns the table and ratios.

  Ratios: the peer's full fine-tuning step time over ours (same size, batch and
  lengths; default attention and remat) for each of our methods, i.e. our speed-up.
  """
  out_dir = pathlib.Path(out_dir)
  rows, metas = [], {}
  for path in sorted(out_dir.glob('*.json')):
    if path.name == 'summary.json':
      continue
    try:
      data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      rows.append({'impl': path.stem, 'error': f'unreadable {path.name}: {e}'})
      continue
    metas[path.stem] = data.get('meta', {})
    rows.extend(dict(r, job=path.stem) for r in data.get('results', []))
  write_json(out_dir / 'summary.json', metas, rows)
  (out_dir / 'summary.md').write_text(markdown_table(rows) + '\n')
  lines = [format_table(rows), '']
  shape = ('size', 'batch', 'inputs_len', 'targets_len')
  peers = {tuple(r.get(k) for k in shape): r for r in rows
           if r.get('impl', '').startswith('hf_') and r.get('method') == 'none'
           and r.get('error') is None}
  for r in rows:
    if (r.get('impl', '').startswith('hyperprompt') and r.get('error') is None
        and r.get('attention_impl') == 'xla' and r.get('remat_policy') == 'none'):
      peer = peers.get(tuple(r.get(k) for k in shape))
      if peer:
        lines.append(
            f"{r.get('job', ''):<20} {r['size']} b{r['batch']} {r['inputs_len']}/{r['targets_len']} {r['method']:<13}"
            f" {r['step_ms_median']:8.1f} ms vs HF full {peer['step_ms_median']:8.1f} ms:"
            f" {peer['step_ms_median'] / r['step_ms_median']:5.2f}x the peer's throughput")
  return '\n'.join(lines)


def csv_list(kind, choices=None):
  def parse(text):
    items = [kind(x) for x in text.split(',') if x]
    if not items:
      raise argparse.ArgumentTypeError(f'empty list {text!r}')
    bad = [x for x in items if choices is not None and x not in choices]
    if bad:
      raise argparse.ArgumentTypeError(f'{bad} not among {list(choices)}')
    return items
  return parse


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--sizes', type=csv_list(str, SIZES), default=['base'])
  p.add_argument('--methods', type=csv_list(str, METHODS), default=['none', 'global'])
  p.add_argument('--freeze', type=csv_list(str, FREEZE), default=['all'],
                 help="'all': every parameter trained; 'conditioning': only task_conditioning")
  p.add_argument('--optimizer', choices=OPTIMIZERS, default='adamw')
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--inputs_len', type=int, default=512)
  p.add_argument('--targets_len', type=int, default=64)
  p.add_argument('--dtype', default='bfloat16', help='activation dtype; params stay float32')
  p.add_argument('--attention_impls', type=csv_list(str), default=['xla'])
  p.add_argument('--remat_policies', type=csv_list(str), default=['none'])
  p.add_argument('--embedding_lookup', default=None, help='gather | one_hot (default: config)')
  p.add_argument('--prompt_length', type=int, default=None)
  p.add_argument('--num_tasks', type=int, default=8)
  p.add_argument('--dropout_rate', type=float, default=0.1)
  p.add_argument('--attention_dropout_rate', type=float, default=None,
                 help='attention-weight dropout (default: --dropout_rate, as T5X); 0 lets '
                      'the fused attention impls run in training')
  p.add_argument('--weight_decay', type=float, default=0.01)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--rounds', type=int, default=1,
                 help='> 1: build all configurations first, then time them interleaved in '
                      'this many rounds (fairer overheads on a shared machine; all states '
                      'stay in memory at once)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--prng_impl', default=None,
                 help="jax_default_prng_impl for the dropout keys: threefry2x32 (JAX's "
                      "default) | rbg | unsafe_rbg")
  p.add_argument('--time_budget_s', type=float, default=None,
                 help='skip the configurations not started within this many seconds')
  p.add_argument('--num_layers', type=int, default=None,
                 help="encoder = decoder layers (default: the size's); for quick analyses")
  p.add_argument('--compile_only', action='store_true',
                 help='compile each configuration from abstract inputs and report only '
                      "XLA's FLOPs and memory (no parameters initialised, no step run)")
  p.add_argument('--out', type=pathlib.Path, default=None, help='JSON output file')
  p.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  args = p.parse_args(argv)
  for name in ('batch', 'inputs_len', 'targets_len', 'steps'):
    if getattr(args, name) <= 0:
      p.error(f'--{name} must be positive, got {getattr(args, name)}')
  if args.warmup < 0:
    p.error(f'--warmup must be >= 0, got {args.warmup}')
  if args.out is not None and args.out.exists() and not args.overwrite:
    p.error(f'--out {args.out} exists; pass --overwrite to replace it')
  return args


def configs_from_args(args: argparse.Namespace) -> List[BenchConfig]:
  """The cartesian product of the list flags, 'none' first within each group."""
  methods = sorted(args.methods, key=lambda m: m != 'none')
  # 'none' has no conditioning parameters: freeze='conditioning' would train nothing.
  return [BenchConfig(size=size, method=method, freeze=freeze, optimizer=args.optimizer,
                      batch=args.batch, inputs_len=args.inputs_len,
                      targets_len=args.targets_len, dtype=args.dtype, attention_impl=attn,
                      remat_policy=remat, embedding_lookup=args.embedding_lookup,
                      prompt_length=args.prompt_length, num_tasks=args.num_tasks,
                      dropout_rate=args.dropout_rate,
                      attention_dropout_rate=args.attention_dropout_rate,
                      weight_decay=args.weight_decay,
                      warmup=args.warmup, steps=args.steps,
                      seed=args.seed, num_layers=args.num_layers)
          for size, freeze, attn, remat, method in itertools.product(
              args.sizes, args.freeze, args.attention_impls, args.remat_policies, methods)
          if not (method == 'none' and freeze != 'all')]


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  if args.prng_impl is not None:
    jax.config.update('jax_default_prng_impl', args.prng_impl)
  meta = dict(environment(), argv=list(sys.argv[1:] if argv is None else argv),
              flops_formula='bench/flops.py (frozen weights: no weight-gradient FLOPs)')
  results: List[Dict[str, Any]] = []
  start = time.perf_counter()
  configs = configs_from_args(args)

  def failed(cfg, e):
    # One failing variant (e.g. an attention kernel this backend lacks) must not
    # lose the others: record it and go on.
    return dict(dataclasses.asdict(cfg), impl='hyperprompt_t5x (jax)',
                error=f'{type(e).__name__}: {e}'[:2000])

  def over_budget():
    return args.time_budget_s is not None and time.perf_counter() - start > args.time_budget_s

  def skipped(cfg):
    return dict(dataclasses.asdict(cfg), impl='hyperprompt_t5x (jax)',
                error=f'skipped: time budget {args.time_budget_s:.0f} s spent')

  def emit(rec):
    results.append(rec)
    add_overheads(results)
    if args.out is not None:
      write_json(args.out, meta, results)
    print(format_table(results[-1:]).splitlines()[-1], flush=True)

  if args.compile_only:
    for cfg in configs:
      try:
        emit(analyze_one(cfg))
      except Exception as e:  # pylint: disable=broad-except
        emit(failed(cfg, e))
  elif args.rounds <= 1:
    for cfg in configs:
      if over_budget():
        emit(skipped(cfg))
        continue
      try:
        emit(run_one(cfg))
      except Exception as e:  # pylint: disable=broad-except
        emit(failed(cfg, e))
  else:
    # Interleaved: build every configuration, then time `rounds` rounds of
    # steps/rounds steps each, configuration after configuration, so that a
    # shared machine's load drifts into all of them alike.
    runners, slots = [], []
    for cfg in configs:
      if over_budget():
        slots.append(skipped(cfg))
        continue
      try:
        runners.append(Runner(cfg))
        slots.append(runners[-1])
      except Exception as e:  # pylint: disable=broad-except
        slots.append(failed(cfg, e))
    per_round = max(1, -(-args.steps // args.rounds))
    for _ in range(args.rounds):
      for runner in list(runners):
        try:
          runner.time_steps(per_round)
        except Exception as e:  # pylint: disable=broad-except
          runners.remove(runner)
          slots[slots.index(runner)] = failed(runner.cfg, e)
    for slot in slots:
      emit(slot.record() if isinstance(slot, Runner) else slot)
  print()
  print(format_table(results))
  return results


if __name__ == '__main__':
  # Non-zero exit when a configuration failed (budget skips excepted), after writing all.
  sys.exit(int(any(r.get('error') and not r['error'].startswith('skipped')
                   for r in main())))
