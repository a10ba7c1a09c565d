"""The PyTorch peer: Hugging Face T5 1.1 at the project bench's shapes and timing.

    python bench/hf_peer.py --sizes=base --modes=full,peft_prefix \
        --batch=64 --inputs_len=512 --targets_len=64 --out=/tmp/hf.json

What users would otherwise run: `T5ForConditionalGeneration` built from a
`transformers.T5Config` with T5 1.1 shapes (gated-GELU, untied output layer,
relative-position buckets 32 / distance 128) taken from the project's own
`T5Config.from_size`, random init, float32 parameters, bf16 autocast (or plain
float32 with `--dtype float32`, for a fair CPU comparison: torch's bf16 on a CPU
without bf16 instructions is emulated), eager.

Modes:
  full         full fine-tuning with `torch.optim.AdamW` (the project bench's default)
  peft_prefix  PEFT prefix tuning (`PrefixTuningConfig`, frozen backbone, AdamW on the
               prefix encoder); skipped with a recorded reason when `peft` is not importable.
               On T5, PEFT passes the prefix as the decoder's past key/values, so it reaches
               the decoder (self- and cross-attention caches), not the encoder.

transformers 5.x ties T5's output layer to the embedding whatever
`tie_word_embeddings` says; T5 1.1 is untied, so when the built model comes
out tied the bench gives `lm_head` its own copy of the weight and records it
(`output_layer` in the JSON).

Timing as bench/train_step.py: warm-up steps excluded, median of the timed
steps, each synchronised (`torch.cuda.synchronize` on the GPU; CPU ops are
synchronous); same JSON keys, so one run on one card compares side by side.
"""
import argparse
import dataclasses
import os
import pathlib
import platform
import resource
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))
os.environ.setdefault('USE_TF', '0')  # keep transformers away from TensorFlow
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # jax is imported for shapes

from bench import flops as flops_lib  # noqa: E402
from bench import train_step as jax_bench  # noqa: E402  (batches, table, JSON)
from hyperprompt_t5x.model import network  # noqa: E402

MODES = ('full', 'peft_prefix')
DTYPES = ('bfloat16', 'float32')


class Skipped(Exception):
  """A configuration this machine cannot run (e.g. peft not installed); says why."""


@dataclasses.dataclass(frozen=True)
class PeerConfig:
  size: str = 'base'
  mode: str = 'full'
  batch: int = 64
  inputs_len: int = 512
  targets_len: int = 64
  prompt_length: Optional[int] = None  # None: the project config's default
  dropout_rate: float = 0.1
  learning_rate: float = 1e-4
  warmup: int = 3
  steps: int = 10
  num_batches: int = 2
  seed: int = 0
  device: str = 'auto'
  fused_adamw: bool = False
  dtype: str = 'bfloat16'  # 'bfloat16': bf16 autocast; 'float32': no autocast


def project_shapes(size: str):
  """The project's T5Config for `size`: the single source of the shapes."""
  return network.T5Config.from_size(size)


def build_hf_model(dims: flops_lib.Dims, dropout_rate: float, device=None):
  """A random-init T5 1.1 (gated-GELU, untied) built on `device`; returns (model, note)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  hf_config = transformers.T5Config(
      vocab_size=dims.vocab_size, d_model=dims.emb_dim, d_kv=dims.head_dim,
      d_ff=dims.mlp_dim, num_layers=dims.num_encoder_layers,
      num_decoder_layers=dims.num_decoder_layers, num_heads=dims.num_heads,
      relative_attention_num_buckets=32, relative_attention_max_distance=128,
      dropout_rate=dropout_rate, feed_forward_proj='gated-gelu', tie_word_embeddings=False,
      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
  with torch.device(device or 'cpu'):  # initialise where it runs (large: 780M params)
    model = transformers.T5ForConditionalGeneration(hf_config)
  if model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr():
    # transformers 5.x: tied regardless of the config. Untie, as T5 1.1 is.
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    note = f'untied by the bench (transformers {transformers.__version__} tied it)'
  else:
    note = f'untied (transformers {transformers.__version__})'
  return model, note


def run_one(cfg: PeerConfig) -> Dict[str, Any]:
  """Builds, warms up and times one peer configuration."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  config = project_shapes(cfg.size)
  dims = flops_lib.Dims.from_config(config)
  prompt_length = int(cfg.prompt_length if cfg.prompt_length is not None
                      else getattr(config, 'prompt_length', 16) or 16)
  if cfg.device == 'auto':
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  else:
    device = torch.device(cfg.device)
  torch.manual_seed(cfg.seed)
  model, output_note = build_hf_model(dims, cfg.dropout_rate, device)
  base_config = model.config
  num_params = sum(p.numel() for p in model.parameters())
  if cfg.mode == 'peft_prefix':
    try:
      import peft  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise Skipped(f'skipped: peft is not importable ({e})') from None
    # PEFT would take token_dim = d_model, wrong where heads·head_dim != d_model
    # (T5 1.1 small: 6·64 != 512); give the key/value width explicitly.
    model = peft.get_peft_model(model, peft.PrefixTuningConfig(
        task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=prompt_length,
        token_dim=dims.num_heads * dims.head_dim, num_attention_heads=dims.num_heads,
        num_layers=dims.num_decoder_layers))
    num_params = sum(p.numel() for p in model.parameters())
  model.to(device)
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt_kwargs = {'fused': True} if cfg.fused_adamw else {}
  opt = torch.optim.AdamW(trainable, lr=cfg.learning_rate, **opt_kwargs)

  np_rng = np.random.default_rng(cfg.seed)
  batches = []
  for _ in range(max(1, cfg.num_batches)):
    b = jax_bench.synthetic_batch(np_rng, cfg.batch, cfg.inputs_len, cfg.targets_len,
                                  dims.vocab_size, 1)
    labels = np.where(b['decoder_target_tokens'] > 0, b['decoder_target_tokens'], -100)
    batches.append({
        'input_ids': torch.from_numpy(b['encoder_input_tokens']).long().to(device),
        'attention_mask': torch.from_numpy(b['encoder_input_tokens'] > 0).long().to(device),
        'decoder_input_ids': torch.from_numpy(b['decoder_input_tokens']).long().to(device),
        'labels': torch.from_numpy(labels).long().to(device)})

  def sync():
    if device.type == 'cuda':
      torch.cuda.synchronize(device)

  autocast = cfg.dtype == 'bfloat16'

  def step(batch):
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
      loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
  sync()
  times: List[float] = []
  first_step_s = None
  loss = None
  for i in range(cfg.warmup + cfg.steps):
    t0 = time.perf_counter()
    loss = step(batches[i % len(batches)])
    sync()
    dt = time.perf_counter() - t0
    if i == 0:
      first_step_s = dt
    if i >= cfg.warmup:
      times.append(dt)
  final_loss = float(loss.detach().float().cpu())
  if device.type == 'cuda':
    peak, peak_source = torch.cuda.max_memory_allocated(device), 'torch.cuda.max_memory_allocated'
  else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_source = 'process_peak_rss (cumulative over this process)'

  full = cfg.mode == 'full'
  flops = flops_lib.train_step_flops(
      dims, batch=cfg.batch, inputs_len=cfg.inputs_len, targets_len=cfg.targets_len,
      decoder_prompt_cols=0 if full else prompt_length, backbone_trained=full)['total']
  median_s = jax_bench.percentile(times, 50)
  return {
      'impl': 'hf_transformers (torch)', 'size': cfg.size,
      'method': 'none' if full else 'peft_prefix', 'freeze': 'all' if full else 'backbone',
      'optimizer': 'adamw' + (' (fused)' if cfg.fused_adamw else ''), 'batch': cfg.batch,
      'inputs_len': cfg.inputs_len, 'targets_len': cfg.targets_len,
      'dtype': 'bfloat16 autocast' if autocast else 'float32', 'remat_policy': 'none',
      'attention_impl': str(getattr(base_config, '_attn_implementation', None) or 'eager'),
      'embedding_lookup': 'torch.nn.Embedding', 'prompt_length': 0 if full else prompt_length,
      'dropout_rate': cfg.dropout_rate, 'output_layer': output_note,
      'num_params': int(num_params), 'num_trainable_params': int(sum(p.numel() for p in trainable)),
      'step_ms_median': 1e3 * median_s, 'step_ms_p10': 1e3 * jax_bench.percentile(times, 10),
      'step_ms_p90': 1e3 * jax_bench.percentile(times, 90), 'steps': cfg.steps,
      'warmup': cfg.warmup,
      'tokens_per_s': cfg.batch * (cfg.inputs_len + cfg.targets_len) / median_s,
      'model_flops_per_step': flops, 'model_tflops_per_s': flops / median_s / 1e12,
      'peak_memory_bytes': int(peak), 'peak_memory_source': peak_source,
      'compile_s': None, 'first_step_s': first_step_s, 'overhead_vs_none_pct': None,
      'final_loss': final_loss, 'error': None,
  }


def environment() -> Dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  try:
    import peft  # pylint: disable=g-import-not-at-top
    peft_version = peft.__version__
  except ImportError as e:
    peft_version = f'not importable: {e}'
  cuda = torch.cuda.is_available()
  import datetime  # pylint: disable=g-import-not-at-top
  return {
      'date_utc': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M'),
      'backend': 'cuda' if cuda else 'cpu',
      'device_kind': torch.cuda.get_device_name(0) if cuda else platform.processor() or 'cpu',
      'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
      'platform': platform.platform(), 'python': platform.python_version(),
      'torch': torch.__version__, 'transformers': transformers.__version__, 'peft': peft_version,
      'allow_tf32_matmul': bool(torch.backends.cuda.matmul.allow_tf32),
  }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--sizes', type=jax_bench.csv_list(str, jax_bench.SIZES), default=['base'])
  p.add_argument('--modes', type=jax_bench.csv_list(str, MODES), default=['full', 'peft_prefix'])
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--inputs_len', type=int, default=512)
  p.add_argument('--targets_len', type=int, default=64)
  p.add_argument('--prompt_length', type=int, default=None)
  p.add_argument('--dropout_rate', type=float, default=0.1)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--device', default='auto', help='auto | cpu | cuda')
  p.add_argument('--dtype', choices=DTYPES, default='bfloat16',
                 help='bfloat16: bf16 autocast (parameters float32); float32: no autocast')
  p.add_argument('--fused_adamw', action='store_true', help='torch.optim.AdamW(fused=True)')
  p.add_argument('--threads', type=int, default=None,
                 help='torch.set_num_threads (CPU); default: torch\'s own choice')
  p.add_argument('--time_budget_s', type=float, default=None)
  p.add_argument('--out', type=pathlib.Path, default=None, help='JSON output file')
  p.add_argument('--overwrite', action='store_true')
  args = p.parse_args(argv)
  for name in ('batch', 'inputs_len', 'targets_len', 'steps'):
    if getattr(args, name) <= 0:
      p.error(f'--{name} must be positive, got {getattr(args, name)}')
  if args.out is not None and args.out.exists() and not args.overwrite:
    p.error(f'--out {args.out} exists; pass --overwrite to replace it')
  return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
  args = parse_args(argv)
  if args.threads is not None:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.threads)
  meta = dict(environment(), argv=list(sys.argv[1:] if argv is None else argv),
              flops_formula='bench/flops.py (frozen weights: no weight-gradient FLOPs)')
  results: List[Dict[str, Any]] = []
  start = time.perf_counter()
  for size in args.sizes:
    for mode in args.modes:
      cfg = PeerConfig(size=size, mode=mode, batch=args.batch, inputs_len=args.inputs_len,
                       targets_len=args.targets_len, prompt_length=args.prompt_length,
                       dropout_rate=args.dropout_rate, warmup=args.warmup, steps=args.steps,
                       seed=args.seed, device=args.device, fused_adamw=args.fused_adamw,
                       dtype=args.dtype)
      base = {'impl': 'hf_transformers (torch)', 'size': size,
              'method': 'none' if mode == 'full' else mode, 'batch': args.batch,
              'inputs_len': args.inputs_len, 'targets_len': args.targets_len}
      if args.time_budget_s is not None and time.perf_counter() - start > args.time_budget_s:
        rec = dict(base, error=f'skipped: time budget {args.time_budget_s:.0f} s spent')
      else:
        try:
          rec = run_one(cfg)
        except Skipped as e:
          rec = dict(base, error=str(e))
        except Exception as e:  # pylint: disable=broad-except
          rec = dict(base, error=f'{type(e).__name__}: {e}'[:2000])
      results.append(rec)
      if args.out is not None:
        jax_bench.write_json(args.out, meta, results)
      print(jax_bench.format_table(results[-1:]).splitlines()[-1], flush=True)
      if rec.get('error'):
        print(f'  {rec["error"]}', flush=True)
  print()
  print(jax_bench.format_table(results))
  return results


if __name__ == '__main__':
  # Non-zero exit when a configuration failed (budget skips excepted), after writing all.
  sys.exit(int(any(r.get('error') and not r['error'].startswith('skipped')
                   for r in main())))
