"""Sequence packing on real GLUE/SuperGLUE text: row fill and trained examples/s, side by side.

    python bench/packing.py [--sizes tiny,small] [--rows 8] [--steps 3]

1. Trains a SentencePiece model (unigram, ~8000 pieces, T5's ids: pad 0, eos 1,
   unk 2, no bos) on the training texts of the GLUE and SuperGLUE folders
   (HYPERPROMPT_SHARED_DATA, default ../shared/data beside the checkout) and
   makes it the tasks' vocabulary through HYPERPROMPT_VOCABULARY.
2. Mixes every task that has a file there (its train split, else its
   validation split) at the mixture's rates (official train sizes), at
   TASK_FEATURE_LENGTHS inputs 512 / targets 16.
3. Fill: the fraction of row positions holding an example's tokens, unpacked and
   packed (packing.py: one task per row, the rows' targets length from
   `packing.row_lengths`), over `--fill_rows` rows; `--study` adds packed fill for
   other targets rows and open rows per task.
4. Speed, per size: the project's train step (as the trainer builds it, AdamW,
   float32 on CPU) on `--rows` unpacked rows and on `--rows` packed rows of the
   same stream, and the Hugging Face peer (bench/hf_peer.py's T5 1.1, AdamW,
   float32) on as many examples per batch as the packed batch holds, each batch
   padded to its longest example (DataCollatorForSeq2Seq's dynamic padding).
   examples/s = examples in the batch / step time, at the fastest and at the
   median timed step (on a shared machine the fastest is the least disturbed).
"""
import argparse
import datetime
import os
import pathlib
import platform
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('USE_TF', '0')  # transformers: torch only

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))

import numpy as np  # noqa: E402

from bench import data_pipeline  # noqa: E402
from bench import flops as flops_lib  # noqa: E402
from bench import hf_peer  # noqa: E402
from bench import step_analysis  # noqa: E402
from bench import train_step as jax_bench  # noqa: E402
from hyperprompt_t5x import partitioning  # noqa: E402


def _data_dir(name):
  root = os.environ.get('HYPERPROMPT_SHARED_DATA') or _REPO.parent / 'shared' / 'data'
  path = pathlib.Path(root) / name
  if not path.is_dir():
    raise SystemExit(f'{path} not found: set HYPERPROMPT_SHARED_DATA to the folder holding '
                     'glue/ and super_glue/')
  return path


def task_splits(glue_dir, super_glue_dir):
  """[(task name, split, rate)] of every GLUE/SuperGLUE training task with a file here."""
  from hyperprompt_t5x.tasks import glue, super_glue  # pylint: disable=g-import-not-at-top
  out = []
  for name in glue.MIXTURE_TASKS:
    task = glue.GLUE_TASKS[name]
    for split in ('train', 'validation'):
      if split in task.files.files and (glue_dir / task.files.files[split]).is_file():
        out.append((glue.PREFIX + name, split, task.num_train_examples))
        break
  for name in super_glue.MIXTURE_TASKS:
    task = super_glue.SUPER_GLUE_TASKS[name]
    for split, file in (('train', 'train.jsonl'), ('validation', 'val.jsonl')):
      if (super_glue_dir / task.folder / file).is_file():
        out.append((super_glue.PREFIX + name, split, task.num_train_examples))
        break
  return out


def examples(tasks, splits, lengths, seed=0):
  return tasks.mix_examples([(n, s) for n, s, _ in splits], [r for _, _, r in splits],
                            lengths, shuffle=True, seed=seed, num_epochs=None)


def row_fill(rows):
  """(input fill, target fill, examples) of a list of batches (packed or not)."""
  enc = np.concatenate([b.get('encoder_segment_ids', b['encoder_input_tokens']) for b in rows])
  dec = np.concatenate([b.get('decoder_segment_ids', b['decoder_target_tokens']) for b in rows])
  if 'encoder_segment_ids' in rows[0]:
    n = int(sum(b['encoder_segment_ids'].max(axis=1).sum() for b in rows))
  else:
    n = len(enc)
  return float((enc > 0).mean()), float((dec > 0).mean()), n


def fill_study(tasks, splits, lengths, num_examples, report):
  """Packed fill for targets rows x open rows per task, over the same examples."""
  from hyperprompt_t5x.tasks import packing  # pylint: disable=g-import-not-at-top
  stream = [(ex['inputs'], ex['targets'], int(ex['task_id'][0])) for ex in
            examples(tasks, splits, lengths).take(num_examples).as_numpy_iterator()]
  report(f'\nfill study over {num_examples} examples (input fill / target fill / rows):')
  for targets_row in (16, 32, 64, 128):
    cells = []
    for bins in (1, 2, 4):
      rows = list(packing.TaskPacker(lengths, bins=bins, targets_row=targets_row)
                  .pack(stream))
      fin = np.mean([(r['encoder_segment_ids'] > 0).mean() for r in rows])
      ftg = np.mean([(r['decoder_segment_ids'] > 0).mean() for r in rows])
      cells.append(f'bins {bins}: {fin:.3f} / {ftg:.3f} / {len(rows)}')
    report(f'  targets row {targets_row:3d}: ' + ';  '.join(cells))


VOCAB_SIZE = 32128  # T5's (the SentencePiece ids fit; T5 1.1 tiny's T5X checkpoint has it too)


def bench_config(size, method, batch=None):
  """float32 on CPU for both models (torch's and XLA's CPU bf16 are emulated)."""
  first = batch or {'task_ids': [0], 'encoder_input_tokens': np.zeros((1, 1)),
                    'decoder_target_tokens': np.zeros((1, 1))}
  return jax_bench.BenchConfig(size=size, method=method, optimizer='adamw', dtype='float32',
                               batch=len(first['task_ids']), vocab_size=VOCAB_SIZE,
                               inputs_len=first['encoder_input_tokens'].shape[1],
                               targets_len=first['decoder_target_tokens'].shape[1])


def rates(examples, times):
  """(examples/s at the fastest step, at the median step). On a shared machine other
  processes only ever slow a step down, so the fastest is the least disturbed."""
  n = float(np.mean(examples))
  return n / min(times), n / jax_bench.percentile(times, 50)


def jax_examples_per_s(size, method, batches, steps, warmup):
  """Median-step examples/s of the project's train step over `batches` (one shape)."""
  import jax  # pylint: disable=g-import-not-at-top
  cfg = bench_config(size, method, batches[0])
  _, mesh, state, step_fn = jax_bench.build(cfg)
  times, n = [], []
  for i in range(warmup + steps):
    batch = batches[i % len(batches)]
    t0 = time.perf_counter()
    state, metrics = step_fn(state, partitioning.shard_batch(batch, mesh),
                             jax.random.PRNGKey(i))
    jax.block_until_ready(metrics['loss'])
    if i >= warmup:
      times.append(time.perf_counter() - t0)
      n.append(row_fill([batch])[2])
  return rates(n, times)


def hf_examples_per_s(size, example_batches, steps, warmup):
  """The peer with dynamic padding: each batch padded to its longest example."""
  import torch  # pylint: disable=g-import-not-at-top
  dims = flops_lib.Dims.from_config(step_analysis.model_config(bench_config(size, 'none')))
  torch.manual_seed(0)
  model, _ = hf_peer.build_hf_model(dims, 0.1)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

  def padded(rows):
    out = np.zeros((len(rows), max(len(r) for r in rows)), np.int64)
    for i, r in enumerate(rows):
      out[i, :len(r)] = r
    return torch.from_numpy(out)

  times, n = [], []
  for i in range(warmup + steps):
    exs = example_batches[i % len(example_batches)]
    inputs, targets = padded([e[0] for e in exs]), padded([e[1] for e in exs])
    t0 = time.perf_counter()
    loss = model(input_ids=inputs, attention_mask=(inputs > 0).long(),
                 labels=torch.where(targets > 0, targets, -100)).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
      n.append(len(exs))
  return rates(n, times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='tiny,small')
  parser.add_argument('--method', default='global')
  parser.add_argument('--rows', type=int, default=8, help='rows per batch (both trainers)')
  parser.add_argument('--steps', type=int, default=3, help='timed steps per configuration')
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--inputs', type=int, default=512)
  parser.add_argument('--targets', type=int, default=16)
  parser.add_argument('--sp_vocab_size', type=int, default=8000)
  parser.add_argument('--fill_rows', type=int, default=512)
  parser.add_argument('--study', type=int, default=0, metavar='N',
                      help='also the fill study over N examples')
  args = parser.parse_args()

  def report(line):
    print(line, flush=True)

  glue_dir, super_glue_dir = _data_dir('glue'), _data_dir('super_glue')
  lengths = {'inputs': args.inputs, 'targets': args.targets}
  with tempfile.TemporaryDirectory() as tmp:
    train_files = sorted(glue_dir.glob('*/train.tsv')) + sorted(
        super_glue_dir.glob('*/train.jsonl'))
    t0 = time.perf_counter()
    model_path = data_pipeline.train_sentencepiece(train_files, tmp, args.sp_vocab_size)
    from hyperprompt_t5x import tasks  # pylint: disable=g-import-not-at-top
    os.environ[tasks.VOCABULARY_ENV] = model_path
    tasks.set_data_dirs(glue_dir=glue_dir, super_glue_dir=super_glue_dir)
    vocabulary = tasks.set_vocabulary(None)  # from HYPERPROMPT_VOCABULARY
    splits = task_splits(glue_dir, super_glue_dir)
    report(f'# bench/packing.py {datetime.date.today()}, {platform.processor() or "cpu"}, '
           f'{os.cpu_count()} cores; SentencePiece {vocabulary.vocab_size} pieces trained '
           f'on {len(train_files)} training files in {time.perf_counter() - t0:.0f} s; '
           f'lengths {lengths}')
    report('mixture: ' + ', '.join(f'{n[len("hyperprompt_"):]}:{s}' for n, s, _ in splits))
    if args.study:
      fill_study(tasks, splits, lengths, args.study, report)

    n_fill = max(1, args.fill_rows // args.rows)
    pipeline = {}

    def batches(pack):
      """n_fill batches; the pipeline's examples/s after its first batch (warm)."""
      it = tasks.batch_examples(examples(tasks, splits, lengths), lengths, args.rows,
                                drop_remainder=True, pack=pack).as_numpy_iterator()
      out = [next(it)]
      t0 = time.perf_counter()
      out += [next(it) for _ in range(n_fill)]
      pipeline[pack] = row_fill(out[1:])[2] / (time.perf_counter() - t0)
      return out[1:]

    unpacked, packed = batches(False), batches(True)
    fills = {'unpacked': row_fill(unpacked), 'packed': row_fill(packed)}
    per_row = fills['packed'][2] / (n_fill * args.rows)
    report(f'\n{n_fill * args.rows} rows: input pipeline {pipeline[False]:,.0f} examples/s '
           f'unpacked, {pipeline[True]:,.0f} examples/s packed (warm); '
           f'{per_row:.1f} examples per packed row')
    stream = examples(tasks, splits, lengths).as_numpy_iterator()
    per_batch = int(round(per_row * args.rows))
    hf_batches = [[(ex['inputs'], ex['targets']) for ex in
                   (next(stream) for _ in range(per_batch))] for _ in range(2)]
    dynamic = tuple(np.mean([sum(len(e[k]) for e in hb) / len(hb) / max(len(e[k]) for e in hb)
                             for hb in hf_batches]) for k in (0, 1))
    report('\n| size | rows | input fill | target fill | examples/step | examples/s '
           '(best step) | vs unpacked | examples/s (median step) |\n|---|---|---|---|---|---|---|---|')
    for size in args.sizes.split(','):
      speed = {}
      for name, rows in (('unpacked', unpacked), ('packed', packed)):
        speed[name] = jax_examples_per_s(size, args.method, rows[:2], args.steps, args.warmup)
      speed['hf'] = hf_examples_per_s(size, hf_batches, args.steps, args.warmup)
      for name, label in (('unpacked', 'unpacked'), ('packed', 'packed (one task per row)'),
                          ('hf', 'HF peer, dynamic padding')):
        fin, ftg, n = fills.get(name, dynamic + (per_batch * n_fill,))
        best, median = speed[name]
        report(f'| {size} | {label} | {fin:.3f} | {ftg:.3f} | {n / n_fill:.0f} | '
               f'{best:.2f} | {best / speed["unpacked"][0]:.1f}x | {median:.2f} |')
      report(f'  {size}: packed/unpacked {speed["packed"][0] / speed["unpacked"][0]:.1f}x, '
             f'packed/HF {speed["packed"][0] / speed["hf"][0]:.1f}x (best steps); '
             f'{speed["packed"][1] / speed["unpacked"][1]:.1f}x, '
             f'{speed["packed"][1] / speed["hf"][1]:.1f}x (median steps)')


if __name__ == '__main__':
  main()
