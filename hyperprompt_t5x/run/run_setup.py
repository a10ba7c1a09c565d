"""Setting up a run: checking the arguments, then model, optimizer, mesh and train state.

`build_run` sets up training. It resumes from the
latest checkpoint in MODEL_DIR if there is one (T5X's rule), else starts from
INITIAL_CHECKPOINT_PATH (a T5X checkpoint or a Hugging Face T5 directory:
backbone restored by name, task conditioning freshly initialised), else from a
fresh initialisation. It writes nothing: a bad config, a mixture whose task count
differs from `num_tasks`, or a checkpoint of another model fails here with one
error and leaves MODEL_DIR as it was.

`restore_for_inference` sets up eval, infer, analyze and `hyperprompt_t5x.load`: the
model, the mesh and a checkpoint's parameters, with no optimizer and no train state.

seqio / TensorFlow (through `hyperprompt_t5x.tasks`) are imported inside functions
(the boundary of docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Mapping, Optional

import flax
import jax
import numpy as np

from hyperprompt_t5x import optim, partitioning
from hyperprompt_t5x.checkpoints import pretrained, step_dirs
from hyperprompt_t5x.checkpoints.errors import CheckpointMismatchError
from hyperprompt_t5x.checkpoints.store import CheckpointStore
from hyperprompt_t5x.model import models, network
from hyperprompt_t5x.run import model_dir_files, train_state
from hyperprompt_t5x.run.metrics_logging import log

_ANNOUNCED = set()  # mixtures whose task-id mapping this process has printed


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
  # Fine-tuning from INITIAL_CHECKPOINT_PATH: take its Adafactor state and step
  # too (T5X's finetune.gin does), or start the optimizer fresh.
  restore_optimizer_state: bool = True

  def __post_init__(self):  # gin may give ints where floats are meant (LEARNING_RATE = 1)
    for name in ('learning_rate', 'weight_decay', 'z_loss', 'label_smoothing'):
      object.__setattr__(self, name, float(getattr(self, name)))
    object.__setattr__(self, 'restore_optimizer_state', bool(self.restore_optimizer_state))


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


  @property
  def param_shardings(self):
    return self.shardings.params


@dataclasses.dataclass
class Restored:
  """A checkpoint's parameters ready for decoding and scoring (no optimizer state)."""
  config: Any
  model: Any
  mesh: Any
  params: Any
  param_shardings: Any
  store: Any
  start_step: int
  task_names: list
  vocabulary: Any
  restored_from: str


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


def require(name: str, value: Any, kind, positive: bool = False) -> None:
  """`value` (gin macro NAME) is a `kind` (and > 0 when `positive`), else ValueError."""
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


class VocabularySizeError(ValueError):
  """The vocabulary has more ids than the model has embedding rows."""


def check_vocabulary_fits(vocab_size: int, model_vocab_size: int, what: str) -> None:
  """More embedding rows than ids is fine (T5: 32128 for 32100); fewer is refused."""
  if vocab_size > model_vocab_size:
    raise VocabularySizeError(
        f'the vocabulary of {what} has {vocab_size} ids but the model has '
        f'{model_vocab_size} embedding rows (T5Config.vocab_size = {model_vocab_size}); '
        f'set T5Config.vocab_size >= {vocab_size} or use a smaller vocabulary')


def select_vocabulary(model_dir: str, mixture_or_task_name: str) -> None:
  """A MODEL_DIR that records its vocabulary (model_dir_files.VOCABULARY_FILE) is
  tokenised with it, HYPERPROMPT_VOCABULARY unset; set to another, one error says so."""
  record = model_dir_files.read_vocabulary(model_dir)
  if record is None or record.get('kind') not in ('sentencepiece', 'byte'):
    return  # a run from before the record, or a T5X run (its gin names it)
  from hyperprompt_t5x import tasks  # pylint: disable=g-import-not-at-top
  from hyperprompt_t5x.tasks import vocab  # pylint: disable=g-import-not-at-top
  if not tasks.shares_vocabulary(mixture_or_task_name):
    return  # the demo mixtures' own byte vocabulary
  given = os.environ.get(vocab.VOCABULARY_ENV)
  if given:
    current = vocab.describe(vocab.make_vocabulary(None))
    if not vocab.same(current, record):
      raise ValueError(
          f'{vocab.VOCABULARY_ENV}={given} is {vocab.spoken(current)}, but MODEL_DIR '
          f'{model_dir} was trained with {vocab.spoken(record)} (its '
          f'{model_dir_files.VOCABULARY_FILE}); unset {vocab.VOCABULARY_ENV} to use the run\'s own')
  if record['kind'] == 'byte':
    tasks.set_vocabulary('byte')
  else:
    tasks.set_vocabulary(record['file'], record['extra_ids'])


def mixture_tasks(mixture_or_task_name: str, config,
                  announce: bool = True) -> tuple[list, Any]:
  """Task names (index = task id) and the vocabulary; checks them against `config`.

  The first call for a mixture prints its task ids (`announce=False`: the caller
  prints them itself).
  """
  from hyperprompt_t5x import quiet_tensorflow  # pylint: disable=g-import-not-at-top
  quiet_tensorflow.import_tensorflow()
  from hyperprompt_t5x import tasks  # pylint: disable=g-import-not-at-top
  names = list(tasks.task_names(mixture_or_task_name))
  if len(names) != config.num_tasks:
    raise ValueError(
        f'mixture {mixture_or_task_name!r} has {len(names)} tasks '
        f'({", ".join(names)}) but the model has num_tasks={config.num_tasks}; '
        f'set --gin.NUM_TASKS={len(names)} (T5Config.num_tasks)')
  vocab = tasks.get_vocabulary(mixture_or_task_name)
  check_vocabulary_fits(vocab.vocab_size, config.vocab_size, repr(mixture_or_task_name))
  if mixture_or_task_name not in _ANNOUNCED:
    _ANNOUNCED.add(mixture_or_task_name)
    if announce:
      log(f'Tasks of {mixture_or_task_name} (task id: name): '
          + ', '.join(f'{i}: {n}' for i, n in enumerate(names)))
  return names, vocab


# ----------------------------------------------------------------------------
# Building the model, the optimizer and the (restored) train state.
# ----------------------------------------------------------------------------


def restore_optimizer_state(state, shardings, path: str, enabled: bool):
  """`state` with the Adafactor state and step of checkpoint `path`, if it has one.

  As T5X fine-tunes: the backbone's slots (v_row / v_col / v) and the Adafactor
  step (which sets its second-moment decay) come from the checkpoint; the task
  conditioning's start fresh; TrainState.step (TRAIN_STEPS, checkpoint numbers,
  the learning-rate schedule) still counts fine-tuning steps from 0. Prints
  one line saying what happened.
  """
  switch = 'RESTORE_OPTIMIZER_STATE'
  if optim.find_adafactor_state(state.opt_state) is None:
    log(f'Optimizer state: fresh (the optimizer is not Adafactor; {path} is read for its '
        'weights only)')
    return state
  if not enabled:
    log(f'Optimizer state: fresh ({switch} = False; {path} gives the weights only)')
    return state
  saved = pretrained.load_optimizer_state(path)
  if saved is None:
    log(f'Optimizer state: fresh ({path} holds no Adafactor state)')
    return state
  opt_state, restored, fresh = optim.restore_adafactor_state(
      state.opt_state, saved.step, saved.param_states, source=path)
  if not restored:
    log(f'Optimizer state: fresh ({path} holds Adafactor state for none of the backbone '
        'parameters that train)')
    return state
  # Restored slots are host arrays: place them as the fresh state's leaves are.
  opt_state = jax.tree_util.tree_map(
      lambda x, s: train_state.place(x, s, x.dtype) if isinstance(x, np.ndarray) else x,
      opt_state, shardings.opt_state)
  log(f'Optimizer state: Adafactor state and step {saved.step} restored from {path} for '
      f'{len(restored)} parameters, fresh for {len(fresh)} (task conditioning); '
      f'{switch} = False starts it fresh')
  return state.replace(opt_state=opt_state)


def build_run(*, model_dir: str, config, mixture_or_task_name: str,
              task_feature_lengths: Mapping[str, int], settings: OptimizerSettings,
              num_partitions: int = 1, seed: int = 0, keep_checkpoints: Optional[int] = None,
              initial_checkpoint_path: Optional[str] = None,
              store=None, on_plan=None) -> Run:
  """Model, optimizer, mesh and a train state (restored or initialised).

  Restoring needs no initialisation (the restore target is abstract). Writes
  nothing: a checkpoint that does not fit fails here. `on_plan(plan)` is called
  once the shapes and shardings are known, before the (slow) initialisation.
  """
  partitioning.maybe_initialize_distributed()
  select_vocabulary(model_dir, mixture_or_task_name)
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
                                   param_axes=model.logical_axes(inputs_len, targets_len),
                                   freeze=settings.freeze,
                                   weight_decay=settings.weight_decay)
  abstract_state, shardings = train_state.state_shardings_for(
      model, optimizer, mesh, rules, inputs_len, targets_len)
  if store is None:
    store = CheckpointStore(model_dir, keep=keep_checkpoints)
  step = store.latest_step()
  if step is not None:
    model_dir_files.check_model_dir_matches(model_dir, config)
  if on_plan is not None:
    on_plan(Plan(model, optimizer, schedule, mesh, rules, abstract_state, shardings))
  rng = jax.random.PRNGKey(seed)
  if step is not None:
    state, extra = store.restore(
        step, train_state.abstract_with_shardings(abstract_state, shardings))
    restored_from = step_dirs.path(model_dir, step)
    if extra.get('fingerprint') not in (None, model_dir_files.config_fingerprint(config)):
      raise CheckpointMismatchError(f'{restored_from} was written for a different model '
                                    'config (fingerprint mismatch); use a new MODEL_DIR')
  else:
    state, shardings = train_state.create_train_state(
        model, optimizer, rng, mesh, rules, inputs_len, targets_len)
    restored_from = 'fresh initialisation'
    if initial_checkpoint_path:
      # Only the (small, replicated) conditioning leaves come to the host; the
      # backbone's shapes and dtypes are all the merge needs from the fresh tree.
      fresh = {k: (jax.device_get(v) if k == network.CONDITIONING_KEY
                   else abstract_state.params[k]) for k, v in state.params.items()}
      params = pretrained.load_pretrained(str(initial_checkpoint_path), config,
                                           fresh_params=fresh)
      state, shardings = train_state.create_train_state(
          model, optimizer, rng, mesh, rules, inputs_len, targets_len, initial_params=params)
      restored_from = f'backbone of {initial_checkpoint_path} (task conditioning fresh)'
      state = restore_optimizer_state(state, shardings, str(initial_checkpoint_path),
                                      settings.restore_optimizer_state)
  start = int(jax.device_get(state.step))
  return Run(config=config, model=model, optimizer=optimizer, schedule=schedule, mesh=mesh,
             rules=rules, state=state, shardings=shardings, store=store, start_step=start,
             task_names=names, vocabulary=vocab, restored_from=restored_from)


def restore_for_inference(*, model_dir: str, config, mixture_or_task_name: str,
                          task_feature_lengths: Mapping[str, int], store,
                          num_partitions: int = 1,
                          checkpoint_step: Optional[int] = None) -> Restored:
  """Model, mesh and the parameters of checkpoint `checkpoint_step` (default: the newest).

  `store`: the run's CheckpointStore, or a T5XCheckpointStore for a T5X-written
  MODEL_DIR (anything with `latest_step` and `restore_params`). Writes nothing.
  """
  partitioning.maybe_initialize_distributed()
  select_vocabulary(model_dir, mixture_or_task_name)
  names, vocab = mixture_tasks(mixture_or_task_name, config)
  inputs_len, targets_len = task_feature_lengths['inputs'], task_feature_lengths['targets']
  mesh = partitioning.make_mesh(num_partitions)
  model = models.EncoderDecoderModel(config)
  abstract = flax.core.unfreeze(model.init_abstract(1, inputs_len, targets_len)['params'])
  shardings = partitioning.logical_to_mesh_sharding(
      model.logical_axes(inputs_len, targets_len), mesh,
      partitioning.standard_logical_axis_rules(), abstract)
  step = checkpoint_step if checkpoint_step is not None else store.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in MODEL_DIR {model_dir}')
  model_dir_files.check_model_dir_matches(model_dir, config)
  params, extra = store.restore_params(step, train_state.abstract_with_shardings(
      abstract, shardings))
  restored_from = step_dirs.path(model_dir, step)
  if extra.get('fingerprint') not in (None, model_dir_files.config_fingerprint(config)):
    raise CheckpointMismatchError(f'{restored_from} was written for a different model '
                                  'config (fingerprint mismatch)')
  return Restored(config=config, model=model, mesh=mesh, params=params,
                  param_shardings=shardings, store=store, start_step=int(step),
                  task_names=names, vocabulary=vocab, restored_from=restored_from)
