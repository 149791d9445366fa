"""checkpoints.py on a tiny pretraining run's model_dir and on checkpoints the tests write:
results and flags files, model_dir checks, resume before --checkpoint, restoring a model or a
pretrained trunk, the step of a checkpoint and the SavedModel export; which checkpoint a run
resumes from, the run lock, discarding a checkpoint and removing half-written saves."""
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import checkpoints
import model as model_lib
import objective
import trainer as trainer_lib


@pytest.fixture(scope='module')
def pretrained(pretrained_run):
  """model_dir of 3 SogCLR steps with LARS, checkpointed at the end and exported."""
  return pretrained_run[0]


@pytest.fixture(scope='module')
def tiny_model(tiny_model_config):
  """tiny_model(**overrides): the tiny architecture, freshly initialized."""
  return lambda **overrides: model_lib.build_model(tiny_model_config(**overrides), 16)


@pytest.fixture(scope='module')
def restored_model(tiny_model):
  """restored_model(path, **overrides): the tiny architecture with the model variables of
  checkpoint `path`."""

  def restore(path, **overrides):
    model = tiny_model(**overrides)
    tf.train.Checkpoint(model=model).restore(path).expect_partial()
    return model

  return restore


def copied_model_dir(pretrained, tmp_path):
  """A copy of the pretraining run, for jobs that write into their model_dir."""
  model_dir = str(tmp_path / 'copy')
  shutil.copytree(pretrained, model_dir)
  return model_dir


def assert_same_values(variables, expected):
  for a, b in zip(variables, expected, strict=True):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_write_results_merges_and_never_leaves_a_truncated_file(tmp_path, monkeypatch):
  path = tmp_path / 'result_7.json'
  path.write_text(json.dumps({'probe/top_1': 0.9, 'eval/top_1': 0.1}))
  merged = checkpoints.write_results(str(tmp_path), 7, {'eval/top_1': 0.2, 'global_step': 7})
  assert merged == {'probe/top_1': 0.9, 'eval/top_1': 0.2, 'global_step': 7}
  assert json.loads(path.read_text()) == merged

  def crash(*args, **kwargs):
    raise OSError('simulated crash')

  # A crash before the rename leaves the previous file whole.
  monkeypatch.setattr(tf.io.gfile, 'rename', crash)
  with pytest.raises(OSError, match='simulated'):
    checkpoints.write_results(str(tmp_path), 7, {'eval/top_1': 0.3})
  assert json.loads(path.read_text()) == merged
  monkeypatch.undo()
  # A file that is not json (cut short by an older version) is kept aside, not overwritten.
  path.write_text('{"probe/top_1": 0.')
  assert checkpoints.write_results(str(tmp_path), 7, {'global_step': 7}) == {'global_step': 7}
  assert (tmp_path / 'result_7.json.unreadable').read_text() == '{"probe/top_1": 0.'
  assert sorted(os.listdir(tmp_path)) == ['result_7.json', 'result_7.json.unreadable']


def test_results_of_another_eval_name_or_split_never_overwrite_a_step_s_results(tmp_path):
  # Finding (issue 24): --mode=eval --eval_name=on_train --eval_split=train on a finished run
  # replaced the test split's eval/top_1 in result_<step>.json, no split recorded.
  model_dir = str(tmp_path)
  test = {'eval/top_1': 0.2028, 'eval_split': 'test', 'train_seconds': 9.0}
  checkpoints.write_results(model_dir, 20, test)
  checkpoints.write_results(model_dir, 20, {'eval/top_1': 0.1747, 'eval_split': 'train',
                                            'eval_name': 'on_train'})
  checkpoints.write_results(model_dir, 20, {'eval/top_1': 0.5, 'eval_split': 'test[:50%]'})
  checkpoints.write_results(model_dir, 20, {'eval/top_1': 0.3, 'eval_split': 'train',
                                            'eval_name': 'on_train'})
  read = {name: json.load(open(os.path.join(model_dir, name)))
          for name in os.listdir(model_dir)}
  assert read == {
      'result_20.json': test,
      'result_20_on_train.json': {'eval/top_1': 0.3, 'eval_split': 'train',
                                  'eval_name': 'on_train'},
      'result_20_test__50__.json': {'eval/top_1': 0.5, 'eval_split': 'test[:50%]'}}
  # Read back by step and name; a file that is not json reads as none and stays as it was.
  assert checkpoints.read_results(model_dir, 20, 'on_train')['eval/top_1'] == 0.3
  assert checkpoints.read_results(model_dir, 30) == {}
  (tmp_path / 'result_40.json').write_text('{"eval/to')
  assert checkpoints.read_results(model_dir, 40) == {}
  assert (tmp_path / 'result_40.json').read_text() == '{"eval/to'
  # A file written before splits were recorded is not overwritten by an evaluation either.
  open(os.path.join(model_dir, 'result_30.json'), 'w').write('{"eval/top_1": 0.1}')
  checkpoints.write_results(model_dir, 30, {'eval/top_1': 0.9, 'eval_split': 'test'})
  assert json.load(open(os.path.join(model_dir, 'result_30.json'))) == {'eval/top_1': 0.1}
  assert json.load(open(os.path.join(model_dir, 'result_30_test.json')))['eval/top_1'] == 0.9


def test_prepare_write_dir_of_an_unwritable_model_dir_is_an_error_naming_model_dir(tmp_path):
  # Under a file: no directory can be made there (whoever runs the test, root included).
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  model_dir = str(blocker / 'run')
  with pytest.raises(ValueError, match=rf"^--model_dir='{model_dir}' is not writable: "):
    checkpoints.prepare_write_dir(model_dir)
  with pytest.raises(ValueError, match=rf"^--model_dir='{model_dir}' is not writable: "):
    checkpoints.prepare_write_dir(model_dir, chief=False, task_id=1)
  # A writable one: the chief writes into it, another worker into a directory of its own; the
  # write test leaves nothing behind.
  model_dir = str(tmp_path / 'run')
  assert checkpoints.prepare_write_dir(model_dir) == model_dir
  worker_dir = checkpoints.prepare_write_dir(model_dir, chief=False, task_id=1)
  assert worker_dir == os.path.join(model_dir, '.worker_1_tmp')
  assert os.listdir(model_dir) == ['.worker_1_tmp'] and os.listdir(worker_dir) == []


def test_restore_or_initialize_resumes_from_model_dir_before_the_checkpoint(
    tmp_path, pretrained, tiny_model, restored_model):

  def fresh(**overrides):
    model = tiny_model(**overrides)
    optimizer, _ = trainer_lib.build_optimizer(
        trainer_lib.OptimizerConfig(name='adam'), model, global_batch_size=16, warmup_steps=0,
        total_steps=10)
    return model, optimizer

  pretrained_model = restored_model(tf.train.latest_checkpoint(pretrained))
  # A run of its own, stopped at step 2 (its weights are not the pretraining run's).
  model_dir = str(tmp_path / 'run')
  model, optimizer = fresh()
  manager = checkpoints.restore_or_initialize(model, optimizer, model_dir=model_dir)
  optimizer.iterations.assign(2)
  assert manager.save(checkpoint_number=2).endswith('ckpt-2')

  # Restarted with --checkpoint: model_dir's own checkpoint wins, the step with it.
  resumed, resumed_optimizer = fresh()
  manager = checkpoints.restore_or_initialize(resumed, resumed_optimizer, model_dir=model_dir,
                                              checkpoint=pretrained)
  assert int(resumed_optimizer.iterations.numpy()) == 2
  assert_same_values(resumed.variables, model.variables)
  assert not np.array_equal(resumed.trunk.variables[0].numpy(),
                            pretrained_model.trunk.variables[0].numpy())
  assert manager.directory == model_dir

  # A new model_dir: initialized from --checkpoint (weights only, step 0), the head zeroed
  # after the restore; the manager saves into write_dir.
  write_dir = str(tmp_path / 'new' / '.worker_1_tmp')
  started, started_optimizer = fresh()
  manager = checkpoints.restore_or_initialize(
      started, started_optimizer, model_dir=str(tmp_path / 'new'), write_dir=write_dir,
      checkpoint=pretrained, zero_init_logits_layer=True)
  assert int(started_optimizer.iterations.numpy()) == 0
  for part in ('trunk', 'projection_head', 'supervised_head_bn'):
    assert_same_values(getattr(started, part).variables, getattr(pretrained_model, part).variables)
  assert np.any(pretrained_model.supervised_head.kernel.numpy() != 0)
  assert all(np.all(v.numpy() == 0) for v in started.supervised_head.weights)
  assert manager.directory == write_dir


def _flip_a_byte(path):
  content = bytearray(open(path, 'rb').read())
  content[len(content) // 2] ^= 0xFF
  open(path, 'wb').write(bytes(content))


# Damage done to a model_dir holding ckpt-10 and ckpt-20 -> the checkpoint a restart resumes from.
DAMAGES = {
    'index_deleted': (lambda d: os.remove(f'{d}/ckpt-20.index'), 10),
    'all_files_of_the_newest_deleted': (
        lambda d: [os.remove(p) for p in glob.glob(f'{d}/ckpt-20.*')], 10),
    'data_truncated': (lambda d: os.truncate(f'{d}/ckpt-20.data-00000-of-00001', 1000), 10),
    'data_bit_flipped': (lambda d: _flip_a_byte(f'{d}/ckpt-20.data-00000-of-00001'), 10),
    'index_truncated': (lambda d: os.truncate(f'{d}/ckpt-20.index', 50), 10),
    'state_file_deleted': (lambda d: os.remove(f'{d}/checkpoint'), 20),
    'state_file_garbage': (lambda d: open(f'{d}/checkpoint', 'w').write('garbage'), 20),
}


@pytest.fixture(scope='module')
def ten_and_twenty(tmp_path_factory, tiny_model):
  """A model_dir holding ckpt-10 and ckpt-20 of the tiny model, Adam and a SogCLR u table,
  each checkpoint with weights of its own; returns (model_dir, {step: weights})."""
  model_dir = str(tmp_path_factory.mktemp('ten_and_twenty'))
  model, optimizer, sogclr = _resumable(tiny_model)
  manager = checkpoints.restore_or_initialize(model, optimizer, sogclr, model_dir=model_dir)
  weights = {}
  for step in (10, 20):
    optimizer.iterations.assign(step)
    model.trunk.variables[0].assign_add(tf.ones_like(model.trunk.variables[0]))
    sogclr.log_u.assign(tf.fill([20], float(step)))
    manager.save(checkpoint_number=step)
    weights[step] = [v.numpy() for v in model.variables]
  return model_dir, weights


def _resumable(tiny_model):
  model = tiny_model()
  optimizer, _ = trainer_lib.build_optimizer(
      trainer_lib.OptimizerConfig(name='adam'), model, global_batch_size=16, warmup_steps=0,
      total_steps=30)
  return model, optimizer, objective.SogCLRLoss(20, temperature=0.1, gamma=0.9)


@pytest.mark.parametrize('damage', sorted(DAMAGES))
def test_a_damaged_newest_checkpoint_resumes_from_the_newest_readable_one(
    damage, ten_and_twenty, tiny_model, tmp_path):
  source, weights = ten_and_twenty
  model_dir = str(tmp_path / 'run')
  shutil.copytree(source, model_dir)
  harm, expected = DAMAGES[damage]
  harm(model_dir)
  ten = open(f'{model_dir}/ckpt-10.data-00000-of-00001', 'rb').read()
  model, optimizer, sogclr = _resumable(tiny_model)
  manager = checkpoints.restore_or_initialize(model, optimizer, sogclr, model_dir=model_dir)
  # Never step 0 over existing work: the newest readable checkpoint, whole (weights, step, u).
  assert int(optimizer.iterations.numpy()) == expected
  for value, saved in zip(model.variables, weights[expected], strict=True):
    np.testing.assert_array_equal(value.numpy(), saved)
  np.testing.assert_array_equal(sogclr.log_u.numpy(), np.full(20, float(expected)))
  # The next save goes on from there; the older good checkpoint was never rewritten.
  optimizer.iterations.assign(30)
  assert checkpoints.save(manager, 30).endswith('ckpt-30')
  assert tf.train.latest_checkpoint(model_dir).endswith('ckpt-30')
  assert open(f'{model_dir}/ckpt-10.data-00000-of-00001', 'rb').read() == ten


@pytest.mark.slow
def test_restore_model_names_missing_and_mismatched_variables(
    tmp_path, pretrained, run_main, data_dir, tiny_model, restored_model):
  path = tf.train.latest_checkpoint(pretrained)
  with pytest.raises(ValueError, match=r'supervised_head/kernel \(64, 5\) is \(64, 10\) there'):
    checkpoints.restore_model(tiny_model(num_classes=5), path)
  with pytest.raises(ValueError, match=r'another architecture: \S+ \([\d, ]*\) missing'):
    checkpoints.restore_model(tiny_model(se_ratio=0.25), path)
  model = tiny_model()
  checkpoints.restore_model(model, path)
  expected = restored_model(path)
  for a, b in zip(model.variables, expected.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
  # Through --mode=eval: one line naming --model_dir and the variable.
  model_dir = copied_model_dir(pretrained, tmp_path)
  with pytest.raises(ValueError, match=r'--model_dir=.*another architecture: .*projection_head/'
                                       r'\S+ \(.*32,?\) is \(.*16,?\) there'):
    run_main(f'--model_dir={model_dir}', f'--data_dir={data_dir}', '--mode=eval',
             '--proj_out_dim=32', '--eval_timeout_seconds=60')


@pytest.mark.slow
def test_restore_pretrained_checks_every_trunk_and_projection_variable(
    tmp_path, pretrained, tiny_model, restored_model, caplog):
  """--checkpoint: trunk and projection head must all be there; the linear head may be new or
  for another number of classes."""
  with pytest.raises(ValueError, match=r"--checkpoint='[^']*' holds another architecture: "
                                       r'\S+/se/\S+ \([\d, ]*\) missing'):
    checkpoints.restore_pretrained(tiny_model(se_ratio=0.25, train_mode='finetune'), pretrained)
  # Fine-tuning on a dataset with another number of classes: the pretraining run's 10-class
  # head is left out, the new 5-class head starts as initialized; the rest is restored.
  model = tiny_model(num_classes=5, train_mode='finetune')
  head_before = [v.numpy() for v in model.supervised_head.variables]
  with caplog.at_level('INFO', logger='absl'):
    checkpoints.restore_pretrained(model, pretrained)
  assert 'supervised_head: the checkpoint holds another shape' in caplog.text
  source = restored_model(tf.train.latest_checkpoint(pretrained))
  for part in ('trunk', 'projection_head', 'supervised_head_bn'):
    for a, b in zip(getattr(model, part).variables, getattr(source, part).variables):
      np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
  for a, b in zip(model.supervised_head.variables, head_before):
    np.testing.assert_array_equal(a.numpy(), b)
  assert source.supervised_head.kernel.shape == (64, 10)
  # A linear head the checkpoint does not have (none during pretraining) stays as initialized.
  model = tiny_model(train_mode='finetune', supervised_head_bn=False)
  head_before = [v.numpy() for v in model.supervised_head.variables]
  checkpoint = tf.train.latest_checkpoint(pretrained)
  trunk_only = str(tmp_path / 'trunk_only' / 'ckpt')
  source = restored_model(checkpoint)
  tf.train.Checkpoint(model=tf.train.Checkpoint(
      trunk=source.trunk, projection_head=source.projection_head)).write(trunk_only)
  caplog.clear()
  with caplog.at_level('INFO', logger='absl'):
    checkpoints.restore_pretrained(model, trunk_only)
  # Finding (red team): this said nothing, though the docs promise the log says so.
  assert [r.getMessage() for r in caplog.records if 'supervised_head' in r.getMessage()] == [
      'supervised_head: not in the checkpoint (its run trained no linear head); it starts as '
      'initialized']
  for a, b in zip(model.trunk.variables, source.trunk.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
  for a, b in zip(model.supervised_head.variables, head_before):
    np.testing.assert_array_equal(a.numpy(), b)


def test_checkpoint_step_reads_the_optimizer_step_or_the_file_name(tmp_path, pretrained):
  assert checkpoints.checkpoint_step(tf.train.latest_checkpoint(pretrained)) == 3
  variable = tf.Variable(tf.ones([3]))
  optimizer = tf.keras.optimizers.LossScaleOptimizer(tf.keras.optimizers.SGD(0.1))
  optimizer.build([variable])
  for _ in range(2):
    optimizer.apply_gradients([(tf.ones([3]), variable)])
  # float16 training: the wrapper's own counter stays 0, the inner optimizer's counts.
  path = tf.train.Checkpoint(optimizer=optimizer).write(str(tmp_path / 'mixed' / 'ckpt-9'))
  assert checkpoints.checkpoint_step(path) == 2
  path = tf.train.Checkpoint(variable=variable).write(str(tmp_path / 'plain' / 'ckpt-7'))
  assert checkpoints.checkpoint_step(path) == 7


def test_export_signature_matches_the_keras_model(pretrained, restored_model):
  export = os.path.join(pretrained, 'saved_model', '3')
  assert os.listdir(os.path.join(pretrained, 'saved_model')) == ['3']
  assert json.load(open(os.path.join(export, 'flags.json')))['resnet_depth'] == 10
  serving = tf.saved_model.load(export).signatures['serving_default']
  model = restored_model(tf.train.latest_checkpoint(pretrained))
  images = np.random.default_rng(0).uniform(size=(5, 16, 16, 3)).astype(np.float32)
  outputs = serving(images=tf.constant(images))
  expected = model(images, training=False)
  assert sorted(outputs) == ['features', 'projection', 'supervised_logits']
  for key, value in outputs.items():
    assert value.dtype == tf.float32, key
    np.testing.assert_allclose(value.numpy(), expected[key].numpy(), rtol=1e-5, atol=1e-5,
                               err_msg=key)


@pytest.mark.slow
def test_export_keeps_the_newest_and_outputs_float32_under_mixed_precision(tmp_path,
                                                                           tiny_model):
  tf.keras.mixed_precision.set_global_policy('mixed_bfloat16')
  try:
    model = tiny_model()
  finally:
    tf.keras.mixed_precision.set_global_policy('float32')
  export_dir = str(tmp_path / 'saved_model')
  for step in (1, 2, 3):
    path = checkpoints.export_saved_model(model, export_dir, step, image_size=16, keep=2)
  assert path == os.path.join(export_dir, '3')
  assert sorted(os.listdir(export_dir)) == ['2', '3']  # no temporary directory left either
  outputs = tf.saved_model.load(path).signatures['serving_default'](
      images=tf.random.uniform([2, 16, 16, 3]))
  assert {k: v.dtype for k, v in outputs.items()} == {
      'features': tf.float32, 'projection': tf.float32, 'supervised_logits': tf.float32}


# -- Resume from the newest readable checkpoint; one run per model_dir ---------------------------


def _saved_run(directory, steps=(10, 20)):
  """`directory` with one checkpoint per step of `steps` (its one variable holds the step)."""
  variable = tf.Variable(0.0)
  state = tf.train.Checkpoint(v=variable)
  manager = tf.train.CheckpointManager(state, directory, max_to_keep=5)
  for step in steps:
    variable.assign(float(step))
    manager.save(checkpoint_number=step)
  return directory


def test_list_checkpoints_prefers_the_state_file_then_the_highest_step(tmp_path):
  model_dir = _saved_run(str(tmp_path))

  def names():
    return [os.path.basename(p) for p in checkpoints.list_checkpoints(model_dir)]

  assert names() == ['ckpt-20', 'ckpt-10']
  os.remove(os.path.join(model_dir, 'checkpoint'))
  assert names() == ['ckpt-20', 'ckpt-10']
  with open(os.path.join(model_dir, 'checkpoint'), 'w') as f:
    f.write('model_checkpoint_path: "ckpt-10"\n')
  assert names() == ['ckpt-10', 'ckpt-20']  # the state file is the user's word
  os.remove(os.path.join(model_dir, 'ckpt-10.index'))
  assert names() == ['ckpt-20']


def test_discard_removes_a_checkpoint_and_points_the_state_file_at_the_previous(tmp_path):
  model_dir = _saved_run(str(tmp_path), steps=(10, 20, 30))
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(0.0)), model_dir, 5)
  checkpoints.discard(manager, 30)
  assert not glob.glob(os.path.join(model_dir, 'ckpt-30.*'))
  assert tf.train.latest_checkpoint(model_dir).endswith('ckpt-20')
  assert tf.train.load_variable(tf.train.latest_checkpoint(model_dir),
                                'v/.ATTRIBUTES/VARIABLE_VALUE') == 20.0


def test_remove_stale_saves_removes_what_interrupted_saves_leave(tmp_path):
  model_dir = _saved_run(str(tmp_path))
  stale = [os.path.join(model_dir, 'ckpt-30_temp'), os.path.join(model_dir, 'saved_model',
                                                                  '.tmp_30_123')]
  for path in stale:
    os.makedirs(path)
  open(os.path.join(model_dir, '.result_30.json.tmp_123'), 'w').close()
  removed = checkpoints.remove_stale_saves(model_dir)
  assert len(removed) == 3 and not any(os.path.exists(p) for p in stale)
  assert os.path.exists(os.path.join(model_dir, 'ckpt-20.index'))


def test_abandoned_exports_of_gone_processes_are_removed_once_old(tmp_path):
  # Issue 24: a killed evaluation left saved_model/.tmp_<step>_<pid> forever (--mode=eval takes
  # no lock, so the training run's clean-up at start did not run).
  gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True).stdout.strip()
  model_dir = str(tmp_path)
  paths = {name: os.path.join(model_dir, 'saved_model', name)
           for name in (f'.tmp_30_{gone}', f'.tmp_40_{os.getpid()}', f'.tmp_50_{gone}')}
  for name, path in paths.items():
    os.makedirs(os.path.join(path, 'variables'))
    if name != f'.tmp_50_{gone}':  # an hour old; .tmp_50 is being written right now
      for root, dirs, _ in os.walk(path):
        for entry in [root, *(os.path.join(root, d) for d in dirs)]:
          os.utime(entry, (time.time() - 3600, time.time() - 3600))
  assert checkpoints.remove_abandoned_exports(model_dir) == [paths[f'.tmp_30_{gone}']]
  assert sorted(os.listdir(os.path.join(model_dir, 'saved_model'))) == [
      f'.tmp_40_{os.getpid()}', f'.tmp_50_{gone}']


def test_a_damaged_checkpoint_index_is_an_error_naming_the_checkpoint(tmp_path):
  # Issue 24: 'OpError: file is too short to be an sstable', the path not named.
  (tmp_path / 'ckpt-5.index').write_text('garbage')
  with pytest.raises(ValueError, match=r"^--checkpoint='.*ckpt-5' cannot be read \(.*sstable.*\): "
                                       r'its ckpt-5\.index is damaged'):
    checkpoints.checkpoint_prefix(str(tmp_path / 'ckpt-5'))
  # Finding (issue 24, rerun): a file that is no checkpoint was said not to exist.
  (tmp_path / 'garbage').write_text('garbage')
  with pytest.raises(ValueError, match=r"^--checkpoint='.*garbage' is a file, not a checkpoint "
                                       r'\(expected a checkpoint prefix'):
    checkpoints.checkpoint_prefix(str(tmp_path / 'garbage'))
  with pytest.raises(ValueError, match=r"^--checkpoint='.*missing' does not exist"):
    checkpoints.checkpoint_prefix(str(tmp_path / 'missing'))


def test_iterate_checkpoints_yields_each_once_in_step_order_including_new_ones(tmp_path):
  model_dir = _saved_run(str(tmp_path), steps=(20, 10))
  iterator = checkpoints.iterate_checkpoints(model_dir, timeout_seconds=2, poll_seconds=0.05)
  assert [os.path.basename(next(iterator)) for _ in range(2)] == ['ckpt-10', 'ckpt-20']
  _saved_run(model_dir, steps=(30,))  # written while an evaluation runs
  started = time.time()
  assert [os.path.basename(p) for p in iterator] == ['ckpt-30']
  assert time.time() - started >= 2  # then it waited for more until the timeout
