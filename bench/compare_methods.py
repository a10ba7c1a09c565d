"""Every conditioning method and freeze mode on the same data, steps, batch and LR sweep.

    python bench/compare_methods.py --out_dir docs/results/compare

Two parts, both on CPU-sized models (imports JAX, Flax, optax, numpy and the
project's model modules only: no gin, seqio or TensorFlow):

1. `conflict`: the `hyperprompt_demo_conflict` family (six tasks whose answers
   conflict on the same words; hyperprompt_t5x/synthetic_tasks.py). A backbone
   (the demo's byte-level T5, emb 64, 2+2 layers, method 'none') is first
   pre-trained for --pretrain_steps on a task-free objective (copy the word),
   so that freezing it means something; then every (method, freeze) starts
   from that backbone with a fresh conditioning init and trains on the
   mixture (uniform over tasks) for --steps. Freeze modes: 'all' for every
   method, 'conditioning' for every conditioned method, 'prompts' for those
   with prompts (share, sep, global, prompt_tuning). The inputs carry no task
   prefix: 'none' never sees the task.
2. `glue` (--glue_steps > 0): four real GLUE/SuperGLUE training sets from
   ../shared/data (RTE, MRPC, CB, COPA), byte-level inputs cut to
   --glue_inputs_len bytes, a one-character class label as target, the same
   tiny model trained from scratch, freeze 'all'. This is nowhere near the
   paper's setting (pre-trained T5 1.1 base-xxl, SentencePiece, 8 tasks, full
   lengths, ~1M examples); it shows the tools run on real files.

The learning rates (--lrs) and seeds (--seeds, which seed the conditioning /
model init) of one (method, freeze) run side by side as one vmapped, jitted
step (one compilation per configuration); every replica sees the same
batches. AdamW with a linear warm-up; the per-replica LR multiplies the
update of an AdamW built with LR 1 (identical to AdamW at that LR, frozen
parameters get zero updates). Score: teacher-forced exact match of the
target on the validation split (equal to greedy decoding's exact match),
per task, at every --eval_every steps. The best LR per configuration is the
one with the highest final mean score over seeds (picked on the validation
split that is reported: an optimistic choice, the same for every method).

Outputs in --out_dir: results.json (every replica and eval), results.md (the
tables), score_vs_step.png, score_vs_params.png (and glue_*.png).
`--parts glue` runs the GLUE part alone; `--merge a/results.json,b/results.json`
trains nothing and writes the union of earlier runs' records (and the commands
that made them) to --out_dir, so a sweep can run in pieces.
"""
import argparse
import json
import os
import pathlib
import sys
import time
from typing import Any, Dict, List, Sequence, Tuple

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a script from a bare checkout
  sys.path.insert(0, str(_REPO))

import numpy as np  # noqa: E402

# Many small compilations on a few CPU cores: skip LLVM's expensive passes (as
# gin/demo.gin does; about half the compile time, slightly slower steps).
FAST_COMPILE_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'

from hyperprompt_t5x.model.methods import METHODS, PROMPT_METHODS  # noqa: E402
from hyperprompt_t5x import optim, synthetic_tasks  # noqa: E402
from hyperprompt_t5x.model import models, network  # noqa: E402
BYTE_OFFSET, EOS, VOCAB = 3, 1, 384  # seqio.ByteVocabulary ids: byte + 3; PAD 0, EOS 1
GLUE_TASKS = ('rte', 'mrpc', 'cb', 'copa')


def freeze_modes(method: str, requested: Sequence[str]) -> List[str]:
  """The requested freeze modes that mean something for `method`."""
  allowed = ['all']
  if method != 'none':
    allowed.append('conditioning')
  if method in PROMPT_METHODS:
    allowed.append('prompts')
  return [f for f in requested if f in allowed]


def encode(text: str, length: int) -> np.ndarray:
  """Byte ids (+3) with EOS, cut to `length` (EOS kept), zero-padded: [length]."""
  ids = [b + BYTE_OFFSET for b in text.encode('utf-8')][:length - 1] + [EOS]
  return np.asarray(ids + [0] * (length - len(ids)), np.int32)


def make_examples(pairs: Sequence[Tuple[str, str, int]], inputs_len: int,
                  targets_len: int) -> Dict[str, np.ndarray]:
  """[(input, target, task_id)] -> T5X feature arrays (decoder inputs shifted right)."""
  enc = np.stack([encode(i, inputs_len) for i, _, _ in pairs])
  tgt = np.stack([encode(t, targets_len) for _, t, _ in pairs])
  return {'encoder_input_tokens': enc, 'decoder_target_tokens': tgt,
          'decoder_input_tokens': np.pad(tgt[:, :-1], ((0, 0), (1, 0))),
          'decoder_loss_weights': (tgt > 0).astype(np.float32),
          'task_ids': np.asarray([k for _, _, k in pairs], np.int32)}


def conflict_data():
  """(task names, train pairs, validation pairs) of the conflict family."""
  targets = synthetic_tasks.CONFLICT_TARGETS
  names = list(targets)
  split = {s: [(w, fn(w), k) for k, fn in enumerate(targets.values())
               for w in synthetic_tasks.words(s)] for s in ('train', 'validation')}
  return names, split['train'], split['validation']


def _read_glue(data_dir: pathlib.Path, task: str, split: str) -> List[Tuple[str, str]]:
  """(input text, one-character label) rows of one GLUE/SuperGLUE file."""
  if task in ('rte', 'mrpc'):
    path = data_dir / 'glue' / task.upper() / f'{split}.tsv'
    lines = path.read_text(encoding='utf-8-sig').splitlines()
    head = lines[0].split('\t')
    rows = [dict(zip(head, line.split('\t'))) for line in lines[1:] if line]
    if task == 'rte':
      return [(f"s1: {r['sentence1']} s2: {r['sentence2']}",
               '0' if r['label'] == 'entailment' else '1') for r in rows]
    return [(f"s1: {r['#1 String']} s2: {r['#2 String']}", r['Quality']) for r in rows]
  path = data_dir / 'super_glue' / task.upper() / f"{'val' if split == 'dev' else split}.jsonl"
  rows = [json.loads(line) for line in path.read_text(encoding='utf-8').splitlines() if line]
  if task == 'cb':
    labels = {'entailment': '0', 'contradiction': '1', 'neutral': '2'}
    return [(f"p: {r['premise']} h: {r['hypothesis']}", labels[r['label']]) for r in rows]
  return [(f"{r['question']}: {r['premise']} 0: {r['choice1']} 1: {r['choice2']}",
           str(r['label'])) for r in rows]


def glue_data(data_dir: pathlib.Path):
  """(task names, train pairs, validation pairs) of the GLUE/SuperGLUE part."""
  train, val = [], []
  for k, task in enumerate(GLUE_TASKS):
    train += [(i, t, k) for i, t in _read_glue(data_dir, task, 'train')]
    val += [(i, t, k) for i, t in _read_glue(data_dir, task, 'dev')]
  return list(GLUE_TASKS), train, val


def model_config(method: str, num_tasks: int, **overrides):
  """The demo's byte-level T5 (gin/demo.gin shapes) with `method`."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  kwargs = dict(vocab_size=VOCAB, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128,
                task_embed_dim=16, layer_task_dim=16, prompt_length=4, bottleneck=16,
                adapter_dim=16, dtype=jnp.float32, dropout_rate=0.0, method=method,
                num_tasks=num_tasks)
  kwargs.update(overrides)
  return network.T5Config.from_size('tiny', **kwargs)


class Trainer:
  """One (method, freeze): R = len(lrs)·len(seeds) replicas in one vmapped, jitted step."""

  def __init__(self, config, freeze: str, lrs: Sequence[float], seeds: Sequence[int],
               backbone, warmup: int):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top
    self.config, self.freeze = config, freeze
    self.replicas = [(lr, seed) for lr in lrs for seed in seeds]
    model = models.EncoderDecoderModel(config, z_loss=0.0)
    # 'unsafe_rbg' keys: the init compiles in a third of threefry's time.
    rngs = jnp.stack([jax.random.key_data(jax.random.key(s, impl='unsafe_rbg'))
                      for _, s in self.replicas])
    params = jax.jit(jax.vmap(lambda r: network.init_variables(
        config, jax.random.wrap_key_data(r, impl='unsafe_rbg'))['params']))(rngs)
    params = jax.tree_util.tree_map(np.asarray, dict(params))
    if backbone is not None:  # pre-trained backbone, fresh conditioning per replica
      r = len(self.replicas)
      params.update({k: jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (r,) + x.shape), v)
                     for k, v in backbone.items() if k != network.CONDITIONING_KEY})
    one = jax.tree_util.tree_map(lambda x: x[0], params)
    tx = optim.make_optimizer('adamw', 1.0, params=one, freeze=freeze, weight_decay=0.0)
    self.params = params
    self.opt_state = jax.jit(jax.vmap(tx.init))(params)
    self.lrs = jnp.asarray([lr for lr, _ in self.replicas], jnp.float32)
    leaves = jax.tree_util.tree_leaves(one)
    mask = jax.tree_util.tree_leaves(optim.trainable_mask(one, freeze))
    self.num_trainable = int(sum(x.size for x, m in zip(leaves, mask) if m))
    self.added = int(sum(x.size for x in jax.tree_util.tree_leaves(
        one.get(network.CONDITIONING_KEY, {}))))

    def step(params, opt_state, lr, step_no, batch):
      grads = jax.grad(lambda p: model.loss_fn(p, batch, None)[0])(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      scale = lr * jnp.minimum(1.0, (step_no + 1.0) / warmup)
      params = optax.apply_updates(params, jax.tree_util.tree_map(lambda u: scale * u, updates))
      return params, opt_state

    def correct(params, batch):
      logits = model._logits(params, batch, None)  # pylint: disable=protected-access
      tgt = batch['decoder_target_tokens']
      ok = (jnp.argmax(logits, -1) == tgt) | (tgt == 0)
      return jnp.all(ok, axis=-1)  # exact match per example

    self._step = jax.jit(jax.vmap(step, in_axes=(0, 0, 0, None, None)), donate_argnums=(0, 1))
    self._correct = jax.jit(jax.vmap(correct, in_axes=(0, None)))
    self.step_times: List[float] = []
    self.steps_done = 0

  def train(self, batches: Sequence[Dict[str, np.ndarray]]) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    for batch in batches:
      t0 = time.perf_counter()
      self.params, self.opt_state = self._step(self.params, self.opt_state, self.lrs,
                                               self.steps_done, batch)
      jax.block_until_ready(self.params)
      self.step_times.append(time.perf_counter() - t0)
      self.steps_done += 1

  def evaluate(self, val: Dict[str, np.ndarray], num_tasks: int) -> np.ndarray:
    """Exact match [R, T] on the validation examples."""
    ok = np.asarray(self._correct(self.params, val), np.float64)  # [R, N]
    ids = val['task_ids']
    return np.stack([ok[:, ids == k].mean(axis=1) for k in range(num_tasks)], axis=1)

  def step_ms(self) -> float:
    """Median ms of one vmapped step (all R replicas), compile step excluded."""
    times = self.step_times[1:] or self.step_times
    return 1e3 * float(np.median(times))


def batches_from(examples: Dict[str, np.ndarray], steps: int, batch: int, seed: int):
  rng = np.random.default_rng(seed)
  n = len(examples['task_ids'])
  for _ in range(steps):
    idx = rng.integers(0, n, batch)
    yield {k: v[idx] for k, v in examples.items()}


def pretrain_backbone(words: Sequence[str], steps: int, batch: int, lr: float, warmup: int):
  """A 'none' model trained to copy the word (task-free), its params (host numpy)."""
  import jax  # pylint: disable=g-import-not-at-top
  if steps <= 0:
    return None
  config = model_config('none', 1)
  examples = make_examples([(w, w, 0) for w in words], 8, 8)
  trainer = Trainer(config, 'all', [lr], [0], None, warmup)
  trainer.train(list(batches_from(examples, steps, batch, seed=123)))
  return jax.tree_util.tree_map(lambda x: np.asarray(x[0]), trainer.params)


def run_part(name: str, task_names: List[str], train, val, args, backbone, lengths,
             methods: Sequence[str], freezes: Sequence[str], steps: int,
             out_dir: pathlib.Path, results: Dict[str, Any]) -> None:
  """Trains every (method, freeze) of a part; appends records to results[name]."""
  inputs_len, targets_len = lengths
  train_ex = make_examples(train, inputs_len, targets_len)
  val_ex = make_examples(val, inputs_len, targets_len)
  records = results.setdefault(name, [])
  for method in methods:
    for freeze in freeze_modes(method, freezes):
      t0 = time.perf_counter()
      config = model_config(method, len(task_names))
      trainer = Trainer(config, freeze, args.lrs, args.seeds, backbone, args.warmup)
      evals = []
      batches = list(batches_from(train_ex, steps, args.batch, seed=7))
      for start in range(0, steps, args.eval_every):
        trainer.train(batches[start:start + args.eval_every])
        evals.append({'step': trainer.steps_done,
                      'scores': trainer.evaluate(val_ex, len(task_names)).tolist()})
      record = {'method': method, 'freeze': freeze, 'replicas': trainer.replicas,
                'added_params': trainer.added, 'trainable_params': trainer.num_trainable,
                'step_ms_vmapped': trainer.step_ms(), 'num_replicas': len(trainer.replicas),
                'evals': evals, 'wall_s': time.perf_counter() - t0}
      records.append(record)
      best = best_lr(record)
      print(f'[{name}] {method:<13} {freeze:<12} added={trainer.added:>8} '
            f'best lr={best["lr"]:g} mean={best["mean"]:.3f} '
            f'step={record["step_ms_vmapped"]:.1f} ms/{len(trainer.replicas)} replicas '
            f'({record["wall_s"]:.0f} s)', flush=True)
      write_outputs(out_dir, results, args)


def best_lr(record: Dict[str, Any]) -> Dict[str, Any]:
  """The LR with the best final mean score over seeds: its per-task mean and seed spread."""
  final = np.asarray(record['evals'][-1]['scores'])  # [R, T]
  lrs = sorted({lr for lr, _ in record['replicas']})
  best = None
  for lr in lrs:
    rows = [i for i, (l, _) in enumerate(record['replicas']) if l == lr]
    per_seed = final[rows].mean(axis=1)  # mean over tasks, per seed
    cand = {'lr': lr, 'rows': rows, 'mean': float(per_seed.mean()),
            'seed_min': float(per_seed.min()), 'seed_max': float(per_seed.max()),
            'per_task': final[rows].mean(axis=0).tolist()}
    if best is None or cand['mean'] > best['mean']:
      best = cand
  return best


def markdown(name: str, task_names: List[str], records: List[Dict[str, Any]]) -> str:
  """One table: per (method, freeze), best-LR per-task scores, mean (seed range), params, ms."""
  head = (['method', 'freeze', 'best lr'] + task_names +
          ['mean (seed min–max)', 'added params', 'trainable params', 'ms/step (vmapped)'])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in records:
    b = best_lr(r)
    cells = ([r['method'], r['freeze'], f"{b['lr']:g}"] +
             [f'{100 * s:.1f}' for s in b['per_task']] +
             [f"{100 * b['mean']:.1f} ({100 * b['seed_min']:.1f}–{100 * b['seed_max']:.1f})",
              f"{r['added_params']:,}", f"{r['trainable_params']:,}",
              f"{r['step_ms_vmapped']:.1f} / {r['num_replicas']}"])
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(name: str, records: List[Dict[str, Any]], out_dir: pathlib.Path) -> List[str]:
  """score vs step (freeze 'all', best LR, mean over seeds) and score vs added params."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  files = []
  colors = {m: f'C{i}' for i, m in enumerate(METHODS)}  # one colour per method in both plots
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in records:
    if r['freeze'] != 'all':
      continue
    rows = best_lr(r)['rows']
    steps = [e['step'] for e in r['evals']]
    means = [float(np.asarray(e['scores'])[rows].mean()) for e in r['evals']]
    ax.plot(steps, means, marker='o', label=r['method'], color=colors[r['method']])
  ax.set_xlabel('training step')
  ax.set_ylabel('validation exact match (mean over tasks)')
  ax.set_title(f'{name}: score vs step (freeze all, best LR, mean of seeds)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  files.append(f'{name}_score_vs_step.png')
  fig.savefig(out_dir / files[-1], dpi=110)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  markers = {'all': 'o', 'conditioning': 's', 'prompts': '^'}
  for r in records:  # a legend, not labels: the top-right corner is crowded
    b = best_lr(r)
    ax.scatter(max(r['added_params'], 1), b['mean'], marker=markers[r['freeze']],
               color=colors[r['method']], alpha=0.8, label=f"{r['method']}/{r['freeze']}")
  ax.legend(fontsize=7, loc='center left', bbox_to_anchor=(1.01, 0.5))
  ax.set_xscale('log')
  ax.set_xlabel('added (conditioning) parameters (log; none plotted at 1)')
  ax.set_ylabel('final validation exact match (mean)')
  ax.set_title(f'{name}: score vs added parameters (o all, s conditioning, ^ prompts)',
               fontsize=9)
  fig.tight_layout()
  files.append(f'{name}_score_vs_params.png')
  fig.savefig(out_dir / files[-1], dpi=110)
  plt.close(fig)
  return files


def write_outputs(out_dir: pathlib.Path, results: Dict[str, Any], args) -> None:
  """results.json (atomically), results.md and the plots of every part so far."""
  tmp = out_dir / 'results.json.tmp'
  tmp.write_text(json.dumps(results, indent=1, default=str))
  os.replace(tmp, out_dir / 'results.json')
  commands = results['meta'].get('commands', [results['meta'].get('command')])
  md = [f'Command: `{c}`' for c in commands] + ['']
  for name in ('conflict', 'glue'):
    if results.get(name):
      md += [f'### {name}', '', markdown(name, results['meta'][f'{name}_tasks'], results[name]),
             '']
      md += [f'![{f}]({f})' for f in plot(name, results[name], out_dir)] + ['']
  (out_dir / 'results.md').write_text('\n'.join(md))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out_dir', required=True)
  p.add_argument('--methods', default=','.join(METHODS))
  p.add_argument('--freeze', default='all,conditioning,prompts')
  p.add_argument('--lrs', default='1e-3,3e-3')
  p.add_argument('--seeds', default='0,1')
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--eval_every', type=int, default=100)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--warmup', type=int, default=20)
  p.add_argument('--pretrain_steps', type=int, default=200)
  p.add_argument('--parts', default='conflict,glue',
                 help="parts to run: conflict, glue (glue also needs --glue_steps > 0)")
  p.add_argument('--merge', default='',
                 help='comma-separated results.json files: write their union, train nothing')
  p.add_argument('--glue_steps', type=int, default=0, help='0: skip the GLUE part')
  p.add_argument('--glue_inputs_len', type=int, default=128)
  p.add_argument('--data_dir', default=os.environ.get(
      'HYPERPROMPT_SHARED_DATA', str(_REPO.parent / 'shared' / 'data')),
                 help='folder holding glue/ and super_glue/ (default ../shared/data)')
  args = p.parse_args(argv)
  args.methods = [m for m in args.methods.split(',') if m]
  unknown = sorted(set(args.methods) - set(METHODS))
  if unknown:
    p.error(f'--methods: unknown {unknown}; expected some of {METHODS}')
  args.parts = [x for x in args.parts.split(',') if x]
  if set(args.parts) - {'conflict', 'glue'}:
    p.error(f'--parts: expected some of conflict, glue (got {args.parts})')
  args.merge = [x for x in args.merge.split(',') if x]
  args.freeze = [f for f in args.freeze.split(',') if f]
  args.lrs = [float(x) for x in args.lrs.split(',')]
  args.seeds = [int(x) for x in args.seeds.split(',')]
  if args.eval_every < 1 or args.steps < 1:
    p.error('--steps and --eval_every must be >= 1')
  if args.glue_steps > 0 and not (args.data_dir and pathlib.Path(args.data_dir, 'glue').is_dir()):
    p.error(f'--glue_steps needs --data_dir holding glue/ and super_glue/ '
            f'(got {args.data_dir!r})')
  return args


def merge(paths: Sequence[str]) -> Dict[str, Any]:
  """The union of several results.json: every part's records (ordered as METHODS, then
  freeze mode) and all commands; a (part, method, freeze) in a later file replaces the
  earlier one's (a rerun of a configuration updates it)."""
  merged: Dict[str, Any] = {'meta': {'commands': []}}
  records: Dict[str, Dict[Any, Dict[str, Any]]] = {}
  for path in paths:
    try:
      results = json.loads(pathlib.Path(path).read_text())
      meta = results['meta']
    except (OSError, ValueError, KeyError) as e:
      raise SystemExit(f'--merge: {path} is not a compare_methods results.json ({e})')
    merged['meta']['commands'] += meta.get('commands', [meta.get('command')])
    for key in ('conflict_tasks', 'glue_tasks', 'cpu_count'):
      merged['meta'].setdefault(key, meta.get(key))
    for name in ('conflict', 'glue'):
      for r in results.get(name, []):
        records.setdefault(name, {})[r['method'], r['freeze']] = r
  freezes = ('all', 'conditioning', 'prompts')
  for name in ('conflict', 'glue'):
    merged[name] = sorted(records.get(name, {}).values(), key=lambda r: (
        METHODS.index(r['method']), freezes.index(r['freeze'])))
  return merged


def main(argv=None) -> Dict[str, Any]:
  args = parse_args(argv)
  os.environ.setdefault('XLA_FLAGS', FAST_COMPILE_FLAGS)
  out_dir = pathlib.Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  if args.merge:
    results = merge(args.merge)
    write_outputs(out_dir, results, args)
    return results
  names, train, val = conflict_data()
  results: Dict[str, Any] = {'meta': {
      'command': 'python bench/compare_methods.py ' + ' '.join(argv if argv is not None
                                                               else sys.argv[1:]),
      'conflict_tasks': names, 'glue_tasks': list(GLUE_TASKS), 'cpu_count': os.cpu_count()}}
  if 'conflict' in args.parts:
    backbone = pretrain_backbone(sorted({w for w, _, _ in train}), args.pretrain_steps,
                                 args.batch, 1e-3, args.warmup)
    run_part('conflict', names, train, val, args, backbone, (8, 2), args.methods,
             args.freeze, args.steps, out_dir, results)
  if args.glue_steps > 0 and 'glue' in args.parts:
    g_names, g_train, g_val = glue_data(pathlib.Path(args.data_dir))
    run_part('glue', g_names, g_train, g_val, args, None, (args.glue_inputs_len, 2),
             args.methods, ['all'], args.glue_steps, out_dir, results)
  return results


if __name__ == '__main__':
  main()
