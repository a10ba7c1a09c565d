"""The train loop: T5X's `train` for HyperPrompt, driven by gin through the CLI.

One call to `train` builds the model, optimizer and mesh from its arguments, then
  1. resumes from the latest checkpoint in `model_dir` if there is one (T5X's rule),
     including the data position: the input pipeline is deterministic for a seed,
     so it is rebuilt and the batches already consumed are skipped;
  2. else starts from `initial_checkpoint_path` (a T5X checkpoint or a Hugging Face
     T5 directory): backbone restored by name, task conditioning freshly initialised;
  3. else starts from a fresh initialisation;
and trains to `train_steps`, saving every `save_period` steps and at the end,
evaluating every `eval_period` steps (evaluation.py), logging every `log_period`
steps (metrics_logging.py). A non-finite loss stops the run with
`TrainingDivergedError` before anything non-finite is saved.

Everything is checked before anything is written to `model_dir`: a bad config,
a mixture whose task count differs from `num_tasks`, or a checkpoint of another
model (or a corrupt one) fails with one error and leaves the directory as it was.

seqio / TensorFlow (through `hyperprompt_t5x.tasks`) are imported inside functions.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hyperprompt_t5x import metrics_logging

CONFIG_FILE = 'config.gin'
MODEL_CONFIG_FILE = 'model_config.json'
_ANNOUNCED = set()  # mixtures whose task-id mapping this process has printed


class TrainingDivergedError(FloatingPointError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """What the optimizer and the loss are built from (gin: `train.*`)."""
  optimizer: str = 'adafactor'
  learning_rate: float = 1e-3
  lr_schedule: str = 'constant'
  warmup_steps: int = 0
  freeze: str = 'all'
  weight_decay: float = 0.0
  z_loss: float = 1e-4
  label_smoothing: float = 0.0


@dataclasses.dataclass
class Run:
  """Everything a train / eval / infer loop needs, built once."""
  config: Any
  model: Any
  optimizer: Any
  schedule: Any
  mesh: Any
  rules: Any
  state: Any
  shardings: Any
  store: Any
  start_step: int
  task_names: list
  vocabulary: Any
  restored_from: str


def _is_chief() -> bool:
  return jax.process_index() == 0


def log(message: str) -> None:
  if _is_chief():
    print(message, flush=True)


def apply_xla_flags(flags: Optional[str]) -> bool:
  """Appends `flags` to $XLA_FLAGS before the backend starts; False if too late."""
  if not flags:
    return False
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  started = getattr(xla_bridge, 'backends_are_initialized', lambda: True)()
  if started:
    print(f'note: XLA flags {flags!r} not applied: the JAX backend is already running',
          file=sys.stderr)
    return False
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flags).strip()
  return True


# ----------------------------------------------------------------------------
# Validation of the arguments and the data against the model.
# ----------------------------------------------------------------------------


def _require(name: str, value: Any, kind, positive: bool = False) -> None:
  if value is None or not isinstance(value, kind) or isinstance(value, bool) and kind is int:
    raise ValueError(f'{name} must be a {getattr(kind, "__name__", kind)}, got {value!r} '
                     f'(gin macro {name.upper()})')
  if positive and value <= 0:
    raise ValueError(f'{name} must be > 0, got {value} (gin macro {name.upper()})')


def validate_feature_lengths(lengths: Any) -> dict:
  if (not isinstance(lengths, Mapping) or set(lengths) != {'inputs', 'targets'}
      or not all(isinstance(v, int) and v > 0 for v in lengths.values())):
    raise ValueError(
        "task_feature_lengths must be {'inputs': int, 'targets': int} with positive "
        f'lengths, got {lengths!r} (gin macro TASK_FEATURE_LENGTHS)')
  return dict(lengths)


def mixture_tasks(mixture_or_task_name: str, config) -> tuple[list, Any]:
  """Task names (index = task id) and the vocabulary; checks them against `config`."""
  from hyperprompt_t5x import tasks  # pylint: disable=g-import-not-at-top
  names = list(tasks.task_names(mixture_or_task_name))
  if len(names) != config.num_tasks:
    raise ValueError(
        f'mixture {mixture_or_task_name!r} has {len(names)} tasks '
        f'({", ".join(names)}) but the model has num_tasks={config.num_tasks}; '
        f'set --gin.NUM_TASKS={len(names)} (T5Config.num_tasks)')
  vocab = tasks.get_vocabulary(mixture_or_task_name)
  if vocab.vocab_size > config.vocab_size:
    raise ValueError(
        f'the vocabulary of {mixture_or_task_name!r} has {vocab.vocab_size} ids but the '
        f'model has vocab_size={config.vocab_size} (T5Config.vocab_size)')
  if mixture_or_task_name not in _ANNOUNCED:
    _ANNOUNCED.add(mixture_or_task_name)
    log(f'Tasks of {mixture_or_task_name} (task id: name): '
        + ', '.join(f'{i}: {n}' for i, n in enumerate(names)))
  return names, vocab


def _config_dict(config) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def check_model_dir_matches(model_dir: str, config) -> None:
  """A MODEL_DIR trained with another model config fails here, before any restore."""
  path = os.path.join(model_dir, MODEL_CONFIG_FILE)
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{path} is unreadable ({e}); it records the model of this '
                     'MODEL_DIR') from e
  current = _config_dict(config)
  diffs = [f'{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}'
           for k in sorted(set(saved) | set(current))
           if k not in ('dropout_rate', 'dtype', 'remat_policy', 'attention_impl')
           and saved.get(k) != current.get(k)]
  if diffs:
    raise ValueError(
        f'MODEL_DIR {model_dir} holds checkpoints of a different model: '
        + '; '.join(diffs) + '. Use a new MODEL_DIR or the matching gin config.')


# ----------------------------------------------------------------------------
# Building the model, the optimizer and the (restored) train state.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
  """What is known before any parameter exists: enough to compile the steps."""
  model: Any
  optimizer: Any
  schedule: Any
  mesh: Any
  rules: Any
  abstract_state: Any   # TrainState of ShapeDtypeStructs
  shardings: Any        # TrainState of NamedShardings


def build_run(*, model_dir: str, config, mixture_or_task_name: str,
              task_feature_lengths: Mapping[str, int], settings: OptimizerSettings,
              num_partitions: int = 1, seed: int = 0, keep_checkpoints: Optional[int] = None,
              initial_checkpoint_path: Optional[str] = None,
              checkpoint_step: Optional[int] = None, require_checkpoint: bool = False,
              store=None, on_plan=None) -> Run:
  """Model, optimizer, mesh and a train state (restored or initialised).

  Restoring needs no initialisation (the restore target is abstract). Writes
  nothing: a checkpoint that does not fit fails here. `on_plan(plan)` is called
  once the shapes and shardings are known, before the (slow) initialisation.
  """
  from hyperprompt_t5x import models, optim, partitioning, train_state  # pylint: disable=g-import-not-at-top
  partitioning.maybe_initialize_distributed()
  names, vocab = mixture_tasks(mixture_or_task_name, config)
  inputs_len, targets_len = task_feature_lengths['inputs'], task_feature_lengths['targets']
  mesh = partitioning.make_mesh(num_partitions)
  rules = partitioning.standard_logical_axis_rules()
  model = models.EncoderDecoderModel(
      config, z_loss=settings.z_loss, label_smoothing=settings.label_smoothing)
  schedule = optim.make_schedule(settings.lr_schedule, settings.learning_rate,
                                 settings.warmup_steps)
  abstract_params = model.init_abstract(1, inputs_len, targets_len)['params']
  optimizer = optim.make_optimizer(settings.optimizer, schedule, params=abstract_params,
                                   freeze=settings.freeze,
                                   weight_decay=settings.weight_decay)
  abstract_state, shardings = train_state.state_shardings_for(
      model, optimizer, mesh, rules, inputs_len, targets_len)
  if store is None:
    store = train_state.CheckpointStore(model_dir, keep=keep_checkpoints)
  step = checkpoint_step if checkpoint_step is not None else store.latest_step()
  if step is None and require_checkpoint:
    raise FileNotFoundError(f'no checkpoint in MODEL_DIR {model_dir}')
  if step is not None:
    check_model_dir_matches(model_dir, config)
  if on_plan is not None:
    on_plan(Plan(model, optimizer, schedule, mesh, rules, abstract_state, shardings))
  rng = jax.random.PRNGKey(seed)
  if step is not None:
    state, extra = store.restore(
        step, train_state.abstract_with_shardings(abstract_state, shardings))
    restored_from = f'{model_dir}/checkpoint_{step}'
    if extra.get('fingerprint') not in (None, train_state.config_fingerprint(config)):
      raise ValueError(f'{model_dir}/checkpoint_{step} was written for a different model '
                       'config (fingerprint mismatch); use a new MODEL_DIR')
  else:
    state, shardings = train_state.create_train_state(
        model, optimizer, rng, mesh, rules, inputs_len, targets_len)
    restored_from = 'fresh initialisation'
    if initial_checkpoint_path:
      from hyperprompt_t5x import checkpoints  # pylint: disable=g-import-not-at-top
      # Only the (small, replicated) conditioning leaves come to the host; the
      # backbone's shapes and dtypes are all the merge needs from the fresh tree.
      fresh = {k: (jax.device_get(v) if k == checkpoints.CONDITIONING_KEY
                   else abstract_state.params[k]) for k, v in state.params.items()}
      params = checkpoints.load_pretrained(str(initial_checkpoint_path), config,
                                           fresh_params=fresh)
      state, shardings = train_state.create_train_state(
          model, optimizer, rng, mesh, rules, inputs_len, targets_len, initial_params=params)
      restored_from = f'backbone of {initial_checkpoint_path} (task conditioning fresh)'
  start = int(jax.device_get(state.step))
  return Run(config=config, model=model, optimizer=optimizer, schedule=schedule, mesh=mesh,
             rules=rules, state=state, shardings=shardings, store=store, start_step=start,
             task_names=names, vocabulary=vocab, restored_from=restored_from)


# ----------------------------------------------------------------------------
# Files in MODEL_DIR.
# ----------------------------------------------------------------------------


def save_config_files(model_dir: str, config, config_str: Optional[str], step: int) -> None:
  """model_config.json once; config.gin once, a differing later config as config_<step>.gin."""
  if not _is_chief():
    return
  os.makedirs(model_dir, exist_ok=True)
  model_path = os.path.join(model_dir, MODEL_CONFIG_FILE)
  if not os.path.exists(model_path):
    with open(model_path, 'w') as f:
      json.dump(_config_dict(config), f, indent=2, sort_keys=True)
  if config_str is None:
    return
  path = os.path.join(model_dir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == config_str:
        return
    path = os.path.join(model_dir, f'config_{step}.gin')
    n = 1
    while os.path.exists(path):
      path = os.path.join(model_dir, f'config_{step}.{n}.gin')
      n += 1
    log(f'gin config differs from {CONFIG_FILE}: this run\'s config is saved as {path}')
  with open(path, 'w') as f:
    f.write(config_str)


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------


def train_batches(mixture_or_task_name: str, task_feature_lengths, batch_size: int,
                  seed: int, skip: int, shuffle: bool = True) -> Iterator[dict]:
  """This process's batches of the (deterministic, repeated) training stream.

  The first `skip` batches (already trained on before a restart) are dropped,
  so a resumed run sees exactly the batches an uninterrupted one would.
  """
  from hyperprompt_t5x import tasks  # pylint: disable=g-import-not-at-top
  num_shards = jax.process_count()
  if batch_size % num_shards:
    raise ValueError(f'BATCH_SIZE {batch_size} is not divisible by the '
                     f'{num_shards} processes')
  ds = tasks.get_dataset(
      mixture_or_task_name, split='train', task_feature_lengths=task_feature_lengths,
      batch_size=batch_size // num_shards, shuffle=shuffle, seed=seed,
      shard_id=jax.process_index(), num_shards=num_shards, num_epochs=None)
  if skip and hasattr(ds, 'skip'):  # tf.data: skip without materialising.
    ds = ds.skip(skip)
    skip = 0
  it = ds.as_numpy_iterator() if hasattr(ds, 'as_numpy_iterator') else iter(ds)
  return itertools.islice(it, skip, None)


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


def train(*,
          model_dir: str,
          model_config,
          mixture_or_task_name: str,
          task_feature_lengths: Mapping[str, int],
          train_steps: int,
          batch_size: int,
          initial_checkpoint_path: Optional[str] = None,
          save_period: int = 1000,
          keep_checkpoints: Optional[int] = None,
          eval_period: int = 0,
          eval_split: str = 'validation',
          eval_batch_size: Optional[int] = None,
          eval_max_examples: Optional[int] = None,
          log_period: int = 100,
          optimizer: str = 'adafactor',
          learning_rate: float = 1e-3,
          lr_schedule: str = 'constant',
          warmup_steps: int = 0,
          freeze: str = 'all',
          weight_decay: float = 0.0,
          z_loss: float = 1e-4,
          label_smoothing: float = 0.0,
          num_partitions: int = 1,
          seed: int = 0,
          shuffle: bool = True,
          tensorboard: bool = True,
          use_hardware_rng: bool = False,
          xla_flags: Optional[str] = None,
          config_str: Optional[str] = None) -> dict:
  """Trains (or resumes training) to `train_steps`; returns a summary dict.

  Args mirror T5X's macros: model_dir (MODEL_DIR), mixture_or_task_name
  (MIXTURE_OR_TASK_NAME), task_feature_lengths (TASK_FEATURE_LENGTHS), train_steps
  (TRAIN_STEPS: fine-tuning steps, counted from 0), batch_size (BATCH_SIZE, global),
  initial_checkpoint_path (INITIAL_CHECKPOINT_PATH), save_period (SAVE_PERIOD),
  eval_period (EVAL_PERIOD; 0 = evaluate only at the end, None = never),
  num_partitions (NUM_PARTITIONS, the 'model' mesh axis). `config_str` is the
  operative gin config, saved as MODEL_DIR/config.gin. use_hardware_rng
  (USE_HARDWARE_RNG, as T5X) switches JAX to the `unsafe_rbg` PRNG: much faster
  to compile and run, different random numbers than the default threefry.
  xla_flags (XLA_FLAGS) are added to the XLA_FLAGS environment variable if JAX
  has not started its backend yet (a fresh CLI process), else ignored with a note.
  """
  apply_xla_flags(xla_flags)
  _require('model_dir', model_dir, str)
  _require('mixture_or_task_name', mixture_or_task_name, str)
  _require('train_steps', train_steps, int, positive=True)
  _require('batch_size', batch_size, int, positive=True)
  _require('save_period', save_period, int, positive=True)
  _require('log_period', log_period, int, positive=True)
  lengths = validate_feature_lengths(task_feature_lengths)
  settings = OptimizerSettings(optimizer, float(learning_rate), lr_schedule, warmup_steps,
                               freeze, float(weight_decay), float(z_loss),
                               float(label_smoothing))
  t0 = time.perf_counter()
  previous_prng = jax.config.jax_default_prng_impl
  if use_hardware_rng:
    jax.config.update('jax_default_prng_impl', 'unsafe_rbg')
  try:
    return _train(**locals())
  finally:
    jax.config.update('jax_default_prng_impl', previous_prng)


def _train(*, model_dir, model_config, mixture_or_task_name, train_steps, batch_size,
           initial_checkpoint_path, save_period, keep_checkpoints, eval_period, eval_split,
           eval_batch_size, eval_max_examples, log_period, num_partitions, seed, shuffle,
           tensorboard, config_str, lengths, settings, t0, **unused) -> dict:
  """The body of `train` (arguments validated)."""
  from hyperprompt_t5x import evaluation, network, partitioning, train_state  # pylint: disable=g-import-not-at-top
  partitioning.maybe_initialize_distributed()
  mixture_tasks(mixture_or_task_name, model_config)
  store = train_state.CheckpointStore(model_dir, keep=keep_checkpoints)
  resume_step = store.latest_step()
  eval_batch_size = eval_batch_size or batch_size

  def prepare_data():
    """The input pipelines, built while the main thread sets up the model."""
    batches = train_batches(mixture_or_task_name, lengths, batch_size, seed,
                            skip=resume_step or 0, shuffle=shuffle)
    first = next(batches)
    sets = None
    if eval_period is not None:
      sets = evaluation.eval_sets(mixture_or_task_name, eval_split, lengths,
                                  eval_batch_size, eval_max_examples)
    return first, itertools.chain([first], batches), sets

  rng = jax.random.PRNGKey(seed)  # dropout key: fold_in(rng, step) inside the step
  compiled = {}

  def precompile(plan: Plan, step_fn) -> None:
    """Compiles the train step (AOT fills jit's cache) beside the initialisation.

    The batch is described from the feature lengths (the data's features are all
    int32); if the real batch differs, the first step simply compiles again.
    """
    sharding = partitioning.batch_sharding(plan.mesh)
    shapes = {'encoder_input_tokens': (batch_size, lengths['inputs']),
              'decoder_target_tokens': (batch_size, lengths['targets']),
              'decoder_input_tokens': (batch_size, lengths['targets']),
              'decoder_loss_weights': (batch_size, lengths['targets']),
              'task_ids': (batch_size,)}
    batch = {k: jax.ShapeDtypeStruct(v, jnp.int32, sharding=sharding)
             for k, v in shapes.items()}
    state = train_state.abstract_with_shardings(plan.abstract_state, plan.shardings)
    step_fn.jitted.lower(state, batch, rng).compile()

  def on_plan(plan: Plan) -> None:
    step_fn = train_state.make_train_step(plan.model, plan.optimizer, plan.mesh,
                                          plan.shardings, freeze=settings.freeze,
                                          schedule=plan.schedule)
    compiled['step_fn'] = step_fn
    if hasattr(step_fn, 'jitted'):
      compiled['future'] = pool.submit(precompile, plan, step_fn)

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    data_future = pool.submit(prepare_data)
    try:
      run = build_run(model_dir=model_dir, config=model_config,
                      mixture_or_task_name=mixture_or_task_name, task_feature_lengths=lengths,
                      settings=settings, num_partitions=num_partitions, seed=seed,
                      store=store, initial_checkpoint_path=initial_checkpoint_path,
                      on_plan=on_plan)
    except BaseException:  # the set-up error wins over anything the threads raise
      concurrent.futures.wait([data_future] + [compiled[k] for k in ('future',) if k in compiled])
      raise
    else:
      _, batches, eval_data = data_future.result()
      if 'future' in compiled:
        try:
          compiled['future'].result()
        except Exception as e:  # pylint: disable=broad-except
          log(f'note: ahead-of-time compilation of the train step failed ({e}); '
              'it compiles on the first step instead')
  step_fn = compiled['step_fn']
  start = run.start_step
  if start != (resume_step or 0):
    raise ValueError(f'{model_dir}/checkpoint_{resume_step} holds step {start}; '
                     'the checkpoint directory name and its contents disagree')
  log(f'Starting at step {start} from {run.restored_from}')
  evaluator = None
  if eval_period is not None:
    evaluator = evaluation.Evaluator(
        run, mixture_or_task_name, lengths, split=eval_split, batch_size=eval_batch_size,
        max_examples=eval_max_examples, model_dir=model_dir, sets=eval_data)
  # Nothing has been written so far; from here on MODEL_DIR is ours.
  save_config_files(model_dir, model_config, config_str, start)
  logger = metrics_logging.MetricsLogger(model_dir, tensorboard=tensorboard,
                                         is_chief=_is_chief())
  fingerprint = train_state.config_fingerprint(model_config)
  all_finite = jax.jit(lambda params: jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(params)])))
  state = run.state
  tokens_per_step = batch_size * (lengths['inputs'] + lengths['targets'])
  throughput = metrics_logging.Throughput(start)
  pending: list = []  # (step, metrics) on device since the last check
  last_good_ckpt = run.store.latest_step()
  summary = {'model_dir': model_dir, 'start_step': start, 'final_step': start}
  seconds_to_first_step = None

  def check_and_log(step: int) -> None:
    """Fetches pending losses; raises on NaN/inf; writes the log line for `step`."""
    nonlocal pending
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      loss = float(np.asarray(m['loss']))
      if not math.isfinite(loss):
        where = (f'checkpoint_{last_good_ckpt} in {model_dir}' if last_good_ckpt is not None
                 else 'none saved yet')
        raise TrainingDivergedError(
            f'loss is {loss} at step {s + 1}: training stopped; last good checkpoint: '
            f'{where}. Lower LEARNING_RATE or check the data.')
    steps_per_sec, tokens_per_sec = throughput.rates(step, tokens_per_step)
    window = {k: float(np.mean([np.asarray(m[k]) for m in fetched]))
              for k in fetched[-1] if np.ndim(fetched[-1][k]) == 0}
    lr = window.get('learning_rate', float(run.schedule(step - 1)))
    record = dict(window, learning_rate=lr, steps_per_sec=steps_per_sec,
                  tokens_per_sec=tokens_per_sec)
    logger.write(step, record)
    logger.progress(step, train_steps, window['loss'], lr, steps_per_sec, tokens_per_sec)
    summary['loss'] = window['loss']
    pending = []

  try:
    for step in range(start, train_steps):
      batch = next(batches)
      network.check_task_ids(batch['task_ids'], model_config.num_tasks)
      state, metrics = step_fn(state, partitioning.shard_batch(batch, run.mesh), rng)
      pending.append((step, metrics))
      done = step + 1
      if seconds_to_first_step is None:
        jax.block_until_ready(metrics)
        seconds_to_first_step = time.perf_counter() - t0
      is_last = done == train_steps
      if done % log_period == 0 or done % save_period == 0 or is_last or (
          eval_period and done % eval_period == 0):
        check_and_log(done)
      if done % save_period == 0 or is_last:
        if not bool(all_finite(state.params)):
          raise TrainingDivergedError(
              f'parameters became NaN/inf at step {done}: training stopped before saving; '
              f'last good checkpoint: checkpoint_{last_good_ckpt} in {model_dir}. '
              'Lower LEARNING_RATE or check the data.')
        run.store.save(done, state, {'data_batches': done, 'batch_size': batch_size,
                                     'fingerprint': fingerprint})
        last_good_ckpt = done
      if evaluator is not None and (
          (eval_period and done % eval_period == 0) or is_last):
        evaluator.run(state.params, done, logger)
    if start >= train_steps:
      log(f'Nothing to do: MODEL_DIR is already at step {start} >= TRAIN_STEPS {train_steps}')
  finally:
    if hasattr(run.store, 'wait'):
      run.store.wait()
    logger.close()
  summary['final_step'] = max(start, train_steps)
  summary['seconds'] = time.perf_counter() - t0
  summary['seconds_to_first_step'] = seconds_to_first_step
  if evaluator is not None and evaluator.last is not None:
    summary['eval'] = evaluator.last
    if _is_chief():
      print(evaluation.format_table(evaluator.last, evaluator.best), flush=True)
  first = (f', first step after {seconds_to_first_step:.1f} s'
           if seconds_to_first_step is not None else '')
  log(f'Done: step {summary["final_step"]} in {summary["seconds"]:.1f} s{first}; '
      f'checkpoints and metrics in {model_dir}')
  return summary
