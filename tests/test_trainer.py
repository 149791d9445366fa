"""trainer.py: the distributed train step, the traced many-steps loop (no host calls), the outer
loop `train` (checkpoint boundaries, steps per call, stop requests, non-finite losses, progress)
and the whole training API driven from a notebook-like script without run.py or flags."""
import glob
import os
import re
import signal
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

import checkpoints
import data as data_lib
import data_util
import lars_optimizer
import model as model_lib
import objective
import summaries
import trainer as trainer_lib


def lars_trainer(strategy, config, mode, initial_weights=None, jit_compile=False,
                 pixel_augment=None):
  """(Trainer of a tiny model under LARS for loss `mode` with a 20-image u table, the initial
  weights): the model starts from `initial_weights` when given, else from its own."""
  with strategy.scope():
    model = model_lib.build_model(config, 16)
    if initial_weights is None:
      initial_weights = model.get_weights()
    model.set_weights(initial_weights)
    optimizer = lars_optimizer.build_optimizer('lars', 0.01, weight_decay=1e-4)
    optimizer.build(model.trainable_variables)
    # Fine-tuning has no objective.
    loss = None if mode == 'finetune' else objective.build(
        objective.ObjectiveConfig(loss=mode, temperature=0.1, gamma=0.9), 20, None)
  trainer = trainer_lib.Trainer(strategy, model, optimizer, objective=loss, weight_decay=1e-4,
                                jit_compile=jit_compile, pixel_augment=pixel_augment)
  return trainer, initial_weights


# The whole step (trunk, global BatchNorm, heads, LARS) with an objective and without; each
# objective's own cross-replica path is test_objective.py's two-replica test.
@pytest.mark.slow  # about 20 s per mode
@pytest.mark.parametrize('mode', ['sogclr', 'finetune'])
def test_two_replica_train_steps_equal_one_replica(mode, one_replica, two_replicas,
                                                   tiny_model_config):
  # Seeded initial weights: three LARS steps amplify float32 round-off (the two replicas sum
  # in another order) more for some initializations than others; the test must not depend on
  # the random state earlier tests leave behind.
  tf.keras.utils.set_random_seed(1)
  rng = np.random.default_rng(0)
  global_batch = 8
  num_views = 1 if mode == 'finetune' else 2
  views = tuple(rng.uniform(size=(3 * global_batch, 16, 16, 3)).astype(np.float32)
                for _ in range(num_views))
  labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 3 * global_batch)]
  ids = np.concatenate([rng.permutation(20)[:global_batch] for _ in range(3)]).astype(np.int32)
  config = tiny_model_config(global_bn=True,
                             train_mode='finetune' if mode == 'finetune' else 'pretrain')
  initial_weights = None
  final = {}
  for replicas, strategy in ((1, one_replica), (2, two_replicas)):
    trainer, initial_weights = lars_trainer(strategy, config, mode, initial_weights)
    model, sogclr = trainer.model, trainer.objective
    dataset = tf.data.Dataset.from_tensor_slices(data_lib.batch(views, labels, ids)).batch(
        global_batch)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    first = trainer.train_loop(iterator, 1)
    after_first = [v.numpy() for v in model.variables]
    rest = trainer.train_loop(iterator, 2)
    # LARS decays inside the optimizer: the reported penalty is that of the final weights.
    penalty = 1e-4 * sum(0.5 * np.sum(np.square(v.numpy())) for v in model.trainable_variables
                         if v.path.split('/')[-1] not in ('gamma', 'beta', 'bias'))
    np.testing.assert_allclose(rest['weight_decay'], penalty, rtol=1e-5)
    names = [v.path for v in model.variables]
    u = strategy.experimental_local_results(sogclr.log_u) if mode == 'sogclr' else []
    final[replicas] = (first, rest, [v.numpy() for v in model.variables],
                       [x.numpy() for x in u], after_first)
  one, two = final[1], final[2]
  assert ('contrast_loss' in one[0]) == (mode != 'finetune')
  for key in one[0]:
    np.testing.assert_allclose(two[0][key], one[0][key], rtol=1e-4, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(two[1][key], one[1][key], rtol=1e-3, atol=1e-4, err_msg=key)
  # Every weight and BN statistic: float32 round-off after one step (sums in another order);
  # three steps of LARS amplify it, still far below any real error (a wrong scale or a lost
  # gradient through the gather moves weights by ~lr).
  for a, b, name in zip(two[4], one[4], names):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
  for a, b, name in zip(two[2], one[2], names):
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3, err_msg=name)
  for table in two[3]:  # both replicas' copies of u equal the single device's
    np.testing.assert_allclose(table, one[3][0], rtol=1e-4)


@pytest.mark.slow  # about 8 s
def test_objective_loss_is_what_the_step_minimizes_and_contrast_loss_the_batch_nt_xent(
    one_replica, tiny_model_config):
  # The tag once named contrastive_objective held SogCLR's surrogate, which is not the
  # objective (-0.067 in examples/pretrain_from_python.py's output): it is objective_loss, and
  # contrast_loss is the batch NT-Xent for every loss.
  rng = np.random.default_rng(0)
  views = tuple(rng.uniform(size=(8, 16, 16, 3)).astype(np.float32) for _ in range(2))
  labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 8)]
  ids = rng.permutation(20)[:8].astype(np.int32)
  dataset = tf.data.Dataset.from_tensor_slices(data_lib.batch(views, labels, ids)).batch(8)
  metrics = {}
  for mode in ('simclr', 'sogclr'):
    tf.keras.utils.set_random_seed(1)
    trainer, _ = lars_trainer(one_replica, tiny_model_config(), mode)
    metrics[mode] = trainer.train_loop(iter(one_replica.experimental_distribute_dataset(dataset)),
                                       1)
    assert set(trainer.metric_names()) <= set(metrics[mode])
  simclr, sogclr = metrics['simclr'], metrics['sogclr']
  np.testing.assert_allclose(simclr['objective_loss'], simclr['contrast_loss'], rtol=1e-6)
  # The same weights and batch: the same NT-Xent; SogCLR's surrogate is another number.
  np.testing.assert_allclose(sogclr['contrast_loss'], simclr['contrast_loss'], rtol=1e-5)
  assert abs(sogclr['objective_loss'] - sogclr['contrast_loss']) > 1.0


HOST_CALL_OPS = {'PyFunc', 'PyFuncStateless', 'EagerPyFunc'}


def traced_ops(concrete_function):
  """(the op types of the function graph and of every function it calls, how many functions
  it calls)."""
  graph = concrete_function.graph
  ops = [op.type for op in graph.get_operations()]
  library = graph.as_graph_def().library.function
  return ops + [node.op for function in library for node in function.node_def], len(library)


def host_call_ops(concrete_function):
  """Ops of the function graph and of every function it calls that run Python on the host."""
  ops, num_functions = traced_ops(concrete_function)
  return sorted({op for op in ops if op in HOST_CALL_OPS}), num_functions


def test_host_call_detector_finds_a_py_function_inside_the_replicated_loop(two_replicas):
  # The check below must be able to fail: the same structure with one tf.py_function.
  with two_replicas.scope():
    variable = tf.Variable(0.0)

  def step():
    variable.assign_add(tf.py_function(lambda: np.float32(1.0), [], tf.float32))

  @tf.function
  def loop(num_steps):
    for _ in tf.range(num_steps):
      two_replicas.run(step)

  found, _ = host_call_ops(loop.get_concrete_function(tf.constant(2)))
  assert found == ['EagerPyFunc']


@pytest.mark.slow
def test_traced_train_loop_has_no_host_calls_and_the_step_once(two_replicas, tiny_model_config):
  # SogCLR's step computes SimCLR's similarities and logits plus the u table, and pretraining
  # traces the supervised head too: one trace covers the ops of every mode.
  with two_replicas.scope():
    model = model_lib.build_model(tiny_model_config(train_mode='pretrain'), 16)
    optimizer = lars_optimizer.build_optimizer('lars', 0.01, weight_decay=1e-4)
    optimizer.build(model.trainable_variables)
    sogclr = objective.SogCLRLoss(64, 0.1, 0.9)
  trainer = trainer_lib.Trainer(two_replicas, model, optimizer, objective=sogclr,
                                weight_decay=1e-4)
  views = (np.zeros([64, 16, 16, 3], np.float32),) * 2
  dataset = tf.data.Dataset.from_tensor_slices(data_lib.batch(
      views, np.zeros([64, 10], np.float32), np.arange(64, dtype=np.int32))).batch(
          8, drop_remainder=True)
  iterator = iter(two_replicas.experimental_distribute_dataset(dataset))
  concrete = trainer._loop.get_concrete_function(  # pylint: disable=protected-access
      iterator, tf.constant(2, tf.int32))
  found, num_functions = host_call_ops(concrete)
  assert num_functions > 0  # the tf.range loop body is a nested function: it was searched
  assert not found, f'the train loop calls the host: {found}'
  # One forward convolution per kernel and replica: the step is in the graph once, inside the
  # loop (a first step peeled off before it doubled the graph to trace and optimize).
  kernels = sum(len(v.shape) == 4 for v in model.trainable_variables)
  assert traced_ops(concrete)[0].count('Conv2D') == 2 * kernels


# The outer loop, `trainer.train`.


def test_steps_per_call_traces_with_two_then_aims_at_the_target_seconds():
  sizer = trainer_lib.StepsPerCall(target_seconds=1.0, max_steps=100)
  assert sizer.steps == 1 and sizer.seconds_per_step is None
  # The first call traces: its time says nothing about a step; the second call runs two.
  assert sizer.update(30.0, 1, includes_tracing=True) == 2
  assert sizer.seconds_per_step is None
  # Then about target_seconds / seconds_per_step ...
  assert sizer.update(0.2, 2, includes_tracing=False) == 10
  assert sizer.seconds_per_step == pytest.approx(0.1)
  assert sizer.update(1.0, 10, includes_tracing=False) == 10
  # ... smoothed: 0.7 x the previous estimate + 0.3 x this call's (0.3 s a step): 0.16 s.
  assert sizer.update(3.0, 10, includes_tracing=False) == 6
  assert sizer.seconds_per_step == pytest.approx(0.7 * 0.1 + 0.3 * 0.3)
  # Never fewer than one step, however slow ...
  assert sizer.update(60.0, 6, includes_tracing=False) == 1
  assert sizer.seconds_per_step == pytest.approx(0.7 * 0.16 + 0.3 * 10)
  assert sizer.steps == 1
  # ... nor more than max_steps, however fast.
  fast = trainer_lib.StepsPerCall(target_seconds=1.0, max_steps=100)
  fast.update(5.0, 1, includes_tracing=True)
  assert fast.update(0.001, 2, includes_tracing=False) == 100
  assert trainer_lib.StepsPerCall(target_seconds=2.0).update(0.5, 2, False) == 8


def test_call_steps_never_passes_the_total_or_a_checkpoint():
  assert trainer_lib.call_steps(0, 1, 10, 3) == (1, 3)
  assert trainer_lib.call_steps(1, 2, 10, 3) == (2, 3)
  assert trainer_lib.call_steps(3, 100, 10, 3) == (3, 6)
  assert trainer_lib.call_steps(9, 100, 10, 3) == (1, 12)
  for total in range(1, 13):
    for every in range(1, 13):
      for steps_per_call in range(1, 14):
        for step in range(total):
          num_steps, next_checkpoint = trainer_lib.call_steps(step, steps_per_call, total, every)
          assert next_checkpoint % every == 0 and step < next_checkpoint <= step + every
          assert 1 <= num_steps <= steps_per_call and step + num_steps <= total
          # It ends at the next checkpoint or the end, or runs all it was asked to.
          end = step + num_steps
          assert end in (next_checkpoint, total) or num_steps == steps_per_call
          assert end <= next_checkpoint


@pytest.fixture(scope='module')
def tiny_training(one_replica, tiny_model_config):
  """start(images) -> (trainer, distributed iterator, learning-rate schedule): a fine-tuning
  tiny model with Adam, reset to the same initial weights and optimizer state at every start,
  and batches of 8 of `images` [N, 16, 16, 3] in order (random labels).

  One Trainer for the module: its loop is traced once, not once per test.
  """
  strategy = one_replica
  with strategy.scope():
    model = model_lib.build_model(tiny_model_config(train_mode='finetune'), 16)
    optimizer, learning_rate = trainer_lib.build_optimizer(
        trainer_lib.OptimizerConfig(name='adam', learning_rate=0.01, warmup_epochs=0), model,
        global_batch_size=8, warmup_steps=0, total_steps=10)
  trainer = trainer_lib.Trainer(strategy, model, optimizer, weight_decay=1e-4)
  initial = [v.numpy() for v in (*model.variables, *optimizer.variables)]

  def start(images):
    for variable, value in zip((*model.variables, *optimizer.variables), initial, strict=True):
      variable.assign(value)
    labels = np.eye(10, dtype=np.float32)[np.random.default_rng(0).integers(0, 10, len(images))]
    dataset = tf.data.Dataset.from_tensor_slices(data_lib.batch(
        (images,), labels, np.arange(len(images), dtype=np.int32))).batch(8,
                                                                          drop_remainder=True)
    return trainer, iter(strategy.experimental_distribute_dataset(dataset)), learning_rate

  return start


def uniform_images(count):
  return np.random.default_rng(1).uniform(size=(count, 16, 16, 3)).astype(np.float32)


def checkpoint_manager(trainer, directory):
  """A manager keeping every checkpoint, so the test sees each one written."""
  state = tf.train.Checkpoint(model=trainer.model, optimizer=trainer.optimizer)
  return tf.train.CheckpointManager(state, directory, max_to_keep=None)


def written_steps(directory):
  return sorted(int(re.search(r'ckpt-(\d+)\.index$', path).group(1))
                for path in glob.glob(os.path.join(directory, 'ckpt-*.index')))


@pytest.mark.slow
def test_train_checkpoints_every_boundary_and_the_end_and_no_call_crosses_one(
    tmp_path, tiny_training):
  trainer, iterator, learning_rate = tiny_training(uniform_images(80))
  manager = checkpoint_manager(trainer, str(tmp_path / 'run'))
  writer = tf.summary.create_file_writer(str(tmp_path / 'run'))
  progress = []
  seconds = trainer_lib.train(trainer, iterator, total_steps=10, checkpoint_every=3,
                              checkpoint_manager=manager, summary_writer=writer,
                              learning_rate_fn=learning_rate, on_progress=progress.append)
  assert seconds > 0
  assert written_steps(str(tmp_path / 'run')) == [3, 6, 9, 10]
  for step in (3, 6, 9, 10):
    assert checkpoints.checkpoint_step(str(tmp_path / 'run' / f'ckpt-{step}')) == step
  assert int(trainer.optimizer.iterations.numpy()) == 10
  steps = [p.step for p in progress]
  # One traced step, then two, then as many as fit in about a second, never past a checkpoint.
  assert steps[:2] == [1, 3] and steps[-1] == 10 and {3, 6, 9} <= set(steps)
  for previous, step in zip([0, *steps], steps):
    assert previous < step and not [k for k in range(previous + 1, step) if k % 3 == 0], steps
  assert all(p.total_steps == 10 for p in progress)
  # The time per step is measured from the second call on (the first one traces).
  assert progress[0].seconds_per_step is None
  assert all(p.seconds_per_step > 0 for p in progress[1:])
  for p in progress:
    assert np.isfinite(p.metrics['total_loss']) and 'supervised_acc' in p.metrics
    assert p.metrics['learning_rate'] == pytest.approx(float(learning_rate(p.step)))
  # A summary after every call, at the step it reached.
  assert summaries.steps(str(tmp_path / 'run'), 'train/total_loss') == steps
  # Resumed at the end: nothing left to run, nothing written.
  assert trainer_lib.train(trainer, iterator, total_steps=10, checkpoint_every=3,
                           checkpoint_manager=manager) >= 0
  assert written_steps(str(tmp_path / 'run')) == [3, 6, 9, 10]


def test_call_steps_stops_at_evaluations_too():
  assert trainer_lib.call_steps(0, 100, 10, 6, eval_every=4) == (4, 6)
  assert trainer_lib.call_steps(4, 100, 10, 6, eval_every=4) == (2, 6)
  assert trainer_lib.call_steps(6, 100, 10, 6, eval_every=4) == (2, 12)
  assert trainer_lib.call_steps(8, 100, 10, 6, eval_every=4) == (2, 12)
  for step in range(10):
    num_steps, _ = trainer_lib.call_steps(step, 100, 10, 100, eval_every=3)
    assert step + num_steps == min(10, (step // 3 + 1) * 3)


def test_train_evaluates_at_every_multiple_and_the_end_without_changing_training(
    tmp_path, tiny_training):
  probe_images = uniform_images(8)
  evaluations = []

  def on_eval(step, train_seconds):
    # An evaluation reads the model (inference) between calls, never the training iterator.
    outputs = trainer.model(probe_images, training=False)
    evaluations.append((step, train_seconds, float(tf.reduce_sum(outputs['features']))))

  trainer, iterator, _ = tiny_training(uniform_images(80))
  progress = []
  seconds = trainer_lib.train(
      trainer, iterator, total_steps=10, checkpoint_every=3,
      checkpoint_manager=checkpoint_manager(trainer, str(tmp_path / 'evaluated')),
      on_progress=progress.append, eval_every=4, on_eval=on_eval)
  assert [e[0] for e in evaluations] == [4, 8, 10]
  assert {3, 4, 6, 8, 9, 10} <= {p.step for p in progress}  # no call crosses either boundary
  # The training seconds reported to each evaluation grow and exclude the evaluations.
  assert 0 < evaluations[0][1] < evaluations[1][1] < evaluations[2][1] <= seconds
  evaluated = [v.numpy() for v in trainer.model.variables]

  trainer, iterator, _ = tiny_training(uniform_images(80))
  trainer_lib.train(trainer, iterator, total_steps=10, checkpoint_every=3,
                    checkpoint_manager=checkpoint_manager(trainer, str(tmp_path / 'plain')))
  for with_eval, without in zip(evaluated, (v.numpy() for v in trainer.model.variables),
                                strict=True):
    np.testing.assert_array_equal(with_eval, without)


def test_stop_request_saves_at_the_next_loop_boundary_and_raises_preempted(
    tmp_path, tiny_training):
  trainer, iterator, _ = tiny_training(uniform_images(80))
  model_dir = str(tmp_path / 'run')
  manager = checkpoint_manager(trainer, model_dir)
  progress = []
  # Set before the loop: the first call ends at step 1, not a checkpoint step; saved there.
  stop_requested = threading.Event()
  stop_requested.set()
  with pytest.raises(trainer_lib.Preempted,
                     match=r'^Stopped at step 1/10 on request; checkpoint saved to '
                           rf'{re.escape(model_dir)}/ckpt-1\. Rerun the same command'):
    trainer_lib.train(trainer, iterator, total_steps=10, checkpoint_every=5,
                      checkpoint_manager=manager, stop_requested=stop_requested,
                      on_progress=progress.append)
  assert written_steps(model_dir) == [1] and progress == []
  assert int(trainer.optimizer.iterations.numpy()) == 1

  # Resumed, then a SIGTERM (a cloud VM's preemption notice) while it trains after step 3: the
  # next call ends (1 -> 2, 2 -> 4, then 4 -> at most the end), its step is saved.
  stop_requested = trainer_lib.StopRequest()
  previous_handlers = {s: signal.getsignal(s) for s in trainer_lib.stop_on_signals.SIGNALS}

  def on_progress(p):
    progress.append(p)
    if p.step >= 3 and not stop_requested.is_set():
      os.kill(os.getpid(), signal.SIGTERM)

  with trainer_lib.stop_on_signals(stop_requested):
    with pytest.raises(trainer_lib.Preempted) as preempted:
      trainer_lib.train(trainer, iterator, total_steps=10, checkpoint_every=10,
                        checkpoint_manager=manager, stop_requested=stop_requested,
                        on_progress=on_progress)
  assert {s: signal.getsignal(s) for s in previous_handlers} == previous_handlers
  stopped = int(trainer.optimizer.iterations.numpy())
  assert [p.step for p in progress] == [2, 4] and 4 < stopped <= 10
  assert f'Stopped at step {stopped}/10 by SIGTERM;' in str(preempted.value)
  assert preempted.value.signal_number == signal.SIGTERM
  assert written_steps(model_dir) == [1, stopped]


def test_a_closed_terminal_asks_the_loop_to_save_and_stop_as_sigterm_does():
  # Finding (issue 24, rerun): SIGHUP (the terminal or ssh session closed) ended a training run
  # at once with no line and nothing saved.
  stop_requested = trainer_lib.StopRequest()
  with trainer_lib.stop_on_signals(stop_requested):
    os.kill(os.getpid(), signal.SIGHUP)
    for _ in range(100):  # the handler runs between bytecodes
      if stop_requested.is_set():
        break
  assert stop_requested.is_set() and stop_requested.signal_number == signal.SIGHUP


def test_a_summary_that_cannot_be_written_saves_the_step_reached_then_stops(
    tmp_path, tiny_training, filling_disk):
  # Finding: a full disk at a summary write lost everything since the last checkpoint. The
  # checkpoints go elsewhere here, so the save of the step reached can be seen to work.
  trainer, iterator, _ = tiny_training(uniform_images(80))
  model_dir = str(tmp_path / 'run')
  manager = checkpoint_manager(trainer, model_dir)
  events_dir, fill = filling_disk
  writer = tf.summary.create_file_writer(events_dir, max_queue=1)
  # The events file to the end of its last 4 KB page (tmpfs allocates pages), then no room at all.
  events_file, = glob.glob(os.path.join(events_dir, 'events.out.tfevents.*'))
  while os.path.getsize(events_file) % 4096 < 3950:
    with writer.as_default(step=0):
      tf.summary.scalar('padding', 0.0)
    writer.flush()
  fill()
  with pytest.raises(OSError,
                     match=rf'^could not write summaries in {re.escape(model_dir)} '
                           r'\(ResourceExhaustedError: .*No space left on device.*\); step (\d+) '
                           rf'is saved \({re.escape(model_dir)}/ckpt-\1\): make room and rerun'):
    trainer_lib.train(trainer, iterator, total_steps=10, checkpoint_every=10,
                      checkpoint_manager=manager, summary_writer=writer)
  stopped = int(trainer.optimizer.iterations.numpy())
  assert 0 < stopped < 10 and written_steps(model_dir) == [stopped]


def test_call_watchdog_fires_once_for_a_call_that_outlasts_its_timeout_and_never_otherwise():
  fired = []
  watchdog = trainer_lib.CallWatchdog(0.2, on_timeout=fired.append)
  with watchdog.watching('train steps 5-7'):
    pass  # a call that ends in time: its timer is cancelled
  time.sleep(0.4)
  assert fired == []
  with watchdog.watching('train steps 8-11'):
    time.sleep(0.6)  # a hung call (the main thread blocked inside TensorFlow)
  assert fired == ['train steps 8-11 did not finish within --step_timeout_seconds=0.2: a '
                   'worker of this job is hung or far slower than the others; restart every '
                   'worker with the same command (each resumes from the newest checkpoint)']
  with trainer_lib.CallWatchdog(0, on_timeout=fired.append).watching('train steps 1-1'):
    time.sleep(0.1)  # 0: never
  assert len(fired) == 1


class RecordingWatchdog(trainer_lib.CallWatchdog):
  def __init__(self):
    super().__init__(600)
    self.watched = []

  def watching(self, what):
    self.watched.append(what)
    return super().watching(what)


def test_train_watches_every_call_and_agreement_but_the_first_which_traces(tmp_path,
                                                                          tiny_training):
  trainer, iterator, _ = tiny_training(uniform_images(80))
  watchdog = RecordingWatchdog()
  progress = []
  trainer_lib.train(trainer, iterator, total_steps=10, checkpoint_every=4,
                    checkpoint_manager=checkpoint_manager(trainer, str(tmp_path / 'run')),
                    on_progress=progress.append, watchdog=watchdog)
  steps = [p.step for p in progress]
  assert steps[0] == 1 and len(steps) > 2
  expected = []
  for previous, step in zip(steps, steps[1:]):
    expected += [f'train steps {previous + 1}-{step}', f"the workers' agreement after step {step}"]
  assert watchdog.watched == expected


def test_non_finite_loss_names_the_step_range_and_writes_no_checkpoint_for_it(
    tmp_path, tiny_training):
  images = uniform_images(80)
  images[4 * 8:5 * 8] = np.nan  # the fifth batch: step 5
  trainer, iterator, _ = tiny_training(images)
  model_dir = str(tmp_path / 'run')
  manager = checkpoint_manager(trainer, model_dir)
  trainer_lib.train(trainer, iterator, total_steps=3, checkpoint_every=3,
                    checkpoint_manager=manager)
  assert written_steps(model_dir) == [3]
  # Resumed: one step (3 -> 4), then two (4 -> 6), the second of them on the NaN images.
  progress = []
  with pytest.raises(FloatingPointError,
                     match=r'^Non-finite (\w+, )*total_loss(, \w+)* between steps 5 and 6; the '
                           rf'last good checkpoint \({re.escape(model_dir)}/ckpt-3\) is kept\.'):
    trainer_lib.train(trainer, iterator, total_steps=10, checkpoint_every=3,
                      checkpoint_manager=manager, on_progress=progress.append)
  assert [p.step for p in progress] == [4]
  assert int(trainer.optimizer.iterations.numpy()) == 6
  assert written_steps(model_dir) == [3]  # no ckpt-6 of the diverged weights
  assert manager.latest_checkpoint.endswith('ckpt-3')


def test_a_non_finite_batch_norm_statistic_stops_the_run_and_saves_nothing_of_it(
    tmp_path, tiny_training):
  # Finding (issue 24): Adam at 1e9 kept the loss finite while the BatchNorm moving variances
  # went to inf; the guard read the trainable weights only, so every checkpoint held inf.
  trainer, iterator, _ = tiny_training(uniform_images(80))
  model_dir = str(tmp_path / 'run')
  manager = checkpoint_manager(trainer, model_dir)
  trainer_lib.train(trainer, iterator, total_steps=3, checkpoint_every=3,
                    checkpoint_manager=manager)
  variance = next(v for v in trainer.model.variables if 'moving_variance' in v.path)
  variance.assign(tf.fill(variance.shape, np.inf))
  with pytest.raises(FloatingPointError,
                     match=r'^Non-finite \(or overflowing\) state between steps 4 and 6 \(.*'
                           rf'{re.escape(variance.path)}.*\); nothing of these steps is saved, '
                           rf'the last good checkpoint \({re.escape(model_dir)}/ckpt-3\) is kept'):
    trainer_lib.train(trainer, iterator, total_steps=6, checkpoint_every=3,
                      checkpoint_manager=manager)
  assert written_steps(model_dir) == [3]


def test_the_divergence_guard_reads_every_saved_variable_and_allows_unvisited_u(one_replica,
                                                                                tiny_model_config):
  trainer, _ = lars_trainer(one_replica, tiny_model_config(), 'sogclr')
  assert trainer.non_finite_variables() == []  # every u unvisited: -inf, by design
  named = dict(trainer.saved_variables())
  assert any('moving_mean' in name for name in named)
  assert any(name.startswith('optimizer/') for name in named)
  log_u = trainer.objective.log_u
  log_u.assign(tf.tensor_scatter_nd_update(log_u, [[3]], [np.nan]))
  assert trainer.non_finite_variables() == ['sogclr/log_u']
  log_u.assign(tf.fill(log_u.shape, np.inf))
  assert trainer.non_finite_variables() == ['sogclr/log_u']


def test_progress_logger_line_holds_step_epoch_rate_loss_images_per_second_and_eta(monkeypatch):
  lines = []
  monkeypatch.setattr(trainer_lib.logging, 'info', lambda msg, *args: lines.append(msg % args))
  metrics = {'total_loss': 1.23456, 'contrast_loss': 0.98765, 'contrast_acc': 0.25,
             'supervised_acc': 0.5, 'log_u_mean': -2.5, 'weight_decay': 0.01}
  logger = trainer_lib.ProgressLogger(global_batch_size=16, every_seconds=0)
  logger(trainer_lib.Progress(step=30, total_steps=100, metrics=metrics,
                              seconds_per_step=0.5))
  assert lines == ['step 30/100  loss 1.2346  nt_xent 0.9877  contrast_acc 0.25  sup_acc 0.5  '
                   'log_u_mean -2.5  32 img/s  ETA 0m35s']
  # Before the time per step is measured: no rate, no ETA.
  logger(trainer_lib.Progress(1, 100, {'total_loss': 2.0}, None))
  assert lines[-1] == 'step 1/100  loss 2.0000'
  # Hours in the ETA.
  logger(trainer_lib.Progress(0, 10_000, {'total_loss': 2.0}, 1.0))
  assert lines[-1].endswith('16 img/s  ETA 2h46m')
  # With the epoch length and the schedule: the epoch and the learning rate at the step.
  scheduled = trainer_lib.ProgressLogger(global_batch_size=16, every_seconds=0,
                                         steps_per_epoch=40, learning_rate=lambda s: 0.001 * s)
  scheduled(trainer_lib.Progress(30, 100, {'total_loss': 2.0}, None))
  assert lines[-1] == 'step 30/100  epoch 0.75  lr 0.03  loss 2.0000'
  # At most one line every every_seconds, and always the last step's.
  quiet = trainer_lib.ProgressLogger(global_batch_size=16, every_seconds=3600)
  count = len(lines)
  quiet(trainer_lib.Progress(5, 10, {'total_loss': 1.0}, 0.1))
  assert len(lines) == count
  quiet(trainer_lib.Progress(10, 10, {'total_loss': 1.0}, 0.1))
  assert len(lines) == count + 1 and lines[-1].startswith('step 10/10  loss 1.0000')


# The API without run.py: what a notebook does.

@pytest.mark.slow  # 1 minute on 2 busy cores, most of it XLA's compilation
def test_xla_compiled_step_with_device_augmentations_equals_the_plain_step_and_the_host_views(
    one_replica, tiny_model_config):
  # jit_compile=True, as TPUs require, on the pipeline's augment_on='device' elements
  # (uint8-scale crops and per-view parameters): the same losses, weights and per-image tables
  # as the plain step, for iSogCLR (SogCLR's u update and its own temperature updates), and the
  # same as the plain step given the views augmented on the host. (One replica: XLA on this
  # CPU's two logical devices cannot reach a variable of the other device.)
  tf.keras.utils.set_random_seed(1)
  augment = data_util.PixelAugment(height=16)
  rng = np.random.default_rng(3)
  crops = tuple(rng.uniform(0, 255, size=(16, 16, 16, 3)).astype(np.float32) for _ in range(2))
  params = tuple(np.stack([data_util.pixel_params(tf.constant([i, v], tf.int64), augment)
                           for i in range(16)]) for v in range(2))
  labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)]
  ids = rng.permutation(20)[:16].astype(np.int32)
  # The same batch augmented beforehand, as the host path hands it to the step.
  views = tuple(data_util.distort_batch(c, p, augment).numpy()
                for c, p in zip(crops, params, strict=True))
  runs = {'host': data_lib.batch(views, labels, ids),
          'device': data_lib.batch(crops, labels, ids, pixel_params=params),
          'device, XLA': data_lib.batch(crops, labels, ids, pixel_params=params)}
  initial_weights, final = None, {}
  for name, element in runs.items():
    trainer, initial_weights = lars_trainer(
        one_replica, tiny_model_config(), 'isogclr', initial_weights,
        jit_compile=name.endswith('XLA'), pixel_augment=None if name == 'host' else augment)
    dataset = tf.data.Dataset.from_tensor_slices(element).batch(8)
    metrics = trainer.train_loop(iter(one_replica.experimental_distribute_dataset(dataset)), 2)
    final[name] = ({k: float(v) for k, v in metrics.items()},
                   [v.numpy() for v in trainer.model.variables],
                   {table: v.numpy() for table, v in trainer.objective_tables().items()})
  assert len(final['host'][2]) == 3  # u, the temperatures and their momentum
  assert np.isfinite(final['host'][2]['log_u']).sum() == 16
  for name in ('device', 'device, XLA'):
    for key, value in final['host'][0].items():
      np.testing.assert_allclose(final[name][0][key], value, rtol=1e-4, atol=1e-5,
                                 err_msg=f'{name} {key}')
    for a, b in zip(final[name][1], final['host'][1], strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    for table, values in final['host'][2].items():
      np.testing.assert_allclose(final[name][2][table], values, rtol=1e-4, atol=1e-6,
                                 err_msg=f'{name} {table}')
