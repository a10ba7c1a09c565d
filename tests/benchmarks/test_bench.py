"""bench/: the FLOP formula by hand, the train-step bench end to end, the HF peer.

Timing numbers come from running the bench scripts, never from these tests;
here only the counting, the plumbing and the JSON contract are checked.
"""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = next(p for p in pathlib.Path(__file__).resolve().parents if (p / 'setup.py').is_file())
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from bench import flops  # noqa: E402
from bench import train_step  # noqa: E402
from conftest import FAST_XLA_FLAGS  # noqa: E402

# The keys both scripts must write, so one run compares side by side.
REQUIRED_KEYS = train_step.RESULT_KEYS

# D=8, H=2, K=4 (HK=8), F=16, one encoder and one decoder layer, V=32.
TINY = flops.Dims(emb_dim=8, num_heads=2, head_dim=4, mlp_dim=16, num_encoder_layers=1,
                  num_decoder_layers=1, vocab_size=32)


def test_flops_hand_computed_hyperprompt():
  # batch 2, inputs 4, targets 3, l = 2 prompt columns in both self-attentions.
  # Weight matmuls, forward, per example:
  enc = 4 * 2 * (4 * 8 * 8 + 3 * 8 * 16)  # 4 input tokens × 2·(q,k,v,o + mlp) = 5120
  dec_tgt = 3 * 2 * (6 * 8 * 8 + 3 * 8 * 16)  # 3 targets × 2·(self qkvo, cross q,o, mlp) = 4608
  dec_in = 4 * 2 * (2 * 8 * 8)  # cross k,v over the 4 encoder outputs = 1024
  logits = 3 * 2 * 8 * 32  # = 1536
  weights = 2 * (enc + dec_tgt + dec_in + logits)  # × batch = 24576
  # Attention score + value matmuls, forward: 2·2·HK × (enc 4·(4+2) + dec 3·(3+2) + cross 3·4).
  attention = 2 * (2 * 2 * 8 * (4 * 6 + 3 * 5 + 3 * 4))  # = 3264
  assert weights == 24576 and attention == 3264
  got = flops.method_train_flops(TINY, 'global', batch=2, inputs_len=4, targets_len=3,
                                 prompt_length=2)
  assert got['weight_matmul_fwd'] == 24576
  assert got['attention_fwd'] == 3264
  assert got['total'] == 3 * 24576 + 3 * 3264 == 83520
  # Frozen backbone: no weight-gradient FLOPs, so weight matmuls count ×2.
  frozen = flops.method_train_flops(TINY, 'share', batch=2, inputs_len=4, targets_len=3,
                                    prompt_length=2, backbone_trained=False)
  assert frozen['total'] == 2 * 24576 + 3 * 3264 == 58944
  # No conditioning: no prompt columns (enc 4·4, dec 3·3, cross 3·4).
  none = flops.method_train_flops(TINY, 'none', batch=2, inputs_len=4, targets_len=3,
                                  prompt_length=2)
  assert none['attention_fwd'] == 2 * 2 * 2 * 8 * (16 + 9 + 12) == 2368
  assert none['weight_matmul_fwd'] == 24576


def test_flops_prompt_tuning_lengthens_the_encoder():
  # Prompt tuning prepends l=2 positions: the encoder (and cross k,v) run over 6 positions.
  enc = 6 * 2 * (4 * 8 * 8 + 3 * 8 * 16)  # 7680
  dec_tgt = 3 * 2 * (6 * 8 * 8 + 3 * 8 * 16)  # 4608
  dec_in = 6 * 2 * (2 * 8 * 8)  # 1536
  logits = 3 * 2 * 8 * 32  # 1536
  weights = 2 * (enc + dec_tgt + dec_in + logits)  # 30720
  attention = 2 * (2 * 2 * 8 * (6 * 6 + 3 * 3 + 3 * 6))  # 4032
  got = flops.method_train_flops(TINY, 'prompt_tuning', batch=2, inputs_len=4, targets_len=3,
                                 prompt_length=2)
  assert (got['weight_matmul_fwd'], got['attention_fwd']) == (weights, attention) == (30720, 4032)
  assert got['total'] == 3 * (30720 + 4032)


def test_flops_equal_lengths_is_six_n_tokens():
  # With L_in = L_tgt = L and no prompts, the weight part is 2·N_matmul·B·L (6·N·tokens).
  d = flops.Dims(emb_dim=768, num_heads=12, head_dim=64, mlp_dim=2048, num_encoder_layers=12,
                 num_decoder_layers=12, vocab_size=32128)
  n_enc = 12 * (4 * 768 * 768 + 3 * 768 * 2048)
  n_dec = 12 * (8 * 768 * 768 + 3 * 768 * 2048) + 768 * 32128
  got = flops.train_step_flops(d, batch=4, inputs_len=128, targets_len=128)
  assert got['weight_matmul_fwd'] == 2 * (n_enc + n_dec) * 4 * 128


def test_flops_bad_input_is_named():
  with pytest.raises(ValueError, match='unknown method'):
    flops.prompt_lengths('adapter', 4)
  with pytest.raises(ValueError, match='inputs_len'):
    flops.train_step_flops(TINY, batch=1, inputs_len=0, targets_len=3)
  with pytest.raises(ValueError, match='lacks'):
    flops.Dims.from_config(object())


def test_synthetic_batch_is_t5x_shaped():
  rng = np.random.default_rng(0)
  b = train_step.synthetic_batch(rng, batch=5, inputs_len=12, targets_len=6, vocab_size=50,
                                 num_tasks=3)
  assert b['encoder_input_tokens'].shape == (5, 12)
  assert b['decoder_target_tokens'].shape == b['decoder_input_tokens'].shape == (5, 6)
  assert all(v.dtype == np.int32 for k, v in b.items() if k != 'decoder_loss_weights')
  tgt = b['decoder_target_tokens']
  np.testing.assert_array_equal(b['decoder_input_tokens'][:, 1:], tgt[:, :-1])
  np.testing.assert_array_equal(b['decoder_loss_weights'], (tgt > 0).astype(np.float32))
  assert ((b['task_ids'] >= 0) & (b['task_ids'] < 3)).all()
  for row in b['encoder_input_tokens']:
    n = int((row > 0).sum())
    assert n >= 6 and row[n - 1] == 1 and (row[:n] > 0).all() and (row[n:] == 0).all()


def test_percentile_and_overheads():
  assert train_step.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
  assert train_step.percentile([1.0, 2.0, 3.0], 10) == pytest.approx(1.2)
  rows = [dict(impl='j', size='s', freeze='all', optimizer='adamw', batch=2, inputs_len=4,
               targets_len=2, dtype='bf16', attention_impl='xla', remat_policy='none',
               method=m, step_ms_median=t, error=None, overhead_vs_none_pct=None)
          for m, t in (('global', 11.0), ('none', 10.0))]
  rows.append(dict(rows[0], size='other', method='global'))  # no 'none' to compare with
  train_step.add_overheads(rows)
  assert rows[0]['overhead_vs_none_pct'] == pytest.approx(10.0)
  assert rows[1]['overhead_vs_none_pct'] == 0.0
  assert rows[2]['overhead_vs_none_pct'] is None


def test_existing_out_is_not_overwritten(tmp_path):
  out = tmp_path / 'bench.json'
  out.write_text('keep')
  with pytest.raises(SystemExit):
    train_step.parse_args(['--out', str(out)])
  assert out.read_text() == 'keep'
  with pytest.raises(SystemExit):
    train_step.parse_args(['--methods', 'none,adapter'])


_BLOCKED_RUN = textwrap.dedent('''
    import importlib.abc, json, sys
    BLOCKED = ('gin', 'seqio', 'tensorflow', 'tensorflow_datasets', 'clu')
    class Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
          raise ImportError(f'bench must not import {name}')
    sys.meta_path.insert(0, Block())
    sys.path.insert(0, sys.argv[1])
    from bench import train_step
    train_step.main(sys.argv[2:])
    print('LOADED', json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)))
''')


def test_bench_runs_tiny_end_to_end_without_gin_seqio_tf(tmp_path):
  out = tmp_path / 'bench.json'
  args = ['--sizes=tiny', '--methods=global', '--batch=2', '--inputs_len=16',
          '--targets_len=8', '--warmup=2', '--steps=3', f'--out={out}']
  # Compile fast (unoptimised XLA:CPU code, rbg dropout keys): only plumbing is checked.
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             JAX_DEFAULT_PRNG_IMPL='unsafe_rbg',
             XLA_FLAGS=FAST_XLA_FLAGS)
  proc = subprocess.run([sys.executable, '-c', _BLOCKED_RUN, str(REPO)] + args,
                        capture_output=True, text=True, env=env, timeout=240, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'LOADED []' in proc.stdout
  data = json.loads(out.read_text())
  assert data['meta']['backend'] == 'cpu'
  (r,) = data['results']
  assert r['method'] == 'global' and r['error'] is None, r.get('error')
  assert all(k in r for k in REQUIRED_KEYS)
  assert r['steps'] == 3 and r['warmup'] == 2
  assert 0 < r['step_ms_p10'] <= r['step_ms_median'] <= r['step_ms_p90']
  assert r['tokens_per_s'] == pytest.approx(2 * 24 / (r['step_ms_median'] / 1e3))
  assert r['peak_memory_bytes'] > 0 and r['compile_s'] >= 0
  # XLA's view of the compiled step: FLOPs near the formula's, a memory breakdown.
  assert r['xla_flops'] > 0 and r['xla_flops_ratio'] == pytest.approx(
      r['xla_flops'] / r['model_flops_per_step'])
  assert r['temp_bytes'] > 0 and r['alias_bytes'] > 0
  assert r['compiled_peak_bytes'] == (r['argument_bytes'] + r['output_bytes']
                                      - r['alias_bytes'] + r['temp_bytes'])
  assert np.isfinite(r['final_loss'])
  # The FLOPs are the formula's for this config (tiny shapes, the config's prompt length).
  from hyperprompt_t5x.model import network
  config = network.T5Config.from_size('tiny', method='global')
  expected = flops.method_train_flops(
      flops.Dims.from_config(config), 'global', batch=2, inputs_len=16, targets_len=8,
      prompt_length=config.prompt_length)['total']
  assert r['model_flops_per_step'] == expected
  assert r['model_tflops_per_s'] == pytest.approx(expected / (r['step_ms_median'] / 1e3) / 1e12)


def test_hf_peer_tiny_same_keys_and_untied(tmp_path):
  torch = pytest.importorskip('torch', reason='the HF peer needs torch (requirements-test)')
  pytest.importorskip('transformers', reason='the HF peer needs transformers')
  from bench import hf_peer
  torch.set_num_threads(1)
  model, note = hf_peer.build_hf_model(TINY, dropout_rate=0.1)
  assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr(), note
  assert tuple(model.lm_head.weight.shape) == (32, 8)
  out = tmp_path / 'hf.json'
  results = hf_peer.main(['--sizes=tiny', '--modes=full,peft_prefix', '--batch=2',
                          '--inputs_len=16', '--targets_len=8', '--warmup=2', '--steps=3',
                          '--device=cpu', f'--out={out}'])
  data = json.loads(out.read_text())
  assert data['results'] == json.loads(json.dumps(results, default=str))
  full, prefix = data['results']
  assert full['error'] is None and all(k in full for k in REQUIRED_KEYS)
  assert 0 < full['step_ms_p10'] <= full['step_ms_median'] <= full['step_ms_p90']
  assert full['num_trainable_params'] == full['num_params']
  try:
    import peft  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    assert prefix['error'].startswith('skipped: peft is not importable')
  else:
    assert prefix['error'] is None
    assert 0 < prefix['num_trainable_params'] < prefix['num_params']


def test_memory_plan_tiny_on_two_devices(tmp_path):
  """Real compiles (2 host devices, NUM_PARTITIONS=2), the fit, the batch that fits, the cache."""
  from bench import memory_plan  # pylint: disable=g-import-not-at-top
  cache = tmp_path / 'plan.json'
  argv = ['--sizes=tiny', '--methods=none', '--partitions=2', '--slices=v4-8,v5e-8',
          '--optimizer=adamw', '--inputs_len=8', '--targets_len=4', f'--cache={cache}']
  rows = memory_plan.main(argv)
  measured = json.loads(cache.read_text())
  assert len(measured) == 1 + len(memory_plan.FIT_LAYERS) * len(memory_plan.FIT_BATCH)
  assert [(r['slice'], r['chips'], r['hbm_gib']) for r in rows] == [('v4-8', 4, 32),
                                                                     ('v5e-8', 8, 16)]
  r = rows[0]
  # AdamW: two moments sharded like the parameters (+ a step count).
  assert 2 * r['param_gib'] <= r['opt_state_gib'] <= 2 * r['param_gib'] + 1e-6
  # The parameters are split over the 2-way model axis: fewer bytes than the whole tree.
  from hyperprompt_t5x.model import network  # pylint: disable=g-import-not-at-top
  total = 4 * sum(x.size for x in jax_leaves(network.param_shapes(
      network.T5Config.from_size('tiny'))))
  assert r['param_gib'] * memory_plan.GIB < total
  # The largest per-device batch fits and one more does not.
  fixed = (r['param_gib'] + r['opt_state_gib'] + r['fixed_temp_gib']) * memory_plan.GIB
  per = r['activation_gib_per_example'] * memory_plan.GIB
  b = r['max_batch_per_device']
  assert per > 0 and fixed + b * per <= 32 * memory_plan.GIB < fixed + (b + 1) * per
  assert r['max_global_batch'] == b * (4 // 2)
  # Cached: a second run compiles nothing (the subprocess would be the slow part).
  stamp = cache.stat().st_mtime_ns
  assert memory_plan.main(argv) == rows and cache.stat().st_mtime_ns == stamp


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_leaves(tree)


def test_memory_plan_fit_recovers_a_bilinear_model():
  from bench import memory_plan  # pylint: disable=g-import-not-at-top
  coef = {'a': 5.0, 'b': 3.0, 'c': 7.0, 'd': 11.0}
  points = {(l, b): memory_plan.predict_temp(coef, l, b)
            for l in memory_plan.FIT_LAYERS for b in memory_plan.FIT_BATCH}
  assert memory_plan.fit_temp(points) == pytest.approx(coef)
  assert memory_plan.predict_temp(coef, 24, 8) == 5 + 3 * 24 + 8 * (7 + 11 * 24)


@pytest.mark.parametrize('smoke', ['1', '0'])
def test_run_gpu_jobs_parse(tmp_path, smoke):
  """Every job run_gpu.sh would start (GPU shapes and CPU smoke) passes its script's parser."""
  from bench import hf_peer  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, BENCH_DRY_RUN='1', BENCH_SMOKE=smoke, OUT=str(tmp_path))
  proc = subprocess.run(['bash', str(REPO / 'bench' / 'run_gpu.sh')], env=env,
                        capture_output=True, text=True, timeout=60, check=True)
  jobs = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith('JOB ')]
  assert [j[0] for j in jobs] == ['jax_base', 'hf_base', 'jax_large', 'hf_large',
                                  'jax_base_attention', 'jax_base_remat', 'jax_base_rbg']
  parsers = {'bench/train_step.py': train_step.parse_args, 'bench/hf_peer.py': hf_peer.parse_args}
  for name, script, *argv in jobs:
    args = parsers[script](argv)
    assert str(args.out) == str(tmp_path / f'{name}.json')
    if smoke == '0' and name in ('jax_base', 'hf_base'):
      assert (args.sizes, args.batch, args.inputs_len, args.targets_len) == (
          ['base'], 64, 512, 64)
  assert not list(tmp_path.iterdir())  # a dry run writes nothing
