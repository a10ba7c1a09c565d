"""Hugging Face T5 import: our network equals `T5ForConditionalGeneration`.

A random HF T5 1.1 (gated-gelu) is built here from a `T5Config`, saved as
safetensors, read back through `load_hf_t5`, and both models run the same
padded batch in float32: logits agree to 1e-5 relative.
"""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='the Hugging Face reference needs torch')
transformers = pytest.importorskip(
    'transformers', reason='the Hugging Face reference needs transformers 4.57.6')
safetensors_numpy = pytest.importorskip(
    'safetensors.numpy', reason='Hugging Face checkpoints are read with safetensors')

from hyperprompt_t5x.checkpoints import pretrained  # noqa: E402
from hyperprompt_t5x.model import network  # noqa: E402
from hyperprompt_t5x.checkpoints.pretrained import CheckpointError  # noqa: E402

RTOL = 1e-5


def _hf_model(seed, **kwargs):
  """A random HF T5 1.1; layer-norm gains and relpos tables made non-trivial so
  a wrong mapping of either shows in the logits."""
  fields = dict(feed_forward_proj='gated-gelu', tie_word_embeddings=False,
                dropout_rate=0.0, relative_attention_num_buckets=32,
                relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
  fields.update(kwargs)
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**fields)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'layer_norm' in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif 'relative_attention_bias' in name:
        p.copy_(2.0 * torch.randn_like(p))
  return model


def _batch(rng, batch, enc_len, dec_len, vocab):
  """Right-padded encoder inputs / decoder targets of varied lengths (token 0 = pad)."""
  enc = rng.integers(2, vocab, size=(batch, enc_len)).astype(np.int32)
  tgt = rng.integers(2, vocab, size=(batch, dec_len)).astype(np.int32)
  enc_lens = np.linspace(enc_len, max(2, enc_len // 3), batch).astype(int)
  dec_lens = np.linspace(dec_len, max(2, dec_len // 2), batch).astype(int)[::-1]
  for i in range(batch):
    enc[i, enc_lens[i]:] = 0
    tgt[i, dec_lens[i]:] = 0
    enc[i, enc_lens[i] - 1] = 1  # EOS
    tgt[i, dec_lens[i] - 1] = 1
  dec_in = np.zeros_like(tgt)
  dec_in[:, 1:] = tgt[:, :-1]  # shift right, BOS = 0
  return enc, dec_in, tgt


def _hf_logits(model, enc, dec_in, tgt):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(enc).long(),
                attention_mask=torch.from_numpy((enc > 0).astype(np.int64)),
                decoder_input_ids=torch.from_numpy(dec_in).long(),
                decoder_attention_mask=torch.from_numpy((tgt > 0).astype(np.int64)))
  return out.logits.numpy()


def _our_logits(config, params, enc, dec_in, tgt):
  apply = jax.jit(functools.partial(network.Transformer(config).apply, enable_dropout=False))
  return np.asarray(apply({'params': params}, enc, dec_in, tgt), np.float32)


def _assert_close(ours, ref, what):
  scale = float(np.max(np.abs(ref)))
  err = float(np.max(np.abs(ours - ref)))
  assert err <= RTOL * scale, f'{what}: max |diff| {err:.3g} > {RTOL} x max |ref| {scale:.3g}'


CASES = {
    # heads * head_dim (4 * 6 = 24) != emb_dim (16); more decoder than encoder layers.
    'joined_kv_ne_emb': dict(
        hf=dict(vocab_size=96, d_model=16, d_kv=6, num_heads=4, d_ff=40, num_layers=2,
                num_decoder_layers=3),
        batch=(3, 13, 9)),
    # heads * head_dim == emb_dim; inputs longer than the 128 max distance.
    'long_inputs': dict(
        hf=dict(vocab_size=64, d_model=24, d_kv=8, num_heads=3, d_ff=32, num_layers=1,
                num_decoder_layers=2),
        batch=(2, 150, 20)),
    # Tied embeddings = T5X's logits_via_embedding (both rescale by 1/sqrt(emb)).
    'tied_embeddings': dict(
        hf=dict(vocab_size=80, d_model=16, d_kv=4, num_heads=2, d_ff=24, num_layers=1,
                num_decoder_layers=1, tie_word_embeddings=True),
        batch=(2, 11, 6)),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_logits_match_hugging_face(case, tmp_path):
  spec = CASES[case]
  model = _hf_model(seed=len(case), **spec['hf'])
  model.save_pretrained(tmp_path, safe_serialization=True)
  assert (tmp_path / 'model.safetensors').is_file()

  config, params = pretrained.load_hf_t5(tmp_path, dtype=jnp.float32, method='none')
  hf = spec['hf']
  assert (config.emb_dim, config.num_heads, config.head_dim, config.mlp_dim) == (
      hf['d_model'], hf['num_heads'], hf['d_kv'], hf['d_ff'])
  assert (config.num_encoder_layers, config.num_decoder_layers) == (
      hf['num_layers'], hf['num_decoder_layers'])
  assert config.logits_via_embedding == hf.get('tie_word_embeddings', False)
  # The tree is exactly the network's backbone tree (names and shapes).
  params = pretrained.merge_backbone(network.param_shapes(config), params,
                                      source=str(tmp_path))

  enc, dec_in, tgt = _batch(np.random.default_rng(0), *spec['batch'], hf['vocab_size'])
  assert (enc == 0).any() and (tgt == 0).any()
  ref = _hf_logits(model, enc, dec_in, tgt)
  ours = _our_logits(config, params, enc, dec_in, tgt)
  assert ours.shape == ref.shape
  # Padded target rows are masked differently (T5X masks the whole row, HF only
  # keys) and never scored: compare the real positions.
  real = tgt > 0
  _assert_close(ours[real], ref[real], case)


def test_sharded_and_bfloat16_checkpoints(tmp_path):
  model = _hf_model(seed=3, **CASES['joined_kv_ne_emb']['hf'])
  model.save_pretrained(tmp_path / 'single')
  model.save_pretrained(tmp_path / 'sharded', max_shard_size='8KB')
  assert (tmp_path / 'sharded' / 'model.safetensors.index.json').is_file()
  assert not (tmp_path / 'sharded' / 'model.safetensors').exists()
  _, single = pretrained.load_hf_t5(tmp_path / 'single')
  _, sharded = pretrained.load_hf_t5(tmp_path / 'sharded')
  a, b = pretrained.flatten_params(single), pretrained.flatten_params(sharded)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)

  model.to(torch.bfloat16).save_pretrained(tmp_path / 'bf16')
  _, bf16 = pretrained.load_hf_t5(tmp_path / 'bf16')
  for name, value in pretrained.flatten_params(bf16).items():
    assert value.dtype == np.float32
    np.testing.assert_allclose(value, a[name], rtol=2 ** -8, atol=0, err_msg=name)
  q = bf16['encoder']['layers_0']['attention']['query']['kernel']
  torch_q = model.encoder.block[0].layer[0].SelfAttention.q.weight.detach().float().numpy().T
  np.testing.assert_array_equal(q, torch_q)


def test_load_pretrained_detects_hugging_face(tmp_path):
  model = _hf_model(seed=4, vocab_size=32, d_model=8, d_kv=4, num_heads=2, d_ff=16,
                    num_layers=1, num_decoder_layers=1)
  model.save_pretrained(tmp_path)
  config, params = pretrained.load_hf_t5(tmp_path, dtype=jnp.float32)
  # No fresh params given: load_pretrained initialises the model itself.
  merged = pretrained.load_pretrained(tmp_path, config)
  flat, want = pretrained.flatten_params(merged), pretrained.flatten_params(params)
  assert flat.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(np.asarray(flat[name]), want[name], err_msg=name)


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------


def test_rejects_non_gated_gelu(tmp_path):
  model = _hf_model(seed=5, vocab_size=32, d_model=8, d_kv=4, num_heads=2, d_ff=16,
                    num_layers=1, num_decoder_layers=1, feed_forward_proj='relu')
  model.save_pretrained(tmp_path)
  with pytest.raises(CheckpointError, match='gated-gelu') as e:
    pretrained.load_hf_t5(tmp_path)
  assert str(tmp_path) in str(e.value)


def test_missing_or_extra_tensor_is_named(tmp_path):
  model = _hf_model(seed=6, vocab_size=32, d_model=8, d_kv=4, num_heads=2, d_ff=16,
                    num_layers=1, num_decoder_layers=1)
  model.save_pretrained(tmp_path)
  file = str(tmp_path / 'model.safetensors')
  tensors = safetensors_numpy.load_file(file)
  gone = 'decoder.block.0.layer.1.EncDecAttention.k.weight'
  del tensors[gone]
  safetensors_numpy.save_file(tensors, file, metadata={'format': 'pt'})
  with pytest.raises(CheckpointError, match=gone.replace('.', r'\.')) as e:
    pretrained.load_hf_t5(tmp_path)
  assert str(tmp_path) in str(e.value)

  tensors[gone] = np.zeros((8, 8), np.float32)
  tensors['encoder.block.0.layer.0.adapter.weight'] = np.zeros((8, 8), np.float32)
  safetensors_numpy.save_file(tensors, file, metadata={'format': 'pt'})
  with pytest.raises(CheckpointError, match='adapter'):
    pretrained.load_hf_t5(tmp_path)


def test_config_disagreeing_with_weights(tmp_path):
  model = _hf_model(seed=7, vocab_size=32, d_model=8, d_kv=4, num_heads=2, d_ff=16,
                    num_layers=1, num_decoder_layers=1)
  model.save_pretrained(tmp_path)
  cfg = json.loads((tmp_path / 'config.json').read_text())
  cfg.update(num_heads=4, d_kv=2)  # same joined width, wrong split
  (tmp_path / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match='num_heads'):
    pretrained.load_hf_t5(tmp_path)


def test_missing_directory_and_weights(tmp_path):
  with pytest.raises(CheckpointError, match='no such'):
    pretrained.load_hf_t5(tmp_path / 'absent')
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 't5',
                                                    'feed_forward_proj': 'gated-gelu'}))
  with pytest.raises(CheckpointError, match='model.safetensors'):
    pretrained.load_hf_t5(tmp_path)
  assert not pretrained.is_hf_t5_directory(tmp_path)
  assert os.listdir(tmp_path) == ['config.json']  # nothing written


def test_vocab_size_other_than_the_models_is_one_line(tmp_path):
  """A Hugging Face directory whose config.json vocab_size is not T5Config.vocab_size."""
  model = _hf_model(seed=7, vocab_size=32, d_model=8, d_kv=4, num_heads=2, d_ff=16,
                    num_layers=1, num_decoder_layers=1)
  model.save_pretrained(tmp_path)
  config, _ = pretrained.load_hf_t5(tmp_path)
  other = dataclasses.replace(config, vocab_size=48)
  with pytest.raises(CheckpointError) as e:
    pretrained.load_pretrained(tmp_path, other)
  assert str(e.value) == (f'{tmp_path}: its config.json has vocab_size 32, the model 48 '
                          '(T5Config.vocab_size); set T5Config.vocab_size = 32 to fine-tune it')
