"""What XLA says about the compiled train step: FLOPs and memory, without running it.

    from bench import step_analysis, train_step
    report = step_analysis.analyze(train_step.BenchConfig(size='base', method='global'))

Builds the trainer's own step (`train_state.make_train_step`) against an
*abstract* train state (`jax.ShapeDtypeStruct`s with the real shardings: no
parameter is initialised), lowers and compiles it for `mesh` and reads

* `cost_analysis()['flops']`: the FLOPs XLA counts in the compiled step
  (per device under SPMD; `xla_flops` here is the sum over devices), set
  against the model-FLOP formula of `bench/flops.py`: the ratio shows
  recomputation (remat), waste (float32 copies, repeated work) and what the
  formula leaves out (softmax, norms, optimizer: ~1-3 %);
* `memory_analysis()`, per device: arguments (train state + batch), outputs,
  aliased bytes (the donated state), temporaries (activations kept for the
  backward pass, gradients, workspace) and generated code. Peak =
  arguments + outputs - aliased + temporaries (XLA's buffer assignment: an
  upper bound on what the allocator holds at once);
* the train state's bytes per device split into parameters and optimizer
  state, from the shardings (the shard shapes), so memory_plan.py can add them.

Imports JAX, Flax, optax and the project's model/step modules only; the bench
configuration's model, optimizer and formula FLOPs are built here (train_step.py,
memory_plan.py use them).
"""
import time
from typing import Any, Dict, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from bench import flops as flops_lib
from hyperprompt_t5x import optim, partitioning
from hyperprompt_t5x.model import models, network
from hyperprompt_t5x.run import train_state


def model_config(cfg):
  """The network's T5Config for one bench configuration."""
  overrides = dict(method=cfg.method, num_tasks=cfg.num_tasks, dtype=cfg.dtype,
                   dropout_rate=cfg.dropout_rate, attention_impl=cfg.attention_impl,
                   remat_policy=cfg.remat_policy)
  if cfg.attention_dropout_rate is not None:
    overrides['attention_dropout_rate'] = cfg.attention_dropout_rate
  if cfg.embedding_lookup is not None:
    overrides['embedding_lookup'] = cfg.embedding_lookup
  if cfg.prompt_length is not None:
    overrides['prompt_length'] = cfg.prompt_length
  if cfg.num_layers is not None:
    overrides.update(num_encoder_layers=cfg.num_layers, num_decoder_layers=cfg.num_layers)
  if cfg.vocab_size is not None:
    overrides['vocab_size'] = cfg.vocab_size
  return network.T5Config.from_size(cfg.size, **overrides)


def formula_flops(cfg, config) -> int:
  """Model FLOPs of one train step by bench/flops.py (frozen weights: no weight gradients)."""
  return flops_lib.method_train_flops(
      flops_lib.Dims.from_config(config), cfg.method, batch=cfg.batch,
      inputs_len=cfg.inputs_len, targets_len=cfg.targets_len,
      prompt_length=int(getattr(config, 'prompt_length', 0) or 0),
      backbone_trained=(cfg.freeze == 'all'),
      prompt_encoder=bool(getattr(config, 'prompt_encoder', True)),
      prompt_decoder=bool(getattr(config, 'prompt_decoder', True)))['total']


def model_and_optimizer(cfg):
  """(config, model, optimizer, logical rules), built as the trainer builds them."""
  config = model_config(cfg)
  model = models.EncoderDecoderModel(config)
  schedule = optim.make_schedule('constant', cfg.learning_rate)
  abstract_params = flax.core.unfreeze(
      model.init_abstract(1, cfg.inputs_len, cfg.targets_len)['params'])
  optimizer = optim.make_optimizer(
      cfg.optimizer, schedule, params=abstract_params, freeze=cfg.freeze,
      param_axes=model.logical_axes(cfg.inputs_len, cfg.targets_len),
      weight_decay=cfg.weight_decay)
  return config, model, optimizer, partitioning.standard_logical_axis_rules()


def _shard_bytes(tree, shardings) -> int:
  """Bytes of one device's shards of `tree` (ShapeDtypeStructs) under `shardings`."""
  total = 0
  for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
    total += int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
  return total


def build_abstract(cfg, mesh, activation_rules=None):
  """(model config, abstract sharded state, abstract batch, key, step) for BenchConfig `cfg`."""

  config, model, optimizer, rules = model_and_optimizer(cfg)
  abstract, shardings = train_state.state_shardings_for(
      model, optimizer, mesh, rules, cfg.inputs_len, cfg.targets_len)
  state = train_state.abstract_with_shardings(abstract, shardings)
  step = train_state.make_train_step(model, optimizer, mesh, shardings, freeze=cfg.freeze,
                                     activation_rules=activation_rules)
  data = partitioning.batch_sharding(mesh)
  b, li, lt = cfg.batch, cfg.inputs_len, cfg.targets_len
  batch = {
      'encoder_input_tokens': jax.ShapeDtypeStruct((b, li), jnp.int32, sharding=data),
      'decoder_target_tokens': jax.ShapeDtypeStruct((b, lt), jnp.int32, sharding=data),
      'decoder_input_tokens': jax.ShapeDtypeStruct((b, lt), jnp.int32, sharding=data),
      'decoder_loss_weights': jax.ShapeDtypeStruct((b, lt), jnp.float32, sharding=data),
      'task_ids': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data),
  }
  raw_key = jax.eval_shape(lambda: jax.random.PRNGKey(0))  # shape per jax_default_prng_impl
  key = jax.ShapeDtypeStruct(raw_key.shape, raw_key.dtype, sharding=partitioning.replicated(mesh))
  return config, (state, shardings), batch, key, step


def compiled_report(compiled, num_devices: int) -> Dict[str, Any]:
  """FLOPs (summed over devices) and per-device memory of a compiled step."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else {}
  mem = compiled.memory_analysis()
  out = {'xla_flops': float(cost.get('flops', float('nan'))) * num_devices}
  if mem is not None:
    arg, res = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    out.update(argument_bytes=arg, output_bytes=res, alias_bytes=alias, temp_bytes=temp,
               generated_code_bytes=int(mem.generated_code_size_in_bytes),
               compiled_peak_bytes=arg + res - alias + temp)
  return out


def state_bytes(cfg, mesh) -> Dict[str, int]:
  """Parameter and optimizer-state bytes per device on `mesh` (no compile, no init)."""
  _, (state, shardings), _, _, _ = build_abstract(cfg, mesh)
  return {'param_bytes_per_device': _shard_bytes(state.params, shardings.params),
          'opt_state_bytes_per_device': _shard_bytes(state.opt_state, shardings.opt_state)}


def analyze(cfg, mesh=None, activation_rules=None) -> Dict[str, Any]:
  """Compiles the train step of BenchConfig `cfg` on `mesh` (default: all devices, data
  parallel) from abstract inputs; returns FLOPs, memory and the formula's FLOPs."""
  mesh = partitioning.make_mesh(1) if mesh is None else mesh
  config, (state, shardings), batch, key, step = build_abstract(cfg, mesh, activation_rules)
  t0 = time.perf_counter()
  compiled = step.jitted.lower(state, batch, key).compile()
  report = compiled_report(compiled, mesh.size)
  report['compile_s'] = time.perf_counter() - t0
  report['param_bytes_per_device'] = _shard_bytes(state.params, shardings.params)
  report['opt_state_bytes_per_device'] = _shard_bytes(state.opt_state, shardings.opt_state)
  model_flops = formula_flops(cfg, config)
  report['model_flops_per_step'] = model_flops
  report['xla_flops_ratio'] = report['xla_flops'] / model_flops
  return report


def format_bytes(n: Optional[float]) -> str:
  return '' if n is None else f'{n / 2**30:.2f} GiB'
