"""Prompt/real key-value norm ratios on the real T5X checkpoint, before and after calibration,
and the trainer's step-0 ratio line (CALIBRATE_PROMPT_SCALE on and off)."""
import contextlib
import io
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperprompt_t5x.checkpoints import pretrained
from hyperprompt_t5x.cli import commands
from hyperprompt_t5x.model import network
from hyperprompt_t5x.training import prompt_scale
from hyperprompt_t5x.checkpoints import t5x_format

REPO = next(p for p in pathlib.Path(__file__).resolve().parents if (p / 'setup.py').is_file())
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


def _batch(vocab):
  rng = np.random.default_rng(0)
  enc = rng.integers(2, vocab, (6, 20)).astype(np.int32)
  enc[:3, 14:] = 0
  tgt = rng.integers(2, vocab, (6, 5)).astype(np.int32)
  tgt[0, 3:] = 0
  return {'encoder_input_tokens': enc, 'decoder_target_tokens': tgt,
          'decoder_input_tokens': np.pad(tgt[:, :-1], ((0, 0), (1, 0))),
          'task_ids': np.arange(6, dtype=np.int32) % 3}


@pytest.mark.parametrize('method,flags', [('share', dict(prompt_cross_attention=True)),
                                          ('sep', {}), ('global', {})])
def test_ratios_on_the_t5x_checkpoint_are_one_after_calibration(method, flags,
                                                                t5x_tiny_checkpoint):
  backbone = t5x_format.load_t5x_params(str(t5x_tiny_checkpoint))
  cfg = t5x_format.t5x_config_from_params(
      backbone, method=method, num_tasks=3, dtype=jnp.float32, dropout_rate=0.0,
      prompt_length=4, bottleneck=8, **flags)
  params = pretrained.merge_backbone(network.random_params(cfg, seed=1), backbone)
  batch = _batch(cfg.vocab_size)

  @jax.jit
  def run(params):
    before = prompt_scale.norm_ratios(cfg, params, batch)
    calibrated = prompt_scale.calibrate(cfg, params, before, batch['task_ids'])
    return before, prompt_scale.norm_ratios(cfg, calibrated, batch), calibrated

  before, after, calibrated = jax.device_get(run(params))
  kinds = ['encoder', 'decoder'] + (['cross'] if flags else [])
  assert sorted(before) == sorted(kinds)
  for kind in kinds:
    for name in ('key', 'value'):
      b, a = np.asarray(before[kind][name]), np.asarray(after[kind][name])
      assert b.shape == (2,) and np.all((b > 0.2) & (b < 5)), (kind, name, b)
      # Exact at layer 0 (Global: to the fit's tolerance); a later layer's real k/v
      # move a little with the earlier prompts.
      np.testing.assert_allclose(a, 1.0, rtol=6e-2, err_msg=f'{kind} {name}')
  # Only the up-projections (and Global's layer embeddings) changed; the backbone is untouched.
  flat_a, flat_b = pretrained.flatten_params(params), pretrained.flatten_params(calibrated)
  changed = sorted(k for k in flat_a if not np.array_equal(flat_a[k], flat_b[k]))
  allowed = ('_up', 'layer_embedding') if method == 'global' else ('_up',)
  assert changed and all(any(a in k for a in allowed) for k in changed), changed
  if method == 'global':
    assert any('layer_embedding' in k for k in changed), changed


# ----------------------------------------------------------------------------
# The trainer's step-0 line on a run that restores a checkpoint, and its switch.
# ----------------------------------------------------------------------------

_LINE = re.compile(r'prompt/real key-value norm ratio per block on the first batch: (.*?); '
                   r'(?:after rescaling: (.*)|not rescaled \(CALIBRATE_PROMPT_SCALE = False\))$')


def _parse_ratios(text):
  """format_ratios' 'encoder k 0.98 1.02 | v 1.01 0.97; decoder ...' -> {kind: {k, v}}."""
  out = {}
  for part in text.split('; '):
    kind, rest = part.split(' k ')
    keys, values = rest.split(' | v ')
    out[kind] = {'key': [float(x) for x in keys.split()],
                 'value': [float(x) for x in values.split()]}
  return out


@pytest.fixture(scope='module')
def restored_runs(tmp_path_factory, t5x_tiny_checkpoint, compilation_cache):
  """{rescale: (ratio lines, checkpoint_1 params)}: 1 demo step from the real T5X checkpoint,
  HyperPrompt-Share, FREEZE='prompts' (the generators U stay as step 0 left them). Global's
  step 0 runs under T5X in tests/t5x_adapter/test_t5x_runs.py (the same prompt_scale.calibrate_first_batch)."""
  del compilation_cache  # the second run reuses the first's compiled programs
  from bench.kill_harness import demo_args
  cfg = t5x_format.t5x_config_from_params(
      t5x_format.load_t5x_params(str(t5x_tiny_checkpoint)))
  shapes = [f'--gin_bindings=T5Config.{f} = {getattr(cfg, f)}' for f in (
      'vocab_size', 'emb_dim', 'num_heads', 'head_dim', 'num_encoder_layers',
      'num_decoder_layers', 'mlp_dim')]  # the checkpoint's shapes over demo.gin's
  runs = {}
  for rescale in (True, False):
    model_dir = tmp_path_factory.mktemp(f'rescale_{rescale}') / 'run'
    args = demo_args(model_dir, f'--gin.INITIAL_CHECKPOINT_PATH={t5x_tiny_checkpoint}',
                     "--gin.METHOD='share'", "--gin.FREEZE='prompts'",
                     f'--gin.CALIBRATE_PROMPT_SCALE={rescale}',
                     *shapes, steps=1, save=1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      assert commands.run(args) == 0
    lines = [m for m in map(_LINE.match, out.getvalue().splitlines()) if m]
    runs[rescale] = (lines, pretrained.flatten_params(
        pretrained.load_t5x_params(str(model_dir / 'checkpoint_1'))))
  return runs


def test_restored_run_logs_ratios_and_rescales_them_to_one(restored_runs):
  (line,), _ = restored_runs[True]
  before, after = _parse_ratios(line.group(1)), _parse_ratios(line.group(2))
  assert sorted(before) == sorted(after) == ['decoder', 'encoder']
  for name in ('key', 'value'):
    b = np.concatenate([before[k][name] for k in ('encoder', 'decoder')])
    a = np.concatenate([after[k][name] for k in ('encoder', 'decoder')])
    assert b.shape == a.shape == (4,) and np.all((b > 0.1) & (b < 10)), (name, b)
    assert np.any(np.abs(b - 1) > 0.05), (name, b)  # there was something to rescale
    # Share: U per block, so every block's ratio is 1 (exact in each stack's first layer).
    np.testing.assert_allclose(a, 1.0, atol=0.05, err_msg=name)


def test_calibrate_prompt_scale_false_logs_ratios_and_keeps_u(restored_runs, capsys):
  (on,), on_params = restored_runs[True]
  (off,), off_params = restored_runs[False]
  assert off.group(2) is None  # 'not rescaled', no after-figures
  before = _parse_ratios(on.group(1))
  assert _parse_ratios(off.group(1)) == before  # same init, same first batch
  for name in ('key', 'value'):
    leaf = f'task_conditioning/{name}_up'  # [blocks (encoder, decoder), b, h·d]
    u_on, u_off = on_params[leaf], off_params[leaf]
    # Switch on: each block's U is the switch-off run's (the init's) over that block's
    # logged ratio (2 decimals).
    q = np.sum(u_off * u_on, axis=(1, 2)) / np.sum(u_on * u_on, axis=(1, 2))  # [blocks]
    np.testing.assert_allclose(u_on * q[:, None, None], u_off, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(q, before['encoder'][name] + before['decoder'][name],
                               rtol=2e-2, atol=6e-3, err_msg=leaf)
  # Nothing else differs between the runs but the trained prompts (which may not: AdamW's
  # first step is about lr·sign(gradient)).
  differs = {k for k in on_params if not np.array_equal(on_params[k], off_params[k])}
  assert differs - {'task_conditioning/prompts'} == {'task_conditioning/key_up',
                                                     'task_conditioning/value_up'}, differs
  assert commands.main(['train', '--help']) == 0
  assert '--gin.CALIBRATE_PROMPT_SCALE=True' in capsys.readouterr().out


def test_calibrate_prompt_scale_must_be_a_bool(tmp_path):
  with pytest.raises(ValueError, match="CALIBRATE_PROMPT_SCALE='no' is not accepted: "
                                       'CALIBRATE_PROMPT_SCALE takes True or False'):
    commands.run(['train', '--gin_file=demo.gin', f'--gin.MODEL_DIR={tmp_path / "run"}',
             "--gin.CALIBRATE_PROMPT_SCALE='no'"])
  assert not (tmp_path / 'run').exists()
