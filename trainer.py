"""Training: the per-replica train step, the many-steps-per-call loop and the outer loop that
checkpoints, writes summaries, stops on request and reports progress through a callback.

`Trainer` owns what runs on the devices; `train` the bookkeeping between calls (and, in
multi-worker runs, a `CallWatchdog` ends a call that a stalled peer blocks). Both take plain
objects (a strategy, a model, an optimizer, a CheckpointManager), so a test or a notebook can
drive them without flags.
"""
import contextlib
import dataclasses
import math
import signal
import threading
import time

from absl import logging
import numpy as np
import tensorflow as tf

import checkpoints
import data_util
import interrupts
import lars_optimizer
import objective as obj_lib
import schema


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer and its learning-rate schedule."""
  # 'lars' | 'momentum' | 'adam'
  name: str = schema.setting('lars', defines_run=True, flag='optimizer')
  learning_rate: float = schema.setting(0.3, allowed=schema.above(0))
  learning_rate_scaling: str = schema.setting('linear', defines_run=True)  # 'linear' | 'sqrt'
  warmup_epochs: float = schema.setting(10, allowed=schema.at_least(0))
  weight_decay: float = schema.setting(1e-6, eval_inherits=True, allowed=schema.at_least(0))
  momentum: float = schema.setting(0.9, allowed=schema.Range(0, 1, high_open=True))


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Training length, batch, checkpoint cadence, seeding and logging."""
  train_batch_size: int = schema.setting(512, defines_run=True, eval_inherits=True,
                                         allowed=schema.above(0))
  train_epochs: int = schema.setting(100, eval_inherits=True, allowed=schema.at_least(0))
  # > 0 overrides train_epochs
  train_steps: int = schema.setting(0, eval_inherits=True, allowed=schema.at_least(0))
  checkpoint_epochs: int = schema.setting(1, allowed=schema.at_least(1))
  checkpoint_steps: int = schema.setting(0, allowed=schema.at_least(0))  # > 0 overrides the epochs
  keep_checkpoint_max: int = schema.setting(5, allowed=schema.above(0))
  keep_hub_module_max: int = schema.setting(1, allowed=schema.at_least(0))  # 0: no export
  seed: int = schema.setting(0, defines_run=True, allowed=schema.at_least(0))
  deterministic: bool = False
  log_every_seconds: float = schema.setting(5.0, allowed=schema.at_least(0))
  # evaluate while training (head top-1, kNN); 0 = only at the end
  eval_every_epochs: int = schema.setting(0, allowed=schema.at_least(0))
  eval_every_steps: int = schema.setting(0, allowed=schema.at_least(0))  # > 0 overrides epochs
  # Multi-worker runs: a call of the train loop (after the first) longer than this ends the job.
  step_timeout_seconds: float = schema.setting(600.0, allowed=schema.at_least(0))

  def total_steps(self, steps_per_epoch):
    return self.train_steps or self.train_epochs * steps_per_epoch

  def checkpoint_every(self, steps_per_epoch):
    return self.checkpoint_steps or max(1, self.checkpoint_epochs * steps_per_epoch)

  def eval_every(self, steps_per_epoch):
    """Steps between evaluations during training; 0 = none."""
    return self.eval_every_steps or self.eval_every_epochs * steps_per_epoch


def warmup_steps(config, steps_per_epoch, total_steps):
  """Warm-up steps of `config` (an OptimizerConfig), shortened (with a warning) to training."""
  steps = int(round(config.warmup_epochs * steps_per_epoch))
  if steps > total_steps:
    logging.warning('Warm-up (%d steps) is longer than training (%d steps); shortened.',
                    steps, total_steps)
    steps = total_steps
  return steps


def build_optimizer(config, model, *, global_batch_size, warmup_steps, total_steps,
                    loss_scaling=False):
  """(optimizer, learning-rate schedule), built for the model's trainable variables.

  Call under the strategy's scope. loss_scaling: wrap in a LossScaleOptimizer (float16).
  """
  learning_rate = lars_optimizer.WarmUpAndCosineDecay(
      config.learning_rate, global_batch_size, config.learning_rate_scaling, warmup_steps,
      total_steps)
  optimizer = lars_optimizer.build_optimizer(
      config.name, learning_rate, momentum=config.momentum, weight_decay=config.weight_decay)
  if loss_scaling:
    optimizer = tf.keras.optimizers.LossScaleOptimizer(optimizer)
  # Built here, not lazily inside the first traced step (Keras 3 cannot under a strategy).
  optimizer.build(model.trainable_variables)
  return optimizer, learning_rate


class Trainer:
  """Owns the train step and the many-steps-per-call loop; `train` does the bookkeeping."""

  def __init__(self, strategy, model, optimizer, *, weight_decay, objective=None,
               jit_compile=False, pixel_augment=None):
    """objective: an objective.Objective (pretraining; fine-tuning has none)."""
    self.strategy = strategy
    self.model = model
    self.optimizer = optimizer
    self.objective = objective
    self.weight_decay = weight_decay
    self.decay_in_loss = lars_optimizer.weight_decay_in_loss(optimizer)
    # data_util.PixelAugment: color distortion and blur of the views, batched in the step.
    self.pixel_augment = pixel_augment
    self.pretrain = model.config.train_mode == 'pretrain'
    if self.pretrain and objective is None:
      raise ValueError('pretraining needs an objective (objective.build)')
    self.loss_scaling = isinstance(optimizer, tf.keras.optimizers.LossScaleOptimizer)
    # XLA compiles the per-replica step; the loop around it stays a plain tf.function. Only the
    # loop needs AutoGraph (its tf.range): the step and everything it calls branch on settings
    # alone, and converting them cost seconds of every process' first call.
    self._step = (tf.function(self.train_step, jit_compile=True, autograph=False) if jit_compile
                  else tf.autograph.experimental.do_not_convert(self.train_step))
    self._loop = tf.function(self._train_loop)
    self._agree = tf.function(self._fewest_steps, autograph=False)

  def _contrastive_loss(self, projection, ids, metrics):
    """The contrastive loss of the two views' projections [2b, D]; fills its metrics."""
    projection_a, projection_b = tf.split(projection, 2, 0)
    # The step before this update, 0-based: the clock of SogCLR's gamma schedule.
    result = self.objective(projection_a, projection_b, ids, step=self.optimizer.iterations)
    metrics.update({name: result[key] for name, key in self.objective.METRICS.items()})
    metrics['contrast_acc'], metrics['contrast_entropy'] = obj_lib.contrast_metrics(
        result['logits_a'], result['positive_mask'])
    metrics['objective_loss'] = result['loss']
    return result['loss']

  @staticmethod
  def _supervised_loss(logits, labels, num_views, metrics):
    """Cross-entropy of the linear head on every view; fills its metrics."""
    repeated_labels = tf.concat([labels] * num_views, 0)
    supervised = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(
        labels=repeated_labels, logits=logits))
    metrics['supervised_loss'] = supervised
    metrics['supervised_acc'] = tf.reduce_mean(tf.cast(tf.equal(
        tf.argmax(logits, 1), tf.argmax(repeated_labels, 1)), tf.float32))
    return supervised

  def train_step(self, batch):
    """One per-replica step on `batch` (data.batch: views, labels, ids and, when the pipeline
    leaves color distortion and blur to the step (`pixel_augment`), each view's pixel_params);
    returns a dict of scalar metrics (means over the local batch)."""
    views, labels, ids = batch['views'], batch['labels'], batch['ids']
    images = tf.concat(views, 0)
    if self.pixel_augment is not None:
      images = data_util.distort_batch(images, tf.concat(batch['pixel_params'], 0),
                                       self.pixel_augment)
    metrics = {}
    with tf.GradientTape() as tape:
      outputs = self.model(images, training=True)
      total = 0.0
      if self.pretrain:
        total += self._contrastive_loss(outputs['projection'], ids, metrics)
      if 'supervised_logits' in outputs:
        total += self._supervised_loss(outputs['supervised_logits'], labels, len(views),
                                       metrics)
      if self.decay_in_loss:
        weight_decay = lars_optimizer.weight_decay_loss(
            self.model.trainable_variables, self.weight_decay)
        metrics['weight_decay'] = weight_decay
        total += weight_decay
      elif self.model.has_supervised_head:
        # LARS decays every other weight itself; the linear head's L2 is in the loss.
        total += lars_optimizer.linear_head_decay_loss(
            self.model.trainable_variables, self.weight_decay)
      metrics['total_loss'] = total
      # apply_gradients sums over replicas.
      scaled = total / self.strategy.num_replicas_in_sync
      if self.loss_scaling:  # float16: apply_gradients unscales.
        scaled = self.optimizer.scale_loss(scaled)
    variables = self.model.trainable_variables
    gradients = tape.gradient(scaled, variables)
    self.optimizer.apply_gradients(zip(gradients, variables))
    return metrics

  def _replicated_step(self, iterator):
    per_replica = self.strategy.run(self._step, args=(next(iterator),))
    return {k: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
            for k, v in per_replica.items()}

  def metric_names(self):
    """The metrics train_step returns, each a scalar per step."""
    names = []
    if self.pretrain:
      names += [*self.objective.METRICS, 'contrast_acc', 'contrast_entropy',
                'objective_loss']
    if self.model.has_supervised_head:
      names += ['supervised_loss', 'supervised_acc']
    if self.decay_in_loss:
      names.append('weight_decay')
    return names + ['total_loss']

  def _train_loop(self, iterator, num_steps):
    """Runs `num_steps` >= 1 steps; returns (each metric's mean over them and the replicas, the
    first step's total loss: the loss of the weights the call started from).

    The step is traced once, inside the loop (not once more before it): half the graph to trace
    and to optimize at the first call. Under LARS (decay inside the optimizer) `weight_decay` is
    the penalty of the final weights.
    """
    totals = {name: tf.constant(0.0) for name in self.metric_names()}
    first_loss = tf.constant(0.0)
    for index in tf.range(num_steps):
      step = self._replicated_step(iterator)
      if set(step) != set(totals):  # at tracing: metric_names() must list what the step gives
        raise AssertionError(f'train_step returns {sorted(step)}, metric_names() says '
                             f'{sorted(totals)}')
      first_loss = tf.where(index == 0, tf.cast(step['total_loss'], tf.float32), first_loss)
      totals = {k: totals[k] + tf.cast(step[k], tf.float32) for k in totals}
    means = {k: v / tf.cast(num_steps, tf.float32) for k, v in totals.items()}
    if not self.decay_in_loss:
      # The optimizer decays the weights itself: the penalty is only reported, from the weights
      # after the last step, once per call instead of one pass over every kernel per step.
      means['weight_decay'] = lars_optimizer.weight_decay_loss(
          self.model.trainable_variables, self.weight_decay)
    return means, first_loss

  def _fewest_steps(self, proposal):
    # [steps, -stop] of every replica (one all-gather; tf.distribute reduces only by SUM and
    # MEAN): its minimum gives the fewest steps and whether any worker stops.
    per_replica = self.strategy.run(lambda: proposal[tf.newaxis])
    return tf.reduce_min(self.strategy.gather(per_replica, axis=0), axis=0)

  def agree(self, num_steps, stop):
    """(the fewest steps any worker proposes for the next call, whether any worker was asked
    to stop): `num_steps` and `stop` themselves with one worker.

    Every worker must run the same number of steps per call (a step outside the loop on one and
    inside it on another issue different collectives, and both wait forever), and save and stop
    together (saving is collective), whatever their clocks and whichever got the signal.
    """
    if not isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
      return num_steps, stop
    agreed = self._agree(tf.constant([num_steps, -int(stop)], tf.int32)).numpy()
    return int(agreed[0]), bool(agreed[1] < 0)

  def run_steps(self, iterator, num_steps):
    """Runs `num_steps` steps in one call; returns (the metrics' means, the first step's total
    loss) as tensors."""
    return self._loop(iterator, tf.constant(num_steps, tf.int32))

  def train_loop(self, iterator, num_steps):
    """Runs `num_steps` steps in one call; returns the metrics' means as tensors."""
    return self.run_steps(iterator, num_steps)[0]

  def objective_tables(self):
    """{name: variable} of the objective's per-image tables ({} without)."""
    return {} if self.objective is None else self.objective.tables()

  def unbounded_metrics(self):
    """The step metrics that may be infinite without harm (the objective's)."""
    return () if self.objective is None else self.objective.UNBOUNDED_METRICS

  def saved_variables(self):
    """(name, variable) of every float variable a checkpoint saves: the model's (BatchNorm
    moving statistics included), the optimizer's and SogCLR's tables."""
    named = [(v.path, v) for v in self.model.variables]
    named += [(f'optimizer/{v.path}', v) for v in self.optimizer.variables]
    named += [(f'{checkpoints.OBJECTIVE_KEY}/{name}', v)
              for name, v in self.objective_tables().items()]
    return [(name, v) for name, v in named if tf.as_dtype(v.dtype).is_floating]

  @tf.function(autograph=False)
  def _finite_flags(self):
    # The objective says what a sound table holds (SogCLR's log u is -inf where unvisited).
    tables = {id(v): name for name, v in self.objective_tables().items()}
    flags = []
    for _, variable in self.saved_variables():
      v = tf.cast(variable, tf.float32)
      if id(variable) in tables:
        flags.append(self.objective.table_is_sound(tables[id(variable)], v))
      else:
        flags.append(tf.reduce_all(tf.math.is_finite(v)))
    # Weights whose squares overflow float32 (|w| > 1.8e19) are finite yet beyond repair: their
    # L2 penalty is inf and any later update diverges.
    squares = tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, tf.float32)))
                        for v in self.model.trainable_variables])
    return tf.stack(flags), tf.math.is_finite(squares)

  def non_finite_variables(self):
    """The names of the saved variables holding NaN or inf (SogCLR's log u: NaN or +inf), plus
    'the trainable weights\' squares' when those overflow float32; [] for a state training can
    continue from."""
    flags, squares_finite = self._finite_flags()
    names = [name for (name, _), ok in zip(self.saved_variables(), flags.numpy(), strict=True)
             if not ok]
    if not squares_finite:
      names.append("the trainable weights' squares (|w| above about 1.8e19)")
    return names

  def weights_are_finite(self):
    """True when every variable a checkpoint saves is finite (non_finite_variables is empty)."""
    return not self.non_finite_variables()


class Preempted(Exception):
  """Training stopped early on request (SIGTERM, SIGHUP, SIGINT); a checkpoint of the last step was
  saved. `signal_number`: the signal that asked (the command line exits with 128 + it)."""

  def __init__(self, message, signal_number=signal.SIGTERM):
    super().__init__(message)
    self.signal_number = signal_number


@dataclasses.dataclass(frozen=True)
class Progress:
  """What the outer loop reports after each call: the step reached and the call's metrics."""
  step: int
  total_steps: int
  metrics: dict
  seconds_per_step: float | None  # smoothed; None until measured (the first call traces)


class StepsPerCall:
  """How many steps the next call runs: calls of about `target_seconds` (few host round-trips,
  yet progress and summaries stay fresh), from a smoothed time per step."""

  def __init__(self, target_seconds=1.0, max_steps=1000):
    self.target_seconds = target_seconds
    self.max_steps = max_steps
    self.steps = 1
    self.seconds_per_step = None

  def update(self, elapsed, num_steps, includes_tracing):
    """Records a call of `num_steps` that took `elapsed` seconds; returns the next size."""
    if includes_tracing:
      self.steps = 2
      return self.steps
    per_step = elapsed / num_steps
    self.seconds_per_step = per_step if self.seconds_per_step is None else (
        0.7 * self.seconds_per_step + 0.3 * per_step)
    self.steps = int(np.clip(self.target_seconds / self.seconds_per_step, 1, self.max_steps))
    return self.steps


def call_steps(step, steps_per_call, total_steps, checkpoint_every, eval_every=0):
  """(steps of the next call, the next checkpoint step): never past training, a checkpoint or
  (eval_every > 0) an evaluation."""
  next_checkpoint = (step // checkpoint_every + 1) * checkpoint_every
  num_steps = min(steps_per_call, total_steps - step, next_checkpoint - step)
  if eval_every:
    num_steps = min(num_steps, (step // eval_every + 1) * eval_every - step)
  return num_steps, next_checkpoint


def _check_metrics_finite(metrics, first_loss, previous, step, checkpoint_manager, saved_step,
                          unbounded=()):
  """Raises FloatingPointError when a metric of the call (but those `unbounded`) is not finite.
  When already the call's first step was, the weights it started from cannot continue: the
  checkpoint saved from them (at `saved_step` == previous) is removed, so a rerun resumes from
  an older, good one."""
  bad = [k for k, v in metrics.items() if not math.isfinite(v) and k not in unbounded]
  if not bad:
    return
  removed = ''
  if not math.isfinite(first_loss) and saved_step == previous:
    checkpoints.discard(checkpoint_manager, saved_step)
    removed = (f'; checkpoint ckpt-{saved_step} was removed (its weights already give a '
               'non-finite loss)')
  raise FloatingPointError(
      f'Non-finite {", ".join(bad)} between steps {previous + 1} and {step}{removed}; '
      f'{_kept(checkpoints.latest(checkpoint_manager.directory))}. Lower --learning_rate or '
      'raise --temperature.')


def _kept(latest):
  if latest is None:
    return 'no checkpoint of this run is kept (a rerun starts from step 0)'
  return f'the last good checkpoint ({latest}) is kept'



def _save(trainer, checkpoint_manager, last_saved, step):
  # A finite loss was computed before the last update: the weights, the BatchNorm statistics,
  # the optimizer's moments or SogCLR's tables can still have blown up.
  bad = trainer.non_finite_variables()
  if bad:
    more = f' and {len(bad) - 3} more' if len(bad) > 3 else ''
    raise FloatingPointError(
        f'Non-finite (or overflowing) state between steps {last_saved + 1} and {step} '
        f'({", ".join(bad[:3])}{more}); nothing of these steps is saved, '
        f'{_kept(checkpoint_manager.latest_checkpoint)}. Lower --learning_rate.')
  checkpoints.save(checkpoint_manager, step)


class CallWatchdog:
  """Ends the process with one `error:` line when a call of the train loop outlasts
  `timeout_seconds` (0: never).

  In a multi-worker job a peer that hangs while alive (its heartbeats go on, so the coordination
  service sees nothing wrong) leaves every other worker waiting inside a collective, where no
  Python code runs and signal handlers wait: without this the job blocks forever and ignores
  SIGTERM. Nothing can be saved from inside the stuck step; the newest checkpoint stays, and a
  restart of every worker resumes from it. `on_timeout(line)` (default: the `error:` line and
  exit 1 at once, from the timer's thread, the run's lock removed on the way) is for tests.
  """

  def __init__(self, timeout_seconds, on_timeout=interrupts.exit_with_error):
    self.timeout_seconds = timeout_seconds
    self.on_timeout = on_timeout

  def watching(self, what):
    """A context manager: `what` (e.g. 'train steps 11-13') runs inside it."""
    line = (f'{what} did not finish within --step_timeout_seconds={self.timeout_seconds:g}: a '
            'worker of this job is hung or far slower than the others; restart every worker '
            'with the same command (each resumes from the newest checkpoint)')
    return interrupts.deadline(self.timeout_seconds, line, self.on_timeout)


def train(trainer, iterator, *, total_steps, checkpoint_every, checkpoint_manager,
          summary_writer=None, learning_rate_fn=None, stop_requested=None, on_progress=None,
          on_started=None, eval_every=0, on_eval=None, watchdog=None):
  """The outer loop: bookkeeping at loop boundaries, the steps inside `trainer.run_steps`.

  Never overshoots `total_steps`; checkpoints every `checkpoint_every` steps and at the end;
  raises FloatingPointError naming the step range when a loss is not finite (the last good
  checkpoint stays). When `stop_requested` (a threading.Event) is set, saves a checkpoint at the
  next loop boundary and raises Preempted (with the event's `signal_number`, if it has one).
  After every call, `on_progress(Progress)` (e.g. a ProgressLogger). `on_started()` runs once,
  after the first call (the data and the step work), before anything is written: a run stopped
  by bad data in its first batch changes nothing. The objective writes its tables' summaries
  (Objective.write_summaries; SogCLR's u/). A summary that
  cannot be written (a full disk) saves a checkpoint of the step reached, then raises OSError.
  With eval_every > 0, calls stop at its multiples, where (after any checkpoint) `on_eval(step,
  training_seconds_so_far)` runs, and at the last step. Every call but the first (it traces) and
  the workers' agreement after it run under `watchdog` (a CallWatchdog), if given. Returns the
  seconds spent training, the time in on_eval excluded.
  """
  step = start_step = int(trainer.optimizer.iterations.numpy())
  saved_step = None  # the step of this loop's last save
  sizer = StepsPerCall()
  train_started = time.time()
  eval_seconds = 0.0
  while step < total_steps:
    num_steps, next_checkpoint = call_steps(step, sizer.steps, total_steps, checkpoint_every,
                                            eval_every if on_eval is not None else 0)
    # The first call traces (and compiles): its length says nothing about the other workers.
    guard = watchdog if step > start_step else None
    metrics, first_loss, elapsed = _run_call(trainer, iterator, step, num_steps, guard)
    previous, step = step, step + num_steps
    _check_metrics_finite(metrics, first_loss, previous, step, checkpoint_manager,
                          saved_step, trainer.unbounded_metrics())
    first_call = previous == start_step
    if first_call and on_started is not None:
      on_started()
    # The first call includes tracing.
    sizer.update(elapsed, num_steps, includes_tracing=first_call and sizer.steps == 1)
    # Each worker sizes calls by its own clock: all run the smallest size any proposes.
    with _watching(guard, f"the workers' agreement after step {step}"):
      sizer.steps, preempted = trainer.agree(sizer.steps, _is_set(stop_requested))
    saving = step == next_checkpoint or step == total_steps or preempted
    last_saved = start_step if saved_step is None else saved_step  # the state checked last
    metrics = _call_metrics(trainer, metrics, learning_rate_fn, step)
    _record_call(trainer, summary_writer, checkpoint_manager, step, metrics, saving, first_call,
                 last_saved)
    saved_step = step if saving else saved_step
    if preempted:
      _flush(summary_writer)
      raise _preempted(step, total_steps, checkpoint_manager, stop_requested)
    if on_progress is not None:
      on_progress(Progress(step, total_steps, metrics, sizer.seconds_per_step))
    if on_eval is not None and eval_every and (step % eval_every == 0 or step == total_steps):
      eval_started = time.time()
      on_eval(step, eval_started - train_started - eval_seconds)
      eval_seconds += time.time() - eval_started
  _flush(summary_writer)
  return time.time() - train_started - eval_seconds


def _run_call(trainer, iterator, step, num_steps, watchdog):
  """Steps step+1 .. step+num_steps in one call: (metric means, first step's loss, seconds)."""
  started = time.time()
  with _watching(watchdog, f'train steps {step + 1}-{step + num_steps}'):
    means, first_loss = trainer.run_steps(iterator, num_steps)
  metrics = {k: float(v) for k, v in means.items()}
  elapsed = time.time() - started
  reached = int(trainer.optimizer.iterations.numpy())
  assert reached == step + num_steps, (step, num_steps, reached)
  return metrics, float(first_loss), elapsed


def _record_call(trainer, summary_writer, checkpoint_manager, step, metrics, saving, first_call,
                 last_saved):
  """Writes the call's summaries and, when `saving`, the checkpoint of `step`."""
  try:
    _write_call_summaries(summary_writer, trainer, step, metrics, saving, first_call)
  except (tf.errors.OpError, OSError) as e:
    raise _summaries_failed(e, trainer, checkpoint_manager, last_saved, step) from None
  if saving:
    _save(trainer, checkpoint_manager, last_saved, step)


def _watching(watchdog, what):
  return contextlib.nullcontext() if watchdog is None else watchdog.watching(what)


def _is_set(stop_requested):
  return stop_requested is not None and stop_requested.is_set()


def _flush(summary_writer):
  if summary_writer is not None:
    summary_writer.flush()


def _call_metrics(trainer, metrics, learning_rate_fn, step):
  """A call's metrics with the learning rate and what the objective derives from them and
  from its tables (SogCLR's u_mean, iSogCLR's temperature statistics)."""
  metrics = dict(metrics)
  if learning_rate_fn is not None:
    metrics['learning_rate'] = float(learning_rate_fn(step))
  if trainer.objective is not None:
    metrics.update(trainer.objective.call_metrics(metrics))
  return metrics


def _write_call_summaries(summary_writer, trainer, step, metrics, saving, first_call):
  if summary_writer is None:
    return
  with summary_writer.as_default(step=step):
    for name, value in metrics.items():
      tf.summary.scalar(f'train/{name}', value)
    if trainer.objective is not None:
      trainer.objective.write_summaries(at_checkpoint=saving, first_call=first_call)


def _summaries_failed(error, trainer, checkpoint_manager, last_saved, step):
  """The OSError of a summary write that failed (a full disk), after saving the step reached (a
  failed save raises its own error instead)."""
  _save(trainer, checkpoint_manager, last_saved, step)
  return OSError(f'could not write summaries in {checkpoint_manager.directory} '
                 f'({checkpoints.short_reason(error)}); step {step} is saved '
                 f'({checkpoint_manager.latest_checkpoint}): make room and rerun the same '
                 'command to resume')


def _preempted(step, total_steps, checkpoint_manager, stop_requested):
  """Preempted, naming what asked: a signal to this process, a call (stop_requested set without
  one), or another worker (stop_requested not set here: the workers agreed to stop)."""
  number = getattr(stop_requested, 'signal_number', None) if _is_set(stop_requested) else None
  if number is not None:
    cause = f'by {interrupts.NAMES.get(number, signal.Signals(number).name)}'
  else:
    cause = 'on request' if _is_set(stop_requested) else "at another worker's request"
  return Preempted(f'Stopped at step {step}/{total_steps} {cause}; checkpoint saved to '
                   f'{checkpoint_manager.latest_checkpoint}. Rerun the same command to resume.',
                   number or signal.SIGTERM)


def format_duration(seconds):
  seconds = int(max(seconds, 0))
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  return f'{seconds // 60}m{seconds % 60:02d}s'


class ProgressLogger:
  """An `on_progress` callback: a progress line (step, epoch, learning rate, loss, images/s,
  ETA) every `every_seconds` and at the last step. learning_rate: the schedule, step -> rate."""

  LABELS = (('contrast_loss', 'nt_xent'), ('contrast_acc', 'contrast_acc'),
            ('supervised_acc', 'sup_acc'), ('log_u_mean', 'log_u_mean'), ('tau_mean', 'tau_mean'))

  def __init__(self, global_batch_size, every_seconds=5.0, *, steps_per_epoch=0,
               learning_rate=None):
    self.global_batch_size = global_batch_size
    self.every_seconds = every_seconds
    self.steps_per_epoch = steps_per_epoch
    self.learning_rate = learning_rate
    self.last_log = time.time()

  def __call__(self, progress):
    now = time.time()
    if now - self.last_log < self.every_seconds and progress.step != progress.total_steps:
      return
    self.last_log = now
    logging.info('  '.join(self.line_parts(progress)))

  def line_parts(self, progress):
    metrics, seconds_per_step = progress.metrics, progress.seconds_per_step
    parts = [f'step {progress.step}/{progress.total_steps}']
    if self.steps_per_epoch:
      parts.append(f'epoch {progress.step / self.steps_per_epoch:.2f}')
    if self.learning_rate is not None:
      parts.append(f'lr {float(self.learning_rate(progress.step)):.3g}')
    parts.append(f"loss {metrics['total_loss']:.4f}")
    parts += [f'{label} {metrics[key]:.4g}' for key, label in self.LABELS if key in metrics]
    if seconds_per_step:
      eta = (progress.total_steps - progress.step) * seconds_per_step
      parts += [f'{self.global_batch_size / seconds_per_step:.0f} img/s',
                f'ETA {format_duration(eta)}']
    return parts


class StopRequest(threading.Event):
  """A threading.Event set by a stop signal; `signal_number` says which (None: set by a call)."""

  signal_number = None


class stop_on_signals:  # noqa: N801  (a context manager, named like one)
  """While training runs, SIGTERM (the preemption notice of cloud VMs), SIGHUP (the terminal
  closed) and a first Ctrl-C (SIGINT) set `event` (a StopRequest): the loop saves at the next
  step boundary and stops. A second Ctrl-C ends the process at once (exit code 130), without
  saving."""

  SIGNALS = interrupts.SIGNALS  # SIGTERM, SIGINT (Ctrl-C), SIGHUP (the terminal closed)

  def __init__(self, event):
    self.event = event
    self.previous = {}

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.event.is_set():
      # At once: unwinding from here (the first call traces, its threads hold locks) printed a
      # traceback or blocked for minutes. The run lock is removed on the way out.
      interrupts.second_ctrl_c()
    self.event.signal_number = signum
    self.event.set()
    if signum == signal.SIGINT:
      logging.warning('Ctrl-C: saving a checkpoint at the next step boundary, then stopping '
                      '(Ctrl-C again to stop at once, without saving).')

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    # From the command line, a second Ctrl-C is seen even while a call runs (interrupts.py).
    interrupts.set_training(True)
    return self

  def __exit__(self, *exc):
    interrupts.set_training(False)
    for number, handler in self.previous.items():
      signal.signal(number, handler)
