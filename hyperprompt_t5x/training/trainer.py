"""The train loop: T5X's `train` for HyperPrompt, driven by gin through the CLI.

One call to `train`
  1. sets up the run (run_setup.py): model, optimizer, mesh and the train state,
     resumed from MODEL_DIR's latest checkpoint, else from INITIAL_CHECKPOINT_PATH,
     else freshly initialised; meanwhile the input pipelines are built
     (train_data.py) and the train step is compiled (step_compilation.py);
  2. trains to `train_steps`: every `log_period` steps the metrics are fetched,
     checked (divergence.py) and logged (metrics_logging.py); every `save_period`
     steps and at the end the state is saved (checkpoint_saving.py); every
     `eval_period` steps and at the end every task is evaluated (evaluator.py).

Everything is checked before anything is written to `model_dir`: a bad config or
a checkpoint of another model fails with one error and leaves the directory as it
was. A non-finite loss stops the run with `divergence.TrainingDivergedError`
before anything non-finite is saved. What a run survives:
  * a second `train` on the same MODEL_DIR is refused (model_dir_lock.py);
  * SIGTERM / SIGINT: the step in progress finishes, is saved, and the run stops
    with `preemption.TrainingInterrupted` (preemption.py);
  * a kill at any moment: the rerun resumes from the newest checkpoint
    bit-identically (checkpoints commit atomically; metrics.jsonl keeps each step
    once; an eval cut off after its checkpoint is redone);
  * a damaged newest checkpoint: moved to MODEL_DIR/damaged/, the previous one
    resumes (checkpoint_saving.set_aside);
  * a failed save (full disk): one line, the previous checkpoint intact.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import os
import pathlib
import time
from typing import Any, Mapping, Optional

import jax

from hyperprompt_t5x import partitioning
from hyperprompt_t5x.checkpoints import health, step_dirs
from hyperprompt_t5x.checkpoints.errors import CheckpointCorruptError
from hyperprompt_t5x.checkpoints.store import CheckpointStore
from hyperprompt_t5x.evaluation import evaluator, plots
from hyperprompt_t5x.model import network
from hyperprompt_t5x.run import metrics_logging, model_dir_files, run_setup
from hyperprompt_t5x.run.metrics_logging import is_chief, log
from hyperprompt_t5x.training import (checkpoint_saving, divergence, model_dir_lock,
                                      preemption, prompt_scale, run_summary, step_compilation,
                                      train_data)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run is given; see `train` for the meanings. gin builds it
  from the `train.<field> = %MACRO` bindings (gin/runs/finetune.gin), where the
  optimizer's fields (OPTIMIZER, LEARNING_RATE, FREEZE, ...) are bound flat."""
  model_dir: str
  model_config: Any
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  train_steps: int
  batch_size: int
  initial_checkpoint_path: Optional[str] = None
  save_period: int = 1000
  keep_checkpoints: Optional[int] = None
  eval_period: int = 0
  eval_split: str = 'validation'
  eval_batch_size: Optional[int] = None
  eval_max_examples: Optional[int] = None
  log_period: int = 100
  settings: run_setup.OptimizerSettings = run_setup.OptimizerSettings()
  calibrate_prompt_scale: bool = True
  num_partitions: int = 1
  seed: int = 0
  shuffle: bool = True
  pack: bool = False
  tensorboard: bool = True
  use_hardware_rng: bool = False
  xla_flags: Optional[str] = None
  config_str: Optional[str] = None


def train(config: TrainConfig) -> dict:
  """Trains (or resumes training) to `train_steps`; returns a summary dict.

  Args mirror T5X's macros: model_dir (MODEL_DIR), mixture_or_task_name
  (MIXTURE_OR_TASK_NAME), task_feature_lengths (TASK_FEATURE_LENGTHS), train_steps
  (TRAIN_STEPS: fine-tuning steps, counted from 0), batch_size (BATCH_SIZE, global),
  initial_checkpoint_path (INITIAL_CHECKPOINT_PATH), restore_optimizer_state
  (RESTORE_OPTIMIZER_STATE: with it, the Adafactor state and step the initial
  checkpoint holds, as T5X fine-tunes; see run_setup.restore_optimizer_state),
  calibrate_prompt_scale (CALIBRATE_PROMPT_SCALE: at step 0 of a run from
  initial_checkpoint_path, rescale the prompt generators U (Global: and fit its layer
  embeddings) so the prompt/real key-value
  norm ratios are 1 on the first batch; the ratios are logged either way; prompt_scale.py),
  save_period (SAVE_PERIOD),
  eval_period (EVAL_PERIOD; 0 = evaluate only at the end, None = never),
  num_partitions (NUM_PARTITIONS, the 'model' mesh axis), pack (PACK: training rows
  hold several examples of one task each, docs/PACKING.md; evaluation stays
  unpacked). `config_str` is the operative gin config, saved as MODEL_DIR/config.gin. use_hardware_rng
  (USE_HARDWARE_RNG, as T5X) switches JAX to the `unsafe_rbg` PRNG: much faster
  to compile and run, different random numbers than the default threefry.
  xla_flags (XLA_FLAGS) are added to the XLA_FLAGS environment variable if JAX
  has not started its backend yet (a fresh CLI process), else ignored with a note.
  """
  c = config
  run_setup.apply_xla_flags(c.xla_flags)
  run_setup.require('model_dir', c.model_dir, str)
  run_setup.require('mixture_or_task_name', c.mixture_or_task_name, str)
  run_setup.require('train_steps', c.train_steps, int, positive=True)
  run_setup.require('batch_size', c.batch_size, int, positive=True)
  run_setup.require('save_period', c.save_period, int, positive=True)
  run_setup.require('log_period', c.log_period, int, positive=True)
  run_setup.require('calibrate_prompt_scale', c.calibrate_prompt_scale, bool)
  run_setup.require('pack', c.pack, bool)
  lengths = run_setup.validate_feature_lengths(c.task_feature_lengths)
  settings = c.settings
  t0 = time.perf_counter()
  previous_prng = jax.config.jax_default_prng_impl
  if c.use_hardware_rng:
    jax.config.update('jax_default_prng_impl', 'unsafe_rbg')
  try:
    return _train(c, lengths, settings, t0)
  finally:
    jax.config.update('jax_default_prng_impl', previous_prng)


def train_from_bindings(**fields) -> dict:
  """gin's `train` configurable: the `train.<field>` bindings become one TrainConfig
  (the optimizer's fields its OptimizerSettings)."""
  names = {f.name for f in dataclasses.fields(run_setup.OptimizerSettings)}
  settings = run_setup.OptimizerSettings(**{k: fields.pop(k) for k in list(fields)
                                            if k in names})
  return train(TrainConfig(settings=settings, **fields))


train_from_bindings.__signature__ = inspect.Signature(
    [p for name, p in inspect.signature(TrainConfig).parameters.items() if name != 'settings']
    + list(inspect.signature(run_setup.OptimizerSettings).parameters.values()))


def _finished_step(model_dir: str, train_steps: int, config) -> Optional[int]:
  """The newest checkpoint step of MODEL_DIR when it is >= train_steps, else None.

  Reads only directory names, the newest checkpoint's file-size manifest and
  model_config.json (no orbax, no compilation).
  """
  steps = step_dirs.steps_in(model_dir)
  if not steps or max(steps) < train_steps:
    return None
  newest = pathlib.Path(step_dirs.path(model_dir, max(steps)))
  if (not (newest / health.MANIFEST).is_file()
      or health.damage(newest) is not None):
    return None  # not known whole without restoring: the full path checks (and moves) it
  model_dir_files.check_model_dir_matches(model_dir, config)
  return max(steps)


def _nothing_to_do(model_dir: str, step: int, train_steps: int, t0: float) -> dict:
  """A finished MODEL_DIR: say so, reprint best.json's table; write nothing."""
  log(f'Nothing to do: {model_dir} is at step {step} >= TRAIN_STEPS {train_steps} '
      '(raise --gin.TRAIN_STEPS to train further)')
  best = evaluator.read_best(model_dir)
  if best and best.get('tasks') and is_chief():
    print(f'Best per task ({best.get("split", "validation")}), from '
          f'{os.path.join(model_dir, evaluator.BEST_FILE)}:')
    print(evaluator.format_best_table(best), flush=True)
  return {'model_dir': model_dir, 'start_step': step, 'final_step': step,
          'seconds': time.perf_counter() - t0, 'seconds_to_first_step': None,
          'nothing_to_do': True}


def _draw_plots(model_dir: str) -> None:
  """MODEL_DIR/plots/*.png after training (a missing matplotlib is a note, not an error)."""
  if not is_chief():
    return
  try:
    written = plots.draw(model_dir)
  except ImportError as e:
    log(f'note: no plots ({e}); pip install matplotlib, then: '
        f'hyperprompt-t5x plot --gin.MODEL_DIR={model_dir}')
    return
  if written:
    log(f'plots: {os.path.join(model_dir, plots.PLOTS_DIR)}/ ({len(written)} PNG files)')


def _set_up(*, model_dir, model_config, mixture_or_task_name, lengths, settings, store,
            resume_step, batch_size, seed, shuffle, pack, num_partitions,
            initial_checkpoint_path, eval_split, eval_batch_size, eval_max_examples, rng,
            on_plan):
  """(run, inputs, step_fn): the state, the pipelines and the compiled step, in parallel.

  The input pipelines are built and the train step compiles in worker threads
  while the main thread initialises or restores the parameters. A set-up error
  is raised as is, not masked by whatever the threads raise.
  """
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    inputs_future = pool.submit(
        train_data.open_inputs, mixture_or_task_name, lengths, batch_size=batch_size,
        seed=seed, skip=resume_step or 0, shuffle=shuffle, eval_split=eval_split,
        eval_batch_size=eval_batch_size, eval_max_examples=eval_max_examples, pack=pack,
        reserve=train_data.prompt_positions(model_config))
    builder = step_compilation.TrainStepBuilder(
        pool, freeze=settings.freeze, batch_size=batch_size,
        lengths=train_data.row_lengths(lengths, pack), rng=rng, packed=pack)

    def plan_ready(plan) -> None:
      on_plan(plan)
      builder.on_plan(plan)
      if builder.future is not None:
        log('compiling the train step (while the parameters are '
            f'{"restored" if resume_step is not None else "initialised"}) ...')

    try:
      run = run_setup.build_run(
          model_dir=model_dir, config=model_config,
          mixture_or_task_name=mixture_or_task_name, task_feature_lengths=lengths,
          settings=settings, num_partitions=num_partitions, seed=seed, store=store,
          initial_checkpoint_path=initial_checkpoint_path, on_plan=plan_ready)
    except BaseException:
      concurrent.futures.wait([inputs_future] + builder.pending())
      raise
    inputs = inputs_future.result()
    step_fn = builder.result()
    if builder.seconds is not None:
      log(f'train step compiled in {builder.seconds:.1f} s')
  if run.start_step != (resume_step or 0):
    raise ValueError(f'{step_dirs.path(model_dir, resume_step)} holds step {run.start_step}; '
                     'the checkpoint directory name and its contents disagree')
  return run, inputs, step_fn


def _calibrate_prompt_scale(model_config, state, batch, mesh, rescale: bool):
  """Step 0 from a restored backbone: log prompt/real k/v norm ratios; bring them to 1
  (unless `rescale` is False: CALIBRATE_PROMPT_SCALE = False keeps the init's generators)."""
  params, message = prompt_scale.calibrate_first_batch(
      model_config, state.params, partitioning.shard_batch(batch, mesh), rescale)
  if message is None:
    return state
  log(message)
  return state.replace(params=params)


def _train(c: TrainConfig, lengths: dict, settings, t0: float) -> dict:
  """A finished MODEL_DIR answers at once; else checks the mixture and trains while
  holding MODEL_DIR (model_dir_lock.py)."""
  finished = _finished_step(c.model_dir, c.train_steps, c.model_config)
  if finished is not None:
    return _nothing_to_do(c.model_dir, finished, c.train_steps, t0)
  partitioning.maybe_initialize_distributed()
  run_setup.select_vocabulary(c.model_dir, c.mixture_or_task_name)
  task_names, _ = run_setup.mixture_tasks(c.mixture_or_task_name, c.model_config,
                                          announce=False)
  with model_dir_lock.hold(c.model_dir, log):
    return _train_holding_model_dir(c, lengths, settings, t0, task_names)


def _restore_or_start(c: TrainConfig, lengths: dict, settings, task_names: list, store,
                      rng) -> tuple:
  """(run, inputs, step_fn) from the newest usable checkpoint (damaged ones are moved
  aside), else from INITIAL_CHECKPOINT_PATH or a fresh initialisation."""
  while True:
    resume_step = store.latest_step()
    describe = lambda plan, start=resume_step: log(run_summary.describe(
        plan, c.model_config, freeze=settings.freeze, mixture=c.mixture_or_task_name,
        task_names=task_names, batch_size=c.batch_size, lengths=lengths,
        train_steps=c.train_steps, start_step=start, model_dir=c.model_dir, pack=c.pack))
    try:
      return _set_up(
          model_dir=c.model_dir, model_config=c.model_config,
          mixture_or_task_name=c.mixture_or_task_name, lengths=lengths, settings=settings,
          store=store, resume_step=resume_step, batch_size=c.batch_size, seed=c.seed,
          shuffle=c.shuffle, pack=c.pack, num_partitions=c.num_partitions,
          initial_checkpoint_path=c.initial_checkpoint_path,
          eval_split=c.eval_split if c.eval_period is not None else None,
          eval_batch_size=c.eval_batch_size or c.batch_size,
          eval_max_examples=c.eval_max_examples, rng=rng, on_plan=describe)
    except CheckpointCorruptError as e:
      if resume_step is None:
        raise
      checkpoint_saving.set_aside(store, resume_step, e)


def _train_holding_model_dir(c: TrainConfig, lengths: dict, settings, t0: float,
                             task_names: list) -> dict:
  """The body of `train` (arguments validated, MODEL_DIR held)."""
  rng = jax.random.PRNGKey(c.seed)  # dropout key: fold_in(rng, step) inside the step
  store = CheckpointStore(c.model_dir, keep=c.keep_checkpoints)
  run, inputs, step_fn = _restore_or_start(c, lengths, settings, task_names, store, rng)
  start = run.start_step
  log(f'Starting at step {start} from {run.restored_from}')
  validation = None
  if c.eval_period is not None:
    validation = evaluator.Evaluator(
        run, c.mixture_or_task_name, lengths, split=c.eval_split,
        batch_size=c.eval_batch_size or c.batch_size, max_examples=c.eval_max_examples,
        model_dir=c.model_dir, sets=inputs.eval_sets)
  # Nothing has been written so far; from here on MODEL_DIR is ours.
  model_dir_files.save_config_files(c.model_dir, c.model_config, c.config_str, start)
  model_dir_files.save_vocabulary(c.model_dir, run.vocabulary)
  logger = metrics_logging.MetricsLogger(c.model_dir, tensorboard=c.tensorboard,
                                         is_chief=is_chief())
  rows = train_data.row_lengths(lengths, c.pack)
  train_log = metrics_logging.TrainLog(
      logger, schedule=run.schedule, start_step=start, total_steps=c.train_steps,
      tokens_per_step=c.batch_size * (rows['inputs'] + rows['targets']),
      periods={'save': c.save_period, 'eval': c.eval_period}, num_processes=jax.process_count())
  if validation is not None and evaluator.eval_missing(
      logger, validation, start, c.eval_period, c.train_steps):
    validation.run(run.state.params, start, logger)  # killed after the save, before this eval
  saver = checkpoint_saving.CheckpointSaver(run.store, c.model_dir, c.model_config,
                                            c.batch_size)
  with preemption.StopRequest() as stop:
    try:
      first_step_s = _steps(c, run, inputs.batches, step_fn, rng, saver, validation, logger,
                            train_log, t0, stop)
    finally:
      saver.wait()
      logger.close()
  return _finish(c, start, t0, first_step_s, train_log, validation)


def _steps(c: TrainConfig, run, batches, step_fn, rng, saver, validation, logger,
           train_log, t0: float, stop) -> Optional[float]:
  """Trains from run.start_step to TRAIN_STEPS: log, save and evaluate on their periods,
  stop after a step on SIGTERM / SIGINT. Returns the seconds to the first step."""
  state, eval_period, first_step_s = run.state, c.eval_period, None
  pending = metrics_logging.PendingMetrics()
  for step in range(run.start_step, c.train_steps):
    batch = next(batches)
    network.check_task_ids(batch['task_ids'], c.model_config.num_tasks)
    train_log.count(batch)
    if step == 0 and c.initial_checkpoint_path:
      state = _calibrate_prompt_scale(c.model_config, state, batch, run.mesh,
                                      c.calibrate_prompt_scale)
    state, metrics = step_fn(state, partitioning.shard_batch(batch, run.mesh), rng)
    pending.add(step, metrics)
    done = step + 1
    if first_step_s is None:
      jax.block_until_ready(metrics)
      first_step_s = time.perf_counter() - t0
    is_last = done == c.train_steps
    signum = stop.requested()  # SIGTERM / SIGINT: this step is finished; save it, stop
    save_now = done % c.save_period == 0 or is_last or bool(signum)
    eval_due = bool(eval_period and done % eval_period == 0)
    if done % c.log_period == 0 or save_now or is_last or eval_due:
      fetched = pending.fetch()
      divergence.check_losses(fetched, saver.last_good, c.model_dir)
      train_log.record(done, fetched)
    if save_now:
      jax.block_until_ready(state)  # the step's own time stays in the training window
      t = time.perf_counter()
      saver.save(done, state)
      train_log.pause('save', time.perf_counter() - t)
      log(f'saved {step_dirs.name(done)} ({time.perf_counter() - t:.1f} s)')
    if validation is not None and (eval_due or is_last):
      jax.block_until_ready(state)
      t = time.perf_counter()
      validation.run(state.params, done, logger)
      train_log.pause('eval', time.perf_counter() - t)
    if signum:
      raise preemption.TrainingInterrupted(signum, done)
  if run.start_step >= c.train_steps:
    log(f'Nothing to do: MODEL_DIR is already at step {run.start_step} >= TRAIN_STEPS '
        f'{c.train_steps}')
  return first_step_s


def _finish(c: TrainConfig, start: int, t0: float, first_step_s: Optional[float],
            train_log, validation) -> dict:
  """The summary dict, the best-per-task table, the plots and the closing line."""
  summary = {'model_dir': c.model_dir, 'start_step': start,
             'final_step': max(start, c.train_steps),
             'seconds': time.perf_counter() - t0,
             'seconds_to_first_step': first_step_s}
  if train_log.loss is not None:
    summary['loss'] = train_log.loss
  if validation is not None and validation.last is not None:
    summary['eval'] = validation.last
    if is_chief():
      print(evaluator.format_table(validation.last, validation.best,
                                   step=validation.last_step), flush=True)
  _draw_plots(c.model_dir)
  first = f', first step after {first_step_s:.1f} s' if first_step_s is not None else ''
  log(f'Done: step {summary["final_step"]} in {summary["seconds"]:.1f} s{first}; '
      f'checkpoints and metrics in {c.model_dir}')
  return summary
