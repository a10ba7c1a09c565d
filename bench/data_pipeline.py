"""Examples/s of the offline GLUE input pipeline: read TSV -> T5 format -> tokenize -> batch.

Runs every GLUE task/split whose file is in the GLUE folder (HYPERPROMPT_GLUE_DIR,
or ../shared/data/glue beside the checkout) through
`hyperprompt_t5x.tasks.get_dataset` (TaskIdEncDecFeatureConverter, batched) for
training (shuffled, repeating) and reports the steady examples per second after
the first batch, and the time to that first batch (parse, graph build, shuffle
buffer fill), for each vocabulary asked for:

  byte  seqio.ByteVocabulary (longest sequences: one token per byte)
  sp    an 8k-piece unigram SentencePiece model trained here on the GLUE text
        (T5's own model lives on gs:// and cannot be read offline)
  PATH  any SentencePiece .model file

  python bench/data_pipeline.py [--vocabulary byte,sp] [--batch_size 128]
"""
import argparse
import json
import os
import pathlib
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

REPO = pathlib.Path(__file__).resolve().parents[1]


def _glue_dir(arg):
  path = arg or os.environ.get('HYPERPROMPT_GLUE_DIR') or REPO.parent / 'shared' / 'data' / 'glue'
  path = pathlib.Path(path)
  if not path.is_dir():
    raise SystemExit(f'GLUE folder {path} not found: pass --glue_dir or set HYPERPROMPT_GLUE_DIR')
  return path


def _text_fields(path):
  """The text cells of a GLUE TSV (header dropped) or the strings of a SuperGLUE JSONL line."""
  lines = pathlib.Path(path).read_text(encoding='utf-8-sig').splitlines()
  if str(path).endswith('.jsonl'):
    for line in lines:
      yield [v for v in json.loads(line).values() if isinstance(v, str)]
  else:
    for line in lines[1:]:
      yield line.split('\t')


def train_sentencepiece(files, out_dir, vocab_size):
  """A unigram SentencePiece model on the texts of `files`, T5's ids (pad 0, eos 1, unk 2,
  no bos); returns its .model path."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  corpus = pathlib.Path(out_dir) / 'corpus.txt'
  with open(corpus, 'w') as f:
    for path in files:
      for cells in _text_fields(path):
        f.write(' '.join(c for c in cells if len(c) > 8) + '\n')
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(pathlib.Path(out_dir) / 'sp'), vocab_size=vocab_size,
      num_threads=1, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
      minloglevel=2)
  return str(pathlib.Path(out_dir) / 'sp.model')


def _runs(tasks, glue_dir):
  """(task name, split) for every GLUE file present."""
  from hyperprompt_t5x.tasks import glue  # pylint: disable=g-import-not-at-top
  out = []
  for task in glue.GLUE_TASKS.values():
    if task.name.startswith('mnli_'):
      continue
    for split, rel in task.files.files.items():
      if (glue_dir / rel).is_file() and not split.startswith('test'):
        out.append((glue.PREFIX + task.name, split))
  return out


def _measure(tasks, name, split, lengths, batch_size, num_batches):
  """(seconds to the first batch, examples, seconds) of a repeating training stream."""
  start = time.perf_counter()
  ds = tasks.get_dataset(name, split, lengths, batch_size=batch_size, shuffle=True, seed=0,
                         num_epochs=None)
  it = ds.as_numpy_iterator()
  next(it)
  setup = time.perf_counter() - start
  start = time.perf_counter()
  n = 0
  for _ in range(num_batches):
    n += len(next(it)['task_ids'])
  return setup, n, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--glue_dir', default=None)
  parser.add_argument('--vocabulary', default='byte,sp')
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--inputs_length', type=int, default=256)
  parser.add_argument('--targets_length', type=int, default=8)
  parser.add_argument('--sp_vocab_size', type=int, default=8000)
  parser.add_argument('--num_batches', type=int, default=30, help='timed batches per task')
  args = parser.parse_args()
  glue_dir = _glue_dir(args.glue_dir)

  from hyperprompt_t5x import tasks  # pylint: disable=g-import-not-at-top
  tasks.set_data_dirs(glue_dir=glue_dir)
  runs = _runs(tasks, glue_dir)
  lengths = {'inputs': args.inputs_length, 'targets': args.targets_length}
  print(f'GLUE folder {glue_dir}; {len(runs)} task/splits; batch {args.batch_size}, '
        f'lengths {lengths}; cpus {os.cpu_count()}')
  with tempfile.TemporaryDirectory() as tmp:
    for spec in args.vocabulary.split(','):
      label = spec
      if spec == 'sp':
        spec = train_sentencepiece(sorted(glue_dir.glob('*/*.tsv')), tmp, args.sp_vocab_size)
        label = f'sp (trained here, {args.sp_vocab_size} pieces)'
      tasks.set_vocabulary(spec)  # re-registers: fresh sources, parse caches empty
      total = seconds = setup = 0.0
      for name, split in runs:
        s, n, t = _measure(tasks, name, split, lengths, args.batch_size, args.num_batches)
        setup, total, seconds = setup + s, total + n, seconds + t
        print(f'  {name:28s} {split:22s} first batch {s:5.2f} s, then '
              f'{n / t:8,.0f} examples/s')
      print(f'{label}: {total / seconds:,.0f} examples/s steady '
            f'({int(total)} examples, batch {args.batch_size}); first batch (parse + '
            f'graph build + shuffle fill) {setup / len(runs):.2f} s per task on average')


if __name__ == '__main__':
  main()
