"""One experiment from one frozen `Config`: builds the strategy, data, model, optimizer and loss,
then trains (evaluating at the end) or evaluates a run's checkpoints as they appear.

`settings.config_of` turns flag values into a Config; a notebook can build one directly (every
field has the flag's default) and call `run(config)`.
"""
import contextlib
import dataclasses
import os
import time
import traceback
import types

from absl import logging
import tensorflow as tf

import checkpoints
import data as data_lib
import distribution as distribution_lib
import evaluation as evaluation_lib
import files
import model as model_lib
import objective as objective_lib
import run_lock
import run_record
import schema
import trainer as trainer_lib


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run depends on, grouped by the module that consumes it.

  flags: the run's flag values, recorded as model_dir/flags.json (with 'resolved_loss').
  """
  model_dir: str
  mode: str = 'train'  # 'train' | 'eval' | 'train_then_eval'
  # 'pretrain' | 'finetune'
  train_mode: str = schema.setting('pretrain', defines_run=True, eval_inherits=True)
  checkpoint: str | None = None  # another run's checkpoint or export to initialize from
  start_over: bool = False  # train from step 0 over unreadable checkpoints (moved aside)
  allow_flag_changes: tuple = ()  # run-defining flags that may differ from the recorded run's
  data: data_lib.DataConfig = data_lib.DataConfig()
  model: model_lib.ModelConfig = model_lib.ModelConfig()
  objective: objective_lib.ObjectiveConfig = objective_lib.ObjectiveConfig()
  optimizer: trainer_lib.OptimizerConfig = trainer_lib.OptimizerConfig()
  loop: trainer_lib.LoopConfig = trainer_lib.LoopConfig()
  eval: evaluation_lib.EvalConfig = evaluation_lib.EvalConfig()
  distribution: distribution_lib.DistributionConfig = distribution_lib.DistributionConfig()
  flags: types.MappingProxyType = dataclasses.field(
      default_factory=lambda: types.MappingProxyType({}))

  @property
  def pretrain(self):
    return self.train_mode == 'pretrain'


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the data and the machine decide about a run, before the model is built."""
  strategy: tf.distribute.Strategy
  builder: object  # the TFDS builder
  info: data_lib.DatasetInfo
  chief: bool
  write_dir: str
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int
  jit_compile: bool
  augment_on: str = 'host'  # --augment_on resolved for the device: 'host' or 'device'


def check_batch_size(global_batch_size, num_replicas, num_examples, split):
  """Raises ValueError unless the batch divides over the replicas and fits in the split."""
  if global_batch_size % num_replicas:
    raise ValueError(f'--train_batch_size={global_batch_size} is not divisible by the '
                     f'{num_replicas} replicas; use a multiple of {num_replicas}')
  if not num_examples:
    raise ValueError(f'--train_split={split!r} holds no images')
  if global_batch_size > num_examples:
    raise ValueError(f'--train_batch_size={global_batch_size} is larger than split {split!r} '
                     f'({num_examples} images)')


def run(config):
  """Runs the job `config` describes; returns its results dict.

  Process-wide effects a caller (a notebook) sees: the Keras dtype policy is the run's while it
  runs and the caller's again after; Python's, NumPy's and TensorFlow's global random
  generators are seeded from the config's seed; `deterministic` turns TensorFlow's op
  determinism on for the rest of the process (TensorFlow has no public switch back).
  """
  lock = setup = None
  created = not tf.io.gfile.exists(config.model_dir)
  callers_policy = tf.keras.mixed_precision.global_policy()
  try:
    setup = prepare(config)
    if config.mode != 'eval' and setup.chief:
      # One training run per model_dir; a multi-worker job is one run (its chief holds it).
      lock = run_lock.RunLock(config.model_dir).acquire()
      checkpoints.remove_stale_saves(config.model_dir)
    elif setup.chief:  # beside training, but one evaluation job per log directory
      lock = run_lock.evaluation_lock(config.model_dir, _evaluation_logdir(config)).acquire()
    with setup.strategy.scope():
      model = model_lib.build_model(
          dataclasses.replace(config.model, num_classes=setup.info.num_classes),
          config.data.image_size)
    if config.mode == 'eval':
      return evaluate_checkpoints(config, setup, model)
    return train_and_evaluate(config, setup, model)
  finally:
    if lock is not None:
      lock.release()
    # A non-chief worker's own save directory, also when the job stopped early (preempted, a
    # dead peer): only the chief's checkpoints are resumed from.
    if setup is not None and not setup.chief and tf.io.gfile.exists(setup.write_dir):
      tf.io.gfile.rmtree(setup.write_dir)
    # The compute policy is process-global: a caller (a notebook, the tests) gets its own back.
    tf.keras.mixed_precision.set_global_policy(callers_policy)
    if created and (setup is None or setup.chief):  # bad input leaves no empty model_dir
      _remove_if_empty(config.model_dir)


def _remove_if_empty(directory):
  try:
    if tf.io.gfile.isdir(directory) and not tf.io.gfile.listdir(directory):
      tf.io.gfile.rmtree(directory)
  except (tf.errors.OpError, OSError):
    pass


def prepare(config):
  """The strategy, the data's description, the seeds, model_dir and the compute policy."""
  if config.loop.deterministic:
    tf.config.experimental.enable_op_determinism()
  # First: multi-worker collectives must be configured before any other TensorFlow work.
  strategy = distribution_lib.build_strategy(config.distribution)
  if config.mode == 'eval' and config.checkpoint:
    checkpoints.resolve_evaluated(config.checkpoint)  # names a missing one before the data
  builder = _builder(config.data)
  with _naming_the_data(config):  # describe may scan the ids of the training split
    info = data_lib.describe(builder, config.data.train_split, config.data.eval_split,
                             config.data.num_classes, config.data.label_offset)
  if info.label_offset:
    logging.info('Labels: each record\'s label minus %d (--label_offset).', info.label_offset)
  # Seeded after the data is prepared: preparing it draws from the global random generators.
  tf.keras.utils.set_random_seed(config.loop.seed)
  # The global TF seed stays seed + 1, as in the runs the README reports (an older workaround;
  # data.py's shuffles now seed themselves from --seed alone).
  tf.random.set_seed(config.loop.seed + 1)
  chief = distribution_lib.is_chief(strategy)
  _log_setup(config, strategy, info)
  check_batch_size(config.loop.train_batch_size, strategy.num_replicas_in_sync,
                   info.num_train_examples, config.data.train_split)
  if not info.num_eval_examples:
    raise ValueError(f'--eval_split={config.data.eval_split!r} holds no images of dataset '
                     f'{info.name!r}')
  if config.eval.knn_monitor and not info.label_key:
    raise ValueError(f'--knn_monitor needs labels; dataset {info.name!r} has none')
  if config.loop.eval_every(1) and config.mode != 'eval' and not info.label_key:
    raise ValueError(f'--eval_every_epochs/--eval_every_steps evaluate with labels; dataset '
                     f'{info.name!r} has none')
  if config.mode == 'eval' and not config.checkpoint and not tf.io.gfile.isdir(config.model_dir):
    raise ValueError(f'--model_dir={config.model_dir!r} does not exist: --mode=eval evaluates '
                     'the checkpoints of a training run there (check the path, or start the '
                     'training run first)')
  write_dir = checkpoints.prepare_write_dir(config.model_dir, chief,
                                            distribution_lib.task_id(strategy))
  steps_per_epoch = data_lib.steps_per_epoch(info.num_train_examples,
                                             config.loop.train_batch_size)
  total_steps = config.loop.total_steps(steps_per_epoch)
  # --mode=eval trains nothing: no schedule (nor a warning that its warm-up is too long).
  warmup_steps = (0 if config.mode == 'eval' else
                  trainer_lib.warmup_steps(config.optimizer, steps_per_epoch, total_steps))
  policy, jit_compile = distribution_lib.resolve_precision_and_jit(
      strategy, config.distribution.mixed_precision, config.distribution.jit_compile)
  tf.keras.mixed_precision.set_global_policy(policy)
  logging.info('Compute dtype policy %s; XLA %s.', policy, 'on' if jit_compile else 'off')
  augment_on = distribution_lib.resolve_augment_on(strategy, config.data.augment_on)
  logging.info('Flips, color distortion and blur run on the %s.', augment_on)
  return Setup(strategy, builder, info, chief, write_dir, steps_per_epoch, total_steps,
               warmup_steps, jit_compile, augment_on)


def _builder(data):
  """data_lib.get_builder, its failures to read the prepared metadata (a garbled
  dataset_info.json, a data_dir that cannot be reached) named by dataset and --data_dir."""
  from google.protobuf import json_format  # noqa: PLC0415  (TensorFlow's own dependency)

  try:
    return data_lib.get_builder(data.dataset, data.data_dir, data.fashion_mnist_dir)
  except json_format.ParseError as e:
    raise ValueError(f'dataset {data.dataset} under --data_dir={data.data_dir!r}: a metadata file '
                     'of the prepared dataset (dataset_info.json or features.json) is not valid '
                     f'({checkpoints.short_reason(e)}); prepare the dataset again '
                     '(docs/datasets.md)') from None
  except (tf.errors.OpError, OSError) as e:
    raise ValueError(f'reading the metadata of dataset {data.dataset} under --data_dir='
                     f'{data.data_dir!r} failed ({checkpoints.short_reason(e)}); check the path '
                     '(and the network, for gs://), or prepare the dataset again '
                     '(docs/datasets.md)') from None


def _log_setup(config, strategy, info):
  # Only pretraining uses a contrastive loss (an evaluation job does not even know the run's).
  if config.mode == 'eval':
    loss_text = 'n/a (eval)'
  else:
    loss_text = config.objective.loss if config.pretrain else 'n/a (finetune)'
  logging.info('Strategy %s with %d replica(s); loss %s; dataset %s: %d train / %d eval images, '
               '%d classes', type(strategy).__name__, strategy.num_replicas_in_sync, loss_text,
               info.name, info.num_train_examples, info.num_eval_examples, info.num_classes)


class _WriterOnFirstUse:
  """A summary file writer made at its first use (making one creates the events file): a run
  stopped before it writes a summary (bad data in its first batch) leaves no file behind."""

  def __init__(self, logdir):
    self.logdir = logdir
    self._writer = None

  def as_default(self, step=None):
    if self._writer is None:
      self._writer = tf.summary.create_file_writer(self.logdir)
    return self._writer.as_default(step=step)

  def flush(self):
    if self._writer is not None:
      self._writer.flush()


def _summary_writer(config, setup):
  if setup.chief:
    return _WriterOnFirstUse(config.model_dir)
  return tf.summary.create_noop_writer()


def _named_logdir(config):
  """model_dir, or model_dir/eval_<name> with --eval_name."""
  if config.eval.eval_name:
    return os.path.join(config.model_dir, f'eval_{config.eval.eval_name}')
  return config.model_dir


def _evaluator(config, setup, model, summary_writer, logdir=None):
  """The evaluator writing its summaries and Projector files to `logdir` (default:
  _named_logdir)."""
  logdir = logdir or _named_logdir(config)
  if logdir != config.model_dir and setup.chief:
    summary_writer = tf.summary.create_file_writer(logdir)
    tf.io.gfile.makedirs(logdir)
    files.write_atomically(os.path.join(logdir, SPLIT_FILE), config.data.eval_split + '\n')
  # The projector's sample is this host's features: one host writes it, for the whole split.
  single_host = setup.chief and distribution_lib.num_hosts(setup.strategy) == 1
  # A hung peer blocks an evaluation's collectives as it blocks a train step's.
  watchdog = (trainer_lib.CallWatchdog(config.loop.step_timeout_seconds)
              if distribution_lib.num_workers(setup.strategy) > 1 else None)
  return evaluation_lib.Evaluator(setup.strategy, model, setup.builder, setup.info, config.eval,
                              data=config.data, weight_decay=config.optimizer.weight_decay,
                              summary_writer=summary_writer,
                              projector_dir=logdir if single_host else None, watchdog=watchdog)


def _export(config, setup, model, step):
  checkpoints.export(model, step, setup.write_dir, image_size=config.data.image_size,
                     keep=config.loop.keep_hub_module_max,
                     flags_file=run_record.flags_path(config.model_dir),
                     chief=setup.chief)


def train_and_evaluate(config, setup, model):
  """Trains from model_dir's newest checkpoint (or --checkpoint, or scratch), exports, then
  evaluates (head, kNN) and probes the final model; returns the results."""
  strategy = setup.strategy
  run_record.check_same_run(config, setup.total_steps)
  optimizer, learning_rate, objective, manager = _training_state(config, setup, model)
  initial_step = int(optimizer.iterations.numpy())
  if initial_step > setup.total_steps:
    raise ValueError(f'--train_steps/--train_epochs give {setup.total_steps} steps, fewer than '
                     f'the {initial_step} this run in --model_dir={config.model_dir!r} has '
                     'trained; give its length or longer')
  summary_writer = _summary_writer(config, setup)
  # The run's one training input: the pipeline and the step's augmentations both come from it.
  input_config = train_input_config(config, initial_step, setup.augment_on, setup.info.grey)
  trainer = trainer_lib.Trainer(
      strategy, model, optimizer, objective=objective,
      weight_decay=config.optimizer.weight_decay, jit_compile=setup.jit_compile,
      pixel_augment=input_config.pixel_augment())
  results = {}
  evaluator = _evaluator(config, setup, model, summary_writer)
  if initial_step < setup.total_steps:
    results.update(_train_and_monitor(config, setup, input_config, trainer, manager,
                                      summary_writer,
                                      learning_rate, evaluator))
  else:  # a finished run, rerun: evaluated again; its train_seconds stays in its results
    logging.info('Already trained to step %d; evaluating only.', initial_step)
    if setup.chief:
      run_record.record_start(config, initial_step)
  step = int(optimizer.iterations.numpy())
  _export(config, setup, model, step)
  if not setup.chief:
    tf.io.gfile.rmtree(setup.write_dir)
  results.update(evaluator.evaluate(step))
  logging.info('Final state at step %d: %s', step, checkpoints.state_fingerprint(model, objective))
  # The probe fits on the features one host sees: runs over several hosts skip it.
  if config.pretrain and distribution_lib.num_hosts(strategy) == 1:
    results.update(_probe(config, evaluator, step))
  results['eval_split'] = config.data.eval_split
  # The compute dtypes this start trained in (--mixed_precision=auto chooses by the device).
  results['precision'] = tf.keras.mixed_precision.global_policy().name
  if setup.chief:
    checkpoints.write_results(config.model_dir, step, results)
    run_record.write_hparams(summary_writer, config, step, results)
  return results


def _training_state(config, setup, model):
  """(optimizer, learning-rate schedule, objective, checkpoint manager), restored from
  model_dir's newest checkpoint (or --checkpoint) or initialized."""
  with setup.strategy.scope():
    optimizer, learning_rate = trainer_lib.build_optimizer(
        config.optimizer, model, global_batch_size=config.loop.train_batch_size,
        warmup_steps=setup.warmup_steps, total_steps=setup.total_steps,
        loss_scaling=tf.keras.mixed_precision.global_policy().name == 'mixed_float16')
    # Pretraining's objective, with per-image tables over the split's ids; fine-tuning has none.
    objective = (objective_lib.build(config.objective, setup.info.num_ids, setup.steps_per_epoch)
                 if config.pretrain else None)
    manager = checkpoints.restore_or_initialize(
        model, optimizer, objective, model_dir=config.model_dir, write_dir=setup.write_dir,
        keep_checkpoint_max=config.loop.keep_checkpoint_max, checkpoint=config.checkpoint,
        zero_init_logits_layer=config.model.zero_init_logits_layer,
        start_over=config.start_over, chief=setup.chief)
  return optimizer, learning_rate, objective, manager


def _train_and_monitor(config, setup, input_config, trainer, manager, summary_writer,
                       learning_rate, evaluator):
  """Trains to the last step, evaluating while training if asked; returns the results of it
  (train_seconds, the monitor's evaluations). A run that diverges leaves the run's record of
  its flags as it was and marks its start in the history as diverged."""
  monitored = []
  on_eval = _monitor(config, setup, evaluator, monitored, input_config.initial_step)
  if on_eval is not None and _evaluation_missing(config, setup, input_config.initial_step):
    logging.info('Evaluating step %d first: the stopped run did not record its evaluation.',
                 input_config.initial_step)
    on_eval(input_config.initial_step, 0.0)
  with run_record.kept_on_divergence(config.model_dir, setup.chief,
                                     lambda: int(trainer.optimizer.iterations.numpy())):
    seconds = _train(config, setup, input_config, trainer, manager, summary_writer,
                     learning_rate, on_eval)
  # This process' training: from the step it resumed at (a run stopped and resumed counts each
  # start's seconds in that start's results).
  results = {'train_seconds': round(seconds, 1), 'trained_from_step': input_config.initial_step}
  if monitored:
    results['monitor'] = monitored
    results['monitor_seconds'] = round(sum(r['eval_seconds'] for r in monitored), 1)
  return results


def _evaluation_missing(config, setup, step):
  """Whether the run resumes at `step`, a step to evaluate while training (--eval_every_*),
  without a recorded evaluation of it (a kill during that evaluation, or between the checkpoint
  and it): the resumed run would go past it."""
  eval_every = config.loop.eval_every(setup.steps_per_epoch)
  if not (eval_every and 0 < step < setup.total_steps and step % eval_every == 0):
    return False
  recorded = checkpoints.read_results(config.model_dir, step, config.eval.eval_name)
  return 'eval/knn_top_1' not in recorded


def _probe(config, evaluator, step):
  """The probe's results; {} (and a warning saying why) when the train split has no labels to
  fit it on (STL-10's unlabelled split marks every label -1): the run's other results stand."""
  try:
    return evaluator.probe(step)
  except tf.errors.InvalidArgumentError as e:
    if 'label outside' not in e.message:
      raise
    logging.warning('No linear probe: the train split %r has labels outside [0, %d) (an '
                    'unlabelled split?), which a probe cannot fit on; for a linear evaluation, '
                    'fine-tune from this run on a labelled split (--fine_tune_after_block=4).',
                    config.data.train_split, evaluator.info.num_classes)
    return {'probe/skipped': 'train split without labels in [0, num_classes)'}


def _monitor(config, setup, evaluator, monitored, trained_from_step):
  """on_eval for trainer.train: the head's top-1 and the kNN monitor on the eval split, logged
  with their cost, in the eval/ summaries, result_<step>.json and `monitored` (a list). The
  training seconds so far are this process', from `trained_from_step`."""
  if not config.loop.eval_every(setup.steps_per_epoch):
    return None

  def on_eval(step, train_seconds):
    started = time.time()
    results = evaluator.evaluate(step, knn=True, log=False)
    seconds = time.time() - started
    head = f"{results['eval/top_1']:.4f}" if 'eval/top_1' in results else 'n/a'
    logging.info('Eval at step %d (epoch %.3g): head top-1 %s, kNN top-1 %.4f (took %.1f s, '
                 'training so far %.1f s%s)', step, step / setup.steps_per_epoch, head,
                 results['eval/knn_top_1'], seconds, train_seconds,
                 f' from step {trained_from_step}' if trained_from_step else '')
    record = {'global_step': step, 'epoch': step / setup.steps_per_epoch,
              **{k: results[k] for k in ('eval/top_1', 'eval/knn_top_1') if k in results},
              'eval_seconds': round(seconds, 2), 'train_seconds': round(train_seconds, 1)}
    monitored.append(record)
    if setup.chief:
      checkpoints.write_results(config.model_dir, step, results | {
          'eval_seconds': record['eval_seconds'], 'train_seconds_so_far': record['train_seconds'],
          'trained_from_step': trained_from_step, 'eval_split': config.data.eval_split,
          'precision': tf.keras.mixed_precision.global_policy().name})

  return on_eval


def _train(config, setup, input_config, trainer, manager, summary_writer, learning_rate,
           on_eval=None):
  """The outer training loop over the resumed input pipeline (`input_config`, at the step
  the trainer resumed at); returns the seconds spent."""
  initial_step = int(trainer.optimizer.iterations.numpy())
  assert input_config.initial_step == initial_step, (input_config.initial_step, initial_step)
  if setup.chief and initial_step == 0:  # a resumed run has them from its start
    write_view_pairs(setup, input_config, summary_writer, initial_step)
  dataset = data_lib.build_distributed_dataset(setup.strategy, setup.builder, setup.info,
                                               input_config, setup.info.num_classes)
  stop_requested = trainer_lib.StopRequest()
  iterator = [iter(dataset)]  # the only reference, released on a thread of its own at the end
  try:
    with trainer_lib.stop_on_signals(stop_requested), _naming_the_data(config):
      # Once SIGTERM and Ctrl-C save and stop: a signal after this line is never lost.
      logging.info('Training %s from step %d to %d (%d steps/epoch, warm-up %d steps).',
                   config.train_mode, initial_step, setup.total_steps, setup.steps_per_epoch,
                   setup.warmup_steps)
      seconds = trainer_lib.train(
          trainer, iterator[0], total_steps=setup.total_steps,
          checkpoint_every=config.loop.checkpoint_every(setup.steps_per_epoch),
          checkpoint_manager=manager, summary_writer=summary_writer,
          learning_rate_fn=learning_rate, stop_requested=stop_requested,
          # After the restore and the first steps: flags that cannot resume this model_dir, or
          # data that stops the first batch, never touch flags.json.
          on_started=((lambda: run_record.record_start(config, initial_step))
                      if setup.chief else None),
          on_progress=trainer_lib.ProgressLogger(
              config.loop.train_batch_size, config.loop.log_every_seconds,
              steps_per_epoch=setup.steps_per_epoch, learning_rate=learning_rate),
          eval_every=config.loop.eval_every(setup.steps_per_epoch), on_eval=on_eval,
          watchdog=(trainer_lib.CallWatchdog(config.loop.step_timeout_seconds)
                    if distribution_lib.num_workers(setup.strategy) > 1 else None))
  except BaseException as e:
    _let_go_of_locals(e)  # the traceback's frames would hold the iterator until it is reported
    raise
  finally:
    data_lib.release_in_background(iterator)
  return seconds


def _let_go_of_locals(error):
  """Clears the local variables of the finished frames in the tracebacks of `error` and the
  errors it chains (a stop by SIGTERM, divergence or bad data, as the run ends): the error is
  reported with its lines intact, and what the frames held goes now."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    traceback.clear_frames(error.__traceback__)  # skips the frames still running
    error = error.__cause__ or error.__context__


VIEW_PAIRS = 4  # images shown by write_view_pairs


def write_view_pairs(setup, input_config, summary_writer, step, num_images=VIEW_PAIRS):
  """An image summary train/augmented_views of the first `num_images` training images as the
  step sees them (pretraining: the two views side by side), each with the augmentations of its
  position in the first epoch.

  Computed eagerly with stateless random ops: the training data and every later random draw
  stay unchanged.
  """
  # No cache filled only in part: a few records read, no more. The host applies every
  # augmentation, so the images are the pixels the step sees.
  input_config = dataclasses.replace(input_config, cache_dataset=False, augment_on='host')
  views = data_lib.first_elements(setup.builder, setup.info, input_config,
                                  setup.info.num_classes, num_images)['views']
  with summary_writer.as_default(step=step):
    tf.summary.image('train/augmented_views', tf.concat(views, 2), max_outputs=num_images)


@contextlib.contextmanager
def _naming_the_data(config):
  """Read failures of the training pipeline (a missing or truncated shard) name the dataset."""
  try:
    yield
  except tf.errors.FailedPreconditionError as e:
    # A shard holding fewer records than the dataset's metadata lists (TFDS checks the count).
    if 'expected to contain' not in e.message:
      raise
    data = config.data
    raise ValueError(
        f'reading dataset {data.dataset} split {data.train_split} under --data_dir='
        f'{data.data_dir!r} failed: its shards hold fewer records than its dataset_info.json '
        f'lists ({e.message.strip().splitlines()[0]}); a shard was cut short or replaced: '
        'prepare the dataset again (docs/datasets.md)') from None
  except (tf.errors.DataLossError, tf.errors.NotFoundError) as e:
    data = config.data
    raise ValueError(
        f'reading dataset {data.dataset} split {data.train_split} under --data_dir='
        f'{data.data_dir!r} failed ({type(e).__name__}: {e.message.strip().splitlines()[0]}); '
        'prepare the dataset again (docs/datasets.md)') from None


def train_input_config(config, initial_step, augment_on='host', grey=False):
  """The training pipeline's InputConfig, resuming at `initial_step`; augment_on: 'host' or
  'device' (where flips, color distortion and blur run); grey: the dataset's images are grey."""
  data, loop = config.data, config.loop
  return data_lib.InputConfig(
      split=data.train_split, global_batch_size=loop.train_batch_size,
      image_size=data.image_size, is_training=True, num_views=2 if config.pretrain else 1,
      # SimCLR fine-tunes with crops and flips only.
      color_distort=config.pretrain, color_jitter_strength=data.color_jitter_strength,
      crop_area_min=data.crop_area_min, random_flip=data.random_flip,
      use_blur=data.use_blur and config.pretrain, grey=grey,
      cache_dataset=data.cache_dataset, seed=loop.seed, deterministic=loop.deterministic,
      initial_step=initial_step, shuffle_buffer=data.shuffle_buffer, augment_on=augment_on,
      labels_required=not config.pretrain or config.model.lineareval_while_pretraining,
      # Ids index the per-image tables: two records with one id would share a slot.
      unique_ids=config.pretrain and config.objective.per_image)


def evaluate_checkpoints(config, setup, model):
  """--mode=eval: evaluates (and exports) every checkpoint in model_dir once, in step order,
  including those that appear meanwhile; returns after the one of the final step (or after
  eval_timeout_seconds without a new one).

  Only the model is restored (restore_model) and the step is read from the checkpoint
  (checkpoint_step), so the training run's optimizer and loss flags are not needed. Only the
  chief writes result_<step>.json; another worker's export directory is removed at the end.
  """
  evaluator = _evaluator(config, setup, model, _summary_writer(config, setup),
                         _evaluation_logdir(config))
  if setup.chief:
    checkpoints.remove_abandoned_exports(config.model_dir)
  if config.checkpoint:
    return _evaluate_one(config, setup, model, evaluator)
  results, damaged = None, []
  for path in checkpoints.iterate_checkpoints(config.model_dir,
                                              config.eval.eval_timeout_seconds):
    try:
      step = checkpoints.checkpoint_step(path)
      checkpoints.restore_model(model, path)
    except ValueError as e:
      raise ValueError(f"--model_dir={config.model_dir!r}: {e}; give the training run's model "
                       'flags (its flags.json lists them) or leave them out') from None
    except tf.errors.NotFoundError:
      # The training run keeps its newest checkpoints only: this one went before its turn.
      logging.warning('%s was deleted before it could be evaluated; skipped.', path)
      continue
    except tf.errors.OpError as e:  # a damaged index or data file
      damaged.append(f'{os.path.basename(path)} ({checkpoints.short_reason(e)})')
      logging.warning('%s cannot be read (%s); skipped.', path, checkpoints.short_reason(e))
      continue
    results = {**evaluator.evaluate(step), 'eval_split': config.data.eval_split}
    if setup.chief:
      checkpoints.write_results(config.model_dir, step, results)
    _export(config, setup, model, step)
    if step >= setup.total_steps:
      break
  else:
    if results is not None:
      logging.warning(
          'Stopped waiting: no new checkpoint in --model_dir=%s for --eval_timeout_seconds=%s; '
          'the newest evaluated is step %d of the run\'s %d (a longer --eval_timeout_seconds '
          'waits for a run still training).', config.model_dir,
          config.eval.eval_timeout_seconds, results['global_step'], setup.total_steps)
  if not setup.chief:
    tf.io.gfile.rmtree(setup.write_dir)
  if results is None and damaged:
    raise ValueError(f'--model_dir={config.model_dir!r} holds no checkpoint that can be read: '
                     + '; '.join(damaged))
  if results is None:
    raise ValueError(f'no checkpoint to evaluate appeared in --model_dir={config.model_dir!r} '
                     f'within --eval_timeout_seconds={config.eval.eval_timeout_seconds}')
  return results


# In an evaluation log directory other than model_dir: the split its summaries and Projector
# files are of (model_dir's is its flags.json's --eval_split).
SPLIT_FILE = 'eval_split.txt'


def _evaluation_logdir(config):
  """Where --mode=eval writes summaries and Projector files, so that no directory holds two
  splits': eval_<name> with --eval_name, or eval_<name>_<split> when eval_<name> holds another
  split; eval_<split> without a name, on another split than the training run's own (its
  flags.json's --eval_split); else model_dir, beside the training run's evaluations."""
  split = config.data.eval_split
  try:
    own = (run_record.read_flags(config.model_dir)[0] or {}).get('eval_split')
  except ValueError:
    own = None
  if config.eval.eval_name:
    logdir = _named_logdir(config)
    held = _logdir_split(logdir, own)
    if held is None or held == split:
      return logdir
    return f'{logdir}_{checkpoints.file_name_part(split)}'
  if own is not None and own != split:
    return os.path.join(config.model_dir, f'eval_{checkpoints.file_name_part(split)}')
  return config.model_dir


def _logdir_split(logdir, training_split):
  """The split evaluation log directory `logdir` holds: its SPLIT_FILE's, else (written by
  training's evaluations, which name no split) `training_split`; None when it does not exist."""
  path = os.path.join(logdir, SPLIT_FILE)
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      return f.read().strip()
  return training_split if tf.io.gfile.isdir(logdir) else None


def _evaluate_one(config, setup, model, evaluator):
  """--mode=eval --checkpoint=<checkpoint prefix or SavedModel export>: evaluates it once and
  writes model_dir/result_<step>.json (every variable of the model must be in it)."""
  path, step = checkpoints.resolve_evaluated(config.checkpoint)
  try:
    checkpoints.restore_model(model, path)
  except ValueError as e:
    raise ValueError(f'--checkpoint={config.checkpoint!r}: {e}; give the training run\'s model '
                     'flags (its flags.json lists them) or leave them out') from None
  logging.info('Evaluating %s (step %d).', config.checkpoint, step)
  results = {**evaluator.evaluate(step), 'checkpoint': config.checkpoint,
             'eval_split': config.data.eval_split}
  if setup.chief:
    checkpoints.write_results(config.model_dir, step, results)
  else:
    tf.io.gfile.rmtree(setup.write_dir)
  return results


def summary_line(results, eval_split):
  """The run's headline numbers, one line."""
  parts = []
  if 'train_seconds' in results:
    resumed = results.get('trained_from_step')
    parts.append(f"trained in {results['train_seconds']:.0f} s"
                 + (f' (from step {resumed}, where it resumed)' if resumed else ''))
  if 'eval/top_1' in results:
    parts.append(f"linear head top-1 {results['eval/top_1']:.4f} on {eval_split}")
  if 'eval/knn_top_1' in results:
    parts.append(f"kNN top-1 {results['eval/knn_top_1']:.4f}")
  if 'probe/top_1' in results:
    text = f"linear probe on frozen features top-1 {results['probe/top_1']:.4f}"
    baselines = evaluation_lib.baseline_texts(results)
    if baselines:
      text += f" (baselines: {', '.join(baselines)})"
    parts.append(text)
  return 'Result: ' + '; '.join(parts) if parts else 'Result: nothing evaluated'
