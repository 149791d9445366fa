"""experiment.run end to end on the demo data with tiny models: pretraining, resume, divergence,
fine-tuning, evaluation jobs, and a run configured without flags (as from a notebook)."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import weakref

import numpy as np
import pytest
import tensorflow as tf

import checkpoints
from conftest import MONITORS  # the pretrained run's (a real weight decay: a visible penalty)
import data as data_lib
import evaluation
import experiment
import model as model_lib
import projector
import run_record
import schema
import summaries
import trainer as trainer_lib


@pytest.fixture(scope='module')
def not_architecture(tiny):
  """The tiny run's flags without the architecture ones (a run reads those from flags.json)."""
  architecture = schema.architecture(experiment.Config)
  return [f for f in tiny if f.split('=')[0].lstrip('-') not in architecture]


@pytest.fixture(scope='module')
def pretrained(pretrained_run):
  return pretrained_run[0]


@pytest.fixture(scope='module')
def restored(tiny_model_config):
  """restored(path, **overrides) -> the tiny architecture with the model variables of
  checkpoint `path` (restored by tf.train.Checkpoint, not by the code under test)."""

  def make(path, **overrides):
    model = model_lib.build_model(tiny_model_config(**overrides), 16)
    tf.train.Checkpoint(model=model).restore(path).expect_partial()
    return model

  return make


def copied_model_dir(pretrained, tmp_path):
  """A copy of the pretraining run, for jobs that write into their model_dir."""
  model_dir = str(tmp_path / 'copy')
  shutil.copytree(pretrained, model_dir)
  return model_dir


def head_top_1(model, data_dir, split='test'):
  """Top-1 of the model's linear head on a digits split, computed here without the evaluation
  code: the eval preprocessing, one eager batch of 100 at a time."""
  builder = data_lib.get_builder('digits', data_dir)
  info = data_lib.describe(builder, 'train', 'test')
  config = data_lib.InputConfig(split=split, global_batch_size=100, image_size=16,
                                is_training=False, num_views=1)
  dataset = data_lib.build_input_fn(builder, info, config, info.num_classes)(
      tf.distribute.InputContext())
  correct = count = 0
  for batch in dataset:
    logits = model(batch['views'][0], training=False)['supervised_logits'].numpy()
    correct += int(np.sum(np.argmax(logits, 1) == np.argmax(batch['labels'].numpy(), 1)))
    count += len(logits)
  assert count == info.num_eval_examples
  return correct / count


def test_batch_size_must_divide_over_replicas():
  with pytest.raises(ValueError, match='not divisible by the 2 replicas'):
    experiment.check_batch_size(15, 2, 100, 'train')
  experiment.check_batch_size(16, 2, 100, 'train')
  with pytest.raises(ValueError, match="larger than split 'train' \\(100 images\\)"):
    experiment.check_batch_size(128, 2, 100, 'train')
  # Finding (issue 24, rerun): an empty training slice blamed the batch size.
  with pytest.raises(ValueError, match=r"^--train_split='train\[:0\]' holds no images$"):
    experiment.check_batch_size(16, 2, 0, 'train[:0]')


def absl_records(caplog):
  """The project's log records (TensorFlow's own warnings depend on what else ran)."""
  return [r for r in caplog.records if r.name == 'absl']


def test_only_a_training_job_schedules_a_warm_up(tmp_path, tiny, caplog):
  # --mode=eval warned 'Warm-up (890 steps) is longer than training (4 steps); shortened.'
  import run  # noqa: PLC0415
  (tmp_path / 'run').mkdir()
  flags = [*tiny, f'--model_dir={tmp_path / "run"}', '--train_steps=4', '--warmup_epochs=10']
  with caplog.at_level('WARNING', logger='absl'):
    evaluating = experiment.prepare(run.parse_config(['run.py', *flags, '--mode=eval']))
    assert evaluating.warmup_steps == 0 and not absl_records(caplog)
    training = experiment.prepare(run.parse_config(['run.py', *flags]))
  assert training.warmup_steps == 4
  assert [r.getMessage() for r in absl_records(caplog)] == [
      'Warm-up (890 steps) is longer than training (4 steps); shortened.']


# -- Pretraining, resume, divergence ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('stopped', [False, True])
def test_the_training_input_is_released_on_a_thread_of_its_own(stopped, tmp_path, tiny,
                                                                run_main, monkeypatch):
  # Deleting a tf.data iterator waits for its autotuning thread, which can run on for tens of
  # seconds: the run must not hold the iterator, so the release thread deletes it; also when
  # an error stops the run (here divergence at the second step), whose traceback held the
  # iterator in its frames until the error was reported. The evaluation loops' iterators
  # (data.batches) go the same way.
  deleted_on, threads = [], []

  def watched(references):
    weakref.finalize(references[0], lambda: deleted_on.append(threading.current_thread().name))
    threads.append(release(references))
    return threads[-1]

  release = data_lib.release_in_background
  monkeypatch.setattr(data_lib, 'release_in_background', watched)
  flags = (*tiny, f'--model_dir={tmp_path / "run"}', '--train_steps=2')
  if stopped:
    with pytest.raises(FloatingPointError, match='Non-finite .* between steps 2 and 2') as error:
      run_main(*flags, '--learning_rate=1e30', '--warmup_epochs=0', '--optimizer=adam')
    del error
  else:
    run_main(*flags)
  for thread in threads:
    thread.join()
  # The training input first; then, but for the stopped run, the final evaluation's loops.
  assert (len(threads) == 1) == stopped
  assert deleted_on == ['release-input'] * len(threads)


@pytest.mark.slow
def test_pretraining_writes_checkpoint_summaries_flags_and_probe(tmp_path, tiny, run_main,
                                                                 data_dir, restored):
  model_dir = str(tmp_path / 'run')
  results = run_main(*tiny, f'--model_dir={model_dir}', '--train_steps=3',
                     '--checkpoint_steps=2', '--DCL_mode=True', '--probe_max_examples=100000',
                     '--probe_baselines=False')
  # Checkpoints at step 2 and at the end, never past train_steps.
  latest = tf.train.latest_checkpoint(model_dir)
  assert latest.endswith('ckpt-3')
  assert os.path.exists(os.path.join(model_dir, 'ckpt-2.index'))
  shapes = dict(tf.train.list_variables(latest))
  assert shapes[checkpoints.LOG_U_KEY] == [1437]
  # Every model variable (projection head included) is in the checkpoint.
  model = restored(latest)
  tf.train.Checkpoint(model=model).restore(latest).assert_existing_objects_matched()
  assert len(model.projection_head.variables) == 9
  log_u = tf.train.load_variable(latest, checkpoints.LOG_U_KEY)
  assert np.isfinite(log_u).sum() == 3 * 16  # three steps of 16 distinct images
  assert tf.train.load_variable(latest, 'optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE') == 3

  flags = json.load(open(os.path.join(model_dir, 'flags.json')))
  assert flags['train_steps'] == 3 and flags['resolved_loss'] == 'sogclr'

  tags = summaries.tags(model_dir)
  for tag in ('learning_rate', 'total_loss', 'contrast_loss', 'supervised_loss',
              'contrast_acc', 'contrast_entropy', 'weight_decay', 'supervised_acc', 'u_mean'):
    assert f'train/{tag}' in tags, tag
  assert 'eval/label_top_1_accuracy' in tags

  assert results['eval/num_examples'] == 360
  # The linear head's top-1 is that of the checkpoint's head, computed independently.
  assert results['eval/top_1'] == head_top_1(model, data_dir)
  # Three steps already give features a probe classifies far above chance (0.1); measured
  # 0.73.
  assert 0.45 < results['probe/top_1'] <= 1.0
  assert json.load(open(os.path.join(model_dir, 'result_3.json')))['global_step'] == 3


@pytest.mark.slow
def test_divergence_stops_with_the_step_range_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny, run_main, run_cli, snapshot):
  model_dir = str(tmp_path / 'run')
  common = [*tiny, f'--model_dir={model_dir}', '--checkpoint_steps=1', '--optimizer=momentum']
  run_main(*common, '--train_steps=2')
  good = snapshot(model_dir)
  code, err = run_cli(*common, '--train_steps=8', '--learning_rate=1e30')
  assert code == 1
  first_bad = int(re.search(r'Non-finite .* between steps (\d+) and \d+', err).group(1))
  assert first_bad >= 3
  latest = tf.train.latest_checkpoint(model_dir)
  assert int(latest.rsplit('-', 1)[1]) < first_bad  # nothing saved from the bad steps on
  for index in glob.glob(f'{model_dir}/ckpt-*.index'):  # whatever was kept can continue
    for name, _ in tf.train.list_variables(index[:-6]):
      value = tf.train.load_variable(index[:-6], name)
      if name == checkpoints.LOG_U_KEY:  # -inf marks a never-visited image
        value = np.where(np.isneginf(value), 0.0, value)
      if getattr(value, 'dtype', None) == np.float32:  # squares that fit a float32
        assert np.all(np.abs(value) < 1e19), name
  for path, content in good.items():  # the checkpoints of the good steps are untouched
    if os.path.basename(path).startswith('ckpt-'):
      assert open(path, 'rb').read() == content, path


@pytest.mark.slow
def test_a_run_whose_batch_norm_statistics_diverge_saves_nothing_and_records_no_flags(
    tmp_path, tiny, run_cli):
  # Finding (issue 24): Adam at 1e9 kept the loss finite (4e13) while the BatchNorm moving
  # variances went to inf; the run exited 0, every checkpoint held inf, flags.json its flags.
  model_dir = str(tmp_path / 'run')
  # The demo's width and batch (the tiny run's weights stay finite at this rate).
  args = [f for f in tiny if not f.startswith(('--learning_rate', '--width_multiplier',
                                               '--train_batch_size', '--num_proj_layers',
                                               '--proj_out_dim'))]
  code, err = run_cli(*args, f'--model_dir={model_dir}', '--learning_rate=1e9',
                      '--width_multiplier=0.25', '--train_batch_size=32',
                      '--train_steps=20', '--checkpoint_steps=5')
  assert code == 1, err[-2000:]
  assert re.search(r'error: Non-finite \(or overflowing\) state between steps 1 and 5 \(.*'
                   r'moving_variance.*no checkpoint of this run is kept', err, re.M), err[-2000:]
  assert not glob.glob(os.path.join(model_dir, 'ckpt-*'))
  assert not os.path.exists(os.path.join(model_dir, 'flags.json'))
  starts = run_record.read_flags_history(model_dir)
  assert [s['diverged_at_step'] for s in starts] == [5]


@pytest.mark.slow
def test_sogclr_trains_finite_at_temperature_001_in_bfloat16(tmp_path, tiny, run_main):
  # exp(1/0.01) overflows float32: the log-domain u table and the loss math, in float32 under
  # the bfloat16 policy, must not (in float32 alone: test_objective.py).
  model_dir = str(tmp_path / 'run')
  # Finding (red team): run() handed back float32 whatever policy its caller had set.
  tf.keras.mixed_precision.set_global_policy('mixed_float16')
  try:
    results = run_main(*tiny, f'--model_dir={model_dir}', '--DCL_mode=True',
                       '--temperature=0.01', '--mixed_precision=bfloat16', '--train_steps=4')
    # run() hands the caller's policy back, whatever the run computed in; its results say which.
    assert tf.keras.mixed_precision.global_policy().name == 'mixed_float16'
  finally:
    tf.keras.mixed_precision.set_global_policy('float32')
  assert np.isfinite(results['eval/top_1'])
  assert results['precision'] == 'mixed_bfloat16'
  assert json.load(open(os.path.join(model_dir, 'result_4.json')))['precision'] == 'mixed_bfloat16'
  latest = tf.train.latest_checkpoint(model_dir)
  log_u = tf.train.load_variable(latest, checkpoints.LOG_U_KEY)
  visited = np.isfinite(log_u)
  assert visited.sum() == 4 * 16  # every visited image has a real u, never -inf or NaN
  assert not np.any(np.isnan(log_u)) and np.all(log_u[visited] > 20)
  # Some u exceed what float32 holds: a linear-domain table would have overflowed.
  assert np.max(log_u[visited]) > np.log(np.finfo(np.float32).max)


# -- Fine-tuning -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_linear_eval_freezes_the_trunk_and_zeroes_the_head_and_reads_the_architecture(
    tmp_path, not_architecture, run_main, pretrained, restored):
  model_dir = str(tmp_path / 'lineval')
  # Only non-architecture flags: depth, width and head sizes come from the pretraining run's
  # flags.json.
  results = run_main(*not_architecture, f'--model_dir={model_dir}', '--train_mode=finetune',
                     f'--checkpoint={pretrained}', '--fine_tune_after_block=4',
                     '--zero_init_logits_layer=True', '--optimizer=momentum',
                     '--learning_rate=0.1', '--train_steps=3', '--mode=train_then_eval')
  assert results['global_step'] == 3 and results['eval/num_examples'] == 360
  flags = json.load(open(os.path.join(model_dir, 'flags.json')))
  assert flags['train_mode'] == 'finetune' and flags['resolved_loss'] == 'cross_entropy'
  before = restored(tf.train.latest_checkpoint(pretrained))
  after = restored(tf.train.latest_checkpoint(model_dir), train_mode='finetune')
  trunk_before = {v.path.split('/', 1)[1]: v.numpy() for v in before.trunk.variables}
  trunk_after = {v.path.split('/', 1)[1]: v.numpy() for v in after.trunk.variables}
  assert trunk_before.keys() == trunk_after.keys() and len(trunk_before) > 50
  for name, value in trunk_before.items():  # BN moving statistics included
    np.testing.assert_array_equal(trunk_after[name], value, err_msg=name)
  # The head trained from zeros (not from the pretraining run's head).
  assert np.any(after.supervised_head.kernel.numpy() != 0)
  assert not np.allclose(after.supervised_head.kernel.numpy(),
                         before.supervised_head.kernel.numpy())


@pytest.mark.slow
def test_zero_init_logits_layer_zeroes_the_restored_head(tmp_path, tiny, run_main, pretrained,
                                                         restored, monkeypatch):
  logged = []
  info = experiment.logging.info
  monkeypatch.setattr(experiment.logging, 'info',
                      lambda msg, *args: logged.append(msg % args) or info(msg, *args))
  model_dir = str(tmp_path / 'zero')
  # --learning_rate=0 is refused; the warm-up's first learning rate is 0, so the one step
  # leaves the head as restored.
  run_main(*tiny, f'--model_dir={model_dir}', '--train_mode=finetune',
           f'--checkpoint={pretrained}', '--fine_tune_after_block=4',
           '--zero_init_logits_layer=True', '--optimizer=momentum', '--warmup_epochs=1',
           '--train_steps=1')
  head = restored(tf.train.latest_checkpoint(model_dir), train_mode='finetune')
  assert np.all(head.supervised_head.kernel.numpy() == 0)
  assert np.all(head.supervised_head.bias.numpy() == 0)
  # Fine-tuning uses no contrastive loss, so the log names none (it said "loss sogclr").
  strategy_line = [line for line in logged if 'replica(s)' in line]
  assert len(strategy_line) == 1 and 'loss n/a (finetune);' in strategy_line[0], strategy_line


@pytest.mark.slow
def test_finetune_from_an_export_starts_from_the_exported_weights(
    tmp_path, not_architecture, run_main, data_dir, pretrained, restored):
  export = os.path.join(pretrained, 'saved_model', '3')
  model_dir = str(tmp_path / 'from_export')
  # Only non-architecture flags: the architecture comes from the export's flags.json.
  results = run_main(*not_architecture, f'--model_dir={model_dir}', '--train_mode=finetune',
                     f'--checkpoint={export}', '--fine_tune_after_block=4', '--train_steps=2')
  assert results['global_step'] == 2
  exported = restored(os.path.join(export, 'variables', 'variables'))
  pretrained_model = restored(tf.train.latest_checkpoint(pretrained))
  after = restored(tf.train.latest_checkpoint(model_dir), train_mode='finetune')
  # The fine-tuned head's top-1 is that of its checkpoint, computed independently.
  assert results['eval/top_1'] == head_top_1(after, data_dir)
  trunks = [{v.path.split('/', 1)[1]: v.numpy() for v in m.trunk.variables}
            for m in (exported, pretrained_model, after)]
  assert trunks[0].keys() == trunks[2].keys() and len(trunks[0]) > 50
  for name, value in trunks[0].items():
    np.testing.assert_array_equal(value, trunks[1][name], err_msg=name)
    np.testing.assert_array_equal(trunks[2][name], value, err_msg=name)


# -- Evaluation jobs (--mode=eval) -----------------------------------------------------------------

@pytest.mark.slow
def test_regularization_loss_is_the_weight_decay_of_the_kernels(pretrained_run, restored):
  pretrained, results = pretrained_run
  model = restored(tf.train.latest_checkpoint(pretrained))
  # 1e-3 * sum(w^2) / 2 over trainable variables except BN scales/offsets and biases.
  kernels = [v.numpy().astype(np.float64) for v in model.trainable_variables
             if v.name not in ('gamma', 'beta', 'bias')]
  assert len(kernels) > 10 and len(kernels) < len(model.trainable_variables)
  expected = 1e-3 * sum(np.sum(k ** 2) for k in kernels) / 2
  assert results['eval/regularization_loss'] == pytest.approx(expected, rel=1e-5)
  saved = json.load(open(os.path.join(pretrained, 'result_3.json')))
  assert saved['eval/regularization_loss'] == results['eval/regularization_loss']
  assert 'eval/regularization_loss' in summaries.tags(pretrained)


@pytest.mark.slow
def test_eval_mode_evaluates_the_final_checkpoint_and_exits(tmp_path, tiny, run_main,
                                                            pretrained_run):
  pretrained, pretrained_results = pretrained_run
  model_dir = copied_model_dir(pretrained, tmp_path)
  shutil.rmtree(os.path.join(model_dir, 'saved_model'))
  # The tiny flags' --optimizer=adam is not the run's (LARS): harmless, only the model is
  # restored.
  results = run_main(*tiny, *MONITORS, f'--model_dir={model_dir}', '--mode=eval',
                     '--train_steps=3', '--eval_timeout_seconds=60', '--keep_hub_module_max=1')
  assert results['global_step'] == 3 and results['eval/num_examples'] == 360
  saved = json.load(open(os.path.join(model_dir, 'result_3.json')))
  assert saved['eval/top_1'] == pytest.approx(results['eval/top_1'])
  assert json.load(open(os.path.join(model_dir, 'flags.json')))['mode'] == 'train'
  # The same checkpoint as the pretraining run's own evaluation, so the same monitors.
  for key in ('eval/knn_top_1', 'eval/regularization_loss', 'eval/top_1'):
    assert saved[key] == results[key] == pretrained_results[key], key
  assert os.listdir(os.path.join(model_dir, 'saved_model')) == ['3']


@pytest.mark.slow
def test_eval_mode_without_a_supervised_head_still_runs_the_knn_monitor(
    tmp_path, tiny, run_main, pretrained_run):
  pretrained, pretrained_results = pretrained_run
  model_dir = copied_model_dir(pretrained, tmp_path)
  results = run_main(*tiny, *MONITORS, f'--model_dir={model_dir}', '--mode=eval',
                     '--train_steps=3', '--eval_timeout_seconds=60',
                     '--lineareval_while_pretraining=False')
  assert 'eval/top_1' not in results
  assert results['eval/knn_top_1'] == pretrained_results['eval/knn_top_1']
  assert 0 < results['eval/regularization_loss'] < pretrained_results['eval/regularization_loss']
  saved = json.load(open(os.path.join(model_dir, 'result_3.json')))
  assert {key: saved[key] for key in results} == results
  # The training run's linear-head numbers, not recomputed here, stay.
  assert saved['eval/top_1'] == pretrained_results['eval/top_1']


@pytest.mark.slow
def test_eval_mode_on_another_split_leaves_the_runs_files_alone(tmp_path, run_main, pretrained):
  # Finding (issue 24, rerun): --mode=eval --eval_split=train without --eval_name replaced the
  # run's Projector tensor (360 test rows by 1,437 train rows, beside the test images' metadata
  # and sprite) and wrote its eval/ summaries among the run's own.
  model_dir = copied_model_dir(pretrained, tmp_path)
  shutil.rmtree(os.path.join(model_dir, 'saved_model'))

  def files():
    return {os.path.relpath(os.path.join(d, n), model_dir): open(os.path.join(d, n), 'rb').read()
            for d, _, names in os.walk(model_dir) for n in names}

  before = files()
  assert 'projector/features_3.tsv' in before
  results = run_main(f'--model_dir={model_dir}', '--mode=eval', '--eval_split=train',
                     '--eval_timeout_seconds=60', '--keep_hub_module_max=0')
  after = files()
  assert {name: after[name] for name in before} == before
  assert results['eval/num_examples'] == 1437
  saved = json.load(open(os.path.join(model_dir, 'result_3_train.json')))
  assert saved['eval_split'] == 'train' and saved['eval/top_1'] == results['eval/top_1']
  own = os.path.join(model_dir, 'eval_train')
  assert summaries.steps(own, 'eval/label_top_1_accuracy') == [3]
  rows = open(os.path.join(own, 'projector', 'features_3.tsv')).read().splitlines()
  config = open(os.path.join(own, 'projector_config.pbtxt')).read()
  metadata = re.search(r'metadata_path: "(.*)"', config).group(1)
  labels = open(os.path.join(own, metadata)).read().splitlines()
  assert len(rows) == len(labels) - 1 == 1437  # metadata has a header line
  assert 'tensor_shape: 1437' in config


@pytest.mark.slow
def test_a_named_evaluation_on_another_split_gets_its_own_directory(tmp_path, run_main,
                                                                   pretrained):
  # Finding (red team): --eval_name=foo on test, then on train, wrote both splits' scalars at
  # the same step into eval_foo/ and replaced its Projector tensor by the train split's.
  model_dir = copied_model_dir(pretrained, tmp_path)
  shutil.rmtree(os.path.join(model_dir, 'saved_model'))
  flags = [f'--model_dir={model_dir}', '--mode=eval', '--eval_name=foo',
           '--eval_timeout_seconds=60', '--keep_hub_module_max=0', '--projector_max_points=50']
  on_test = run_main(*flags)
  on_train = run_main(*flags, '--eval_split=train')
  again = run_main(*flags, '--eval_split=train')
  assert on_train['eval/top_1'] == again['eval/top_1'] != on_test['eval/top_1']
  for logdir, split, results in (('eval_foo', 'test', on_test),
                                 ('eval_foo_train', 'train', on_train)):
    path = os.path.join(model_dir, logdir)
    assert open(os.path.join(path, 'eval_split.txt')).read() == split + '\n'
    # (eval_foo_train: once per evaluation of it, the same value.)
    steps, values = summaries.scalars(path, 'eval/label_top_1_accuracy')
    assert set(steps) == {3} and values == pytest.approx([results['eval/top_1']] * len(values))
    # Its Projector tensor is its split's sample.
    ids = [int(line.split('\t')[0]) for line in glob_one(path, 'projector/metadata_*.tsv')[1:]]
    np.testing.assert_array_equal(
        ids, projector.sample_ids(results['eval/num_examples'], 50))


def glob_one(folder, pattern):
  """The lines of the one file matching `pattern` in `folder`."""
  [path] = glob.glob(os.path.join(folder, pattern))
  return open(path).read().splitlines()


@pytest.mark.slow
def test_eval_mode_that_stops_waiting_before_the_final_step_says_so(tmp_path, run_main,
                                                                   pretrained, caplog):
  # Finding (red team): it ended with a normal Result line, nothing said the final step was
  # never evaluated.
  model_dir = copied_model_dir(pretrained, tmp_path)
  with caplog.at_level('WARNING', logger='absl'):
    results = run_main(f'--model_dir={model_dir}', '--mode=eval', '--eval_timeout_seconds=1',
                       '--keep_hub_module_max=0', '--train_steps=6')
  assert results['global_step'] == 3
  assert [r.getMessage() for r in caplog.records if r.getMessage().startswith('Stopped')] == [
      f'Stopped waiting: no new checkpoint in --model_dir={model_dir} for '
      "--eval_timeout_seconds=1; the newest evaluated is step 3 of the run's 6 (a longer "
      '--eval_timeout_seconds waits for a run still training).']


@pytest.mark.slow
def test_eval_mode_over_damaged_checkpoints_names_each(tmp_path, run_main, pretrained):
  # Finding (issue 24, rerun): 'error: OpError: file is too short to be an sstable', nothing
  # named.
  model_dir = copied_model_dir(pretrained, tmp_path)
  open(os.path.join(model_dir, 'ckpt-3.index'), 'w').write('garbage')
  with pytest.raises(ValueError, match=r"^--model_dir='.*' holds no checkpoint that can be read: "
                                       r'ckpt-3 \(OpError: .*sstable'):
    run_main(f'--model_dir={model_dir}', '--mode=eval', '--eval_timeout_seconds=1',
             '--keep_hub_module_max=0')


@pytest.fixture(scope='module')
def evaluated_copy(tmp_path_factory, run_main, pretrained):
  """(model_dir, results) of --mode=eval on a copy of the pretraining run, given only the
  model_dir: no model, data, optimizer, loss, weight-decay or training-length flag."""
  model_dir = str(tmp_path_factory.mktemp('evaluated') / 'copy')
  shutil.copytree(pretrained, model_dir)
  results = run_main(f'--model_dir={model_dir}', '--mode=eval', '--eval_timeout_seconds=60',
                     '--keep_hub_module_max=0')
  return model_dir, results


@pytest.mark.slow
def test_eval_mode_needs_only_the_model_dir(pretrained_run, evaluated_copy):
  # The run's LARS and SogCLR state is not restored (the step is read from the checkpoint);
  # its --weight_decay=1e-3, data and length come from its flags.json.
  _, pretrained_results = pretrained_run
  _, results = evaluated_copy
  assert results['global_step'] == 3
  for key in ('eval/num_examples', 'eval/top_1', 'eval/top_5', 'eval/regularization_loss'):
    assert results[key] == pretrained_results[key], key


@pytest.mark.slow
def test_eval_mode_keeps_the_results_already_written_for_the_step(pretrained_run,
                                                                  evaluated_copy):
  _, pretrained_results = pretrained_run
  model_dir, results = evaluated_copy
  saved = json.load(open(os.path.join(model_dir, 'result_3.json')))
  # The probe's, the kNN monitor's and the training time, not recomputed by this job ...
  for key in ('probe/top_1', 'eval/knn_top_1', 'train_seconds'):
    assert saved[key] == pretrained_results[key], key
  # ... beside its own evaluation.
  assert {key: saved[key] for key in results} == results
  assert not [name for name in os.listdir(model_dir) if name.startswith('.result')]


@pytest.mark.slow
def test_non_chief_evaluation_writes_no_results_and_removes_its_directory(
    tmp_path, data_dir, pretrained, one_replica, tiny_model_config):
  model_dir = copied_model_dir(pretrained, tmp_path)
  os.remove(os.path.join(model_dir, 'result_3.json'))
  shutil.rmtree(os.path.join(model_dir, 'saved_model'))
  config = experiment.Config(
      model_dir=model_dir, mode='eval',
      data=data_lib.DataConfig(dataset='digits', data_dir=data_dir, eval_split='test',
                               image_size=16),
      model=tiny_model_config(), loop=trainer_lib.LoopConfig(train_steps=3),
      eval=evaluation.EvalConfig(eval_batch_size=100, eval_timeout_seconds=60))
  builder = data_lib.get_builder('digits', data_dir)
  info = data_lib.describe(builder, 'train', 'test')
  with one_replica.scope():
    model = model_lib.build_model(config.model, 16)
  before = sorted(os.listdir(model_dir))
  write_dir = checkpoints.prepare_write_dir(model_dir, chief=False, task_id=1)
  assert write_dir == os.path.join(model_dir, '.worker_1_tmp')
  setup = experiment.Setup(strategy=one_replica, builder=builder, info=info, chief=False,
                           write_dir=write_dir, steps_per_epoch=89, total_steps=3,
                           warmup_steps=0, jit_compile=False)
  results = experiment.evaluate_checkpoints(config, setup, model)
  assert results['global_step'] == 3 and results['eval/num_examples'] == 360
  # It evaluated (and exported: saving is collective), but left model_dir as it was.
  assert sorted(os.listdir(model_dir)) == before


# -- A run without flags ---------------------------------------------------------------------------

# A notebook's run: plain configs, experiment.run, then the checkpoint restored into a fresh model.
NOTEBOOK = r'''
import json
import os
import sys

from absl import flags
import numpy as np
import tensorflow as tf

import checkpoints
import data
import distribution
import evaluation
import experiment
import model as model_lib
import trainer

model_dir, data_dir = sys.argv[1:]
model_config = model_lib.ModelConfig(resnet_depth=10, width_multiplier=0.125, cifar_stem=True,
                                     num_proj_layers=2, proj_out_dim=16, num_classes=10)
config = experiment.Config(
    model_dir=model_dir,
    data=data.DataConfig(dataset='digits', data_dir=data_dir, eval_split='test', image_size=16,
                         use_blur=False),
    model=model_config,
    optimizer=trainer.OptimizerConfig(name='adam', learning_rate=0.01, warmup_epochs=0),
    loop=trainer.LoopConfig(train_batch_size=16, train_steps=3, log_every_seconds=0),
    eval=evaluation.EvalConfig(eval_batch_size=100, knn_monitor=True, knn_k=20,
                               probe_baselines=False),
    distribution=distribution.DistributionConfig(mixed_precision='float32'))
results = experiment.run(config)

latest = tf.train.latest_checkpoint(model_dir)
fresh = model_lib.build_model(model_config, 16)
initial = [v.numpy() for v in fresh.variables]
checkpoints.restore_model(fresh, latest)
reference = model_lib.build_model(model_config, 16)
tf.train.Checkpoint(model=reference).restore(latest).expect_partial()
images = np.random.default_rng(0).uniform(size=(4, 16, 16, 3)).astype(np.float32)
served = tf.saved_model.load(os.path.join(model_dir, 'saved_model', '3')).signatures[
    'serving_default'](images=tf.constant(images))
outputs = fresh(images, training=False)
print(json.dumps({
    'results': results,
    'num_variables': len(fresh.variables),
    'equal_to_checkpoint': [bool(np.array_equal(a.numpy(), b.numpy()))
                            for a, b in zip(fresh.variables, reference.variables)],
    'changed_by_restore': sum(not np.array_equal(a.numpy(), b)
                              for a, b in zip(fresh.variables, initial)),
    'export_difference': max(float(np.max(np.abs(served[k].numpy() - outputs[k].numpy())))
                             for k in served),
    'run_imported': 'run' in sys.modules,
    'flags_parsed': flags.FLAGS.is_parsed(),
}))
'''


@pytest.mark.slow
def test_a_run_configured_without_flags_trains_evaluates_and_restores(repo, tmp_path, data_dir):
  model_dir = str(tmp_path / 'notebook')
  process = subprocess.run([sys.executable, '-c', NOTEBOOK, model_dir, data_dir], cwd=repo,
                           capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert process.returncode == 0, process.stderr[-3000:]
  report = json.loads(process.stdout.strip().splitlines()[-1])
  assert not report['run_imported'] and not report['flags_parsed']
  assert tf.train.latest_checkpoint(model_dir).endswith('ckpt-3')
  assert os.path.isdir(os.path.join(model_dir, 'saved_model', '3'))
  results = report['results']
  assert results == json.load(open(os.path.join(model_dir, 'result_3.json')))
  assert results['global_step'] == 3 and results['eval/num_examples'] == 360
  assert results['train_seconds'] > 0 and results['eval/regularization_loss'] > 0
  assert 0 <= results['eval/top_5'] - results['eval/top_1'] <= 1
  # Far above chance (0.1) after 3 steps; measured: kNN 0.60, probe 0.73.
  assert results['eval/knn_top_1'] > 0.35 and results['probe/top_1'] > 0.45
  # The restored model holds the checkpoint's values (every variable) and is the model the
  # run trained and exported.
  assert report['num_variables'] > 60 and all(report['equal_to_checkpoint'])
  assert report['changed_by_restore'] > report['num_variables'] // 2
  assert report['export_difference'] < 1e-5
  # No command line, yet flags.json records the run, from the config itself (what it records:
  # test_run_record.py).
  recorded = json.load(open(os.path.join(model_dir, 'flags.json')))
  assert (recorded['resolved_loss'], recorded['dataset'], recorded['image_size'],
          recorded['resnet_depth'], recorded['data_dir']) == ('sogclr', 'digits', 16, 10, data_dir)


@pytest.mark.slow
def test_official_linear_evaluation_command_runs_as_written(tmp_path, not_architecture,
                                                            pretrained, run_in_process,
                                                            restored):
  # The official SogCLR linear-evaluation flags, with the demo data and a tiny length
  # substituted, on a checkpoint pretrained with --num_proj_layers=2.
  model_dir = str(tmp_path / 'lineval')
  result = run_in_process(
      *not_architecture, '--mode=train_then_eval', '--train_mode=finetune',
      '--fine_tune_after_block=4', '--zero_init_logits_layer=True', '--num_proj_layers=0',
      '--ft_proj_selector=-1', '--global_bn=True', '--optimizer=momentum',
      '--learning_rate=0.1', '--weight_decay=0', '--train_steps=4', '--warmup_epochs=0',
      '--eval_name=linear_eval', f'--model_dir={model_dir}', f'--checkpoint={pretrained}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(r'^Result: trained in \d+ s; linear head top-1 0\.\d{4} on test$',
                   result.stdout, re.M), result.stdout
  # A named evaluation's results have a file of their own (issue 24).
  record = json.load(open(os.path.join(model_dir, 'result_4_linear_eval.json')))
  assert record['eval_name'] == 'linear_eval' and record['eval/num_examples'] == 360
  assert record['eval_split'] == 'test'
  assert glob.glob(os.path.join(model_dir, 'eval_linear_eval', 'events.out.tfevents.*'))
  flags = json.load(open(os.path.join(model_dir, 'flags.json')))
  assert (flags['num_proj_layers'], flags['ft_proj_selector']) == (0, -1)
  # No projection layers: the head reads the frozen trunk features, which are the checkpoint's.
  after = restored(tf.train.latest_checkpoint(model_dir), train_mode='finetune',
                   num_proj_layers=0, ft_proj_selector=-1)
  before = restored(tf.train.latest_checkpoint(pretrained))
  assert not after.projection_head.variables
  assert after.supervised_head.kernel.shape == (after.trunk.output_dim, 10)
  for a, b in zip(after.trunk.variables, before.trunk.variables, strict=True):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


# Monitoring while pretraining: an evaluation every 2 steps, deterministic (compared below with
# the same run without it).
MONITORED = ['--train_steps=4', '--probe_max_examples=100000', '--probe_baselines=False',
             '--DCL_mode=True', '--deterministic']


@pytest.fixture(scope='module')
def monitored_run(tmp_path_factory, tiny, run_main):
  """(model_dir, results) of 4 SogCLR steps evaluated every 2 steps, with the kNN monitor."""
  model_dir = str(tmp_path_factory.mktemp('monitored'))
  return model_dir, run_main(*tiny, *MONITORS, *MONITORED, f'--model_dir={model_dir}',
                             '--eval_every_steps=2')


@pytest.mark.slow
def test_eval_every_steps_logs_head_and_knn_top_1_at_each_evaluation(monitored_run):
  model_dir, results = monitored_run
  monitor = results['monitor']
  assert [r['global_step'] for r in monitor] == [2, 4]
  assert [r['epoch'] for r in monitor] == [2 / 89, 4 / 89]  # 1437 // 16 = 89 steps an epoch
  for record in monitor:
    assert 0 <= record['eval/top_1'] <= 1 and 0 < record['eval/knn_top_1'] <= 1
    assert record['eval_seconds'] > 0 and record['train_seconds'] > 0
  assert monitor[0]['train_seconds'] < monitor[1]['train_seconds'] <= results['train_seconds']
  assert results['monitor_seconds'] == pytest.approx(
      sum(r['eval_seconds'] for r in monitor), abs=0.1)
  # The last one evaluated the final weights, as the final evaluation does.
  assert monitor[1]['eval/top_1'] == results['eval/top_1']
  assert monitor[1]['eval/knn_top_1'] == results['eval/knn_top_1']
  saved = json.load(open(os.path.join(model_dir, 'result_2.json')))
  assert saved['global_step'] == 2 and saved['eval/knn_top_1'] == monitor[0]['eval/knn_top_1']
  assert saved['eval/top_1'] == monitor[0]['eval/top_1']
  # Finding (red team): an evaluation while training did not record the precision.
  assert saved['precision'] == results['precision']
  assert json.load(open(os.path.join(model_dir, 'result_4.json')))['monitor'] == monitor
  # TensorBoard: each evaluation once at its step (the final one is step 4's, not repeated).
  steps, values = summaries.scalars(model_dir, 'eval/knn_top_1')
  assert steps == [2, 4]
  assert values == pytest.approx([monitor[0]['eval/knn_top_1'], monitor[1]['eval/knn_top_1']])
  assert summaries.scalars(model_dir, 'eval/label_top_1_accuracy')[0] == [2, 4]


@pytest.mark.slow
def test_a_resumed_run_evaluates_the_step_whose_evaluation_the_stopped_run_lost(
    tmp_path, tiny, run_main):
  # Finding (issue 24, rerun): killed during the evaluation at step 10 (its checkpoint written),
  # the resumed run went on from step 10 and never evaluated it.
  model_dir = str(tmp_path / 'run')
  flags = (*tiny, *MONITORS, f'--model_dir={model_dir}', '--eval_every_steps=2')
  run_main(*flags, '--train_steps=2')
  os.remove(os.path.join(model_dir, 'result_2.json'))  # as if killed during its evaluation
  results = run_main(*flags, '--train_steps=4')
  assert [r['global_step'] for r in results['monitor']] == [2, 4]
  saved = json.load(open(os.path.join(model_dir, 'result_2.json')))
  assert saved['eval/knn_top_1'] == results['monitor'][0]['eval/knn_top_1']
  # Before this start trained: 0 of its seconds, from the step it resumed at.
  assert (saved['train_seconds_so_far'], saved['trained_from_step']) == (0.0, 2)
  assert results['trained_from_step'] == 2


@pytest.mark.slow
def test_summaries_hold_the_u_table_the_augmented_views_and_the_hparams(monitored_run):
  from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: PLC0415

  model_dir, results = monitored_run
  found = summaries.events(model_dir)
  # After every call (the first runs 1 step; the others stop at the evaluation at step 2 and
  # run 1 or 2 steps by the machine's speed), the fraction of the 1,437 images visited: one
  # batch of 16 more a step.
  steps, values = summaries.scalars(model_dir, 'u/visited_fraction')
  assert steps == summaries.scalars(model_dir, 'train/total_loss')[0] and {1, 2, 4} <= set(steps)
  assert values == pytest.approx([16 * step / 1437 for step in steps])
  # log u of the visited images: a histogram at the first call and at the (final) checkpoint.
  histograms = [(step, tf.make_ndarray(v.tensor)) for step, tag, v in found if tag == 'u/log_u']
  assert [step for step, _ in histograms] == [1, 4]
  for (_, buckets), visited in zip(histograms, (16, 64)):
    assert buckets.shape[1] == 3 and buckets[:, 2].sum() == visited
    assert np.all(np.isfinite(buckets[:, :2])) and buckets[0, 0] > 0  # log u > 0 at tau = 0.1
  # Once, at the start: 4 images of the two augmented 16x16 views side by side.
  (images,) = [tf.make_ndarray(v.tensor) for step, tag, v in found
               if tag == 'train/augmented_views' and step == 0]
  assert images[:2].tolist() == [b'32', b'16'] and len(images) == 2 + 4
  pair = tf.io.decode_png(images[2]).numpy()
  assert pair.shape == (16, 32, 3) and not np.array_equal(pair[:, :16], pair[:, 16:])
  # The run-defining flags as hparams, with the final metrics next to them.
  (start,) = [v for _, tag, v in found if tag == '_hparams_/session_start_info']
  info = plugin_data_pb2.HParamsPluginData.FromString(
      start.metadata.plugin_data.content).session_start_info
  assert info.hparams['resolved_loss'].string_value == 'sogclr'
  assert info.hparams['train_batch_size'].number_value == 16
  assert info.hparams['temperature'].number_value == pytest.approx(0.1)
  for tag, key in run_record.HPARAMS_METRICS.items():
    steps, values = summaries.scalars(model_dir, key)
    assert steps == [4] and values == pytest.approx([results[tag]])


@pytest.mark.slow
def test_evaluating_while_training_leaves_training_unchanged(monitored_run, tmp_path, tiny,
                                                             run_main):
  model_dir = str(tmp_path / 'plain')
  results = run_main(*tiny, *MONITORS, *MONITORED, f'--model_dir={model_dir}')
  assert 'monitor' not in results
  monitored, _ = monitored_run
  expected = tf.train.load_checkpoint(tf.train.latest_checkpoint(model_dir))
  actual = tf.train.load_checkpoint(tf.train.latest_checkpoint(monitored))
  names = [n for n in expected.get_variable_to_shape_map() if 'OBJECT_GRAPH' not in n]
  assert any('log_u' in n for n in names) and len(names) > 50
  for name in names:
    np.testing.assert_array_equal(actual.get_tensor(name), expected.get_tensor(name), name)
  assert results['eval/knn_top_1'] == monitored_run[1]['eval/knn_top_1']
  assert results['probe/top_1'] == monitored_run[1]['probe/top_1']


@pytest.mark.slow
def test_isogclr_run_summarizes_the_visited_images_temperatures(tmp_path, tiny, run_main):
  model_dir = str(tmp_path / 'run')
  run_main(*tiny, f'--model_dir={model_dir}', '--train_steps=4', '--checkpoint_steps=2',
           '--loss=isogclr', '--isogclr_eta=0.5')
  latest = tf.train.latest_checkpoint(model_dir)
  tau = tf.train.load_variable(latest, checkpoints.TAU_KEY)
  visited = np.isfinite(tf.train.load_variable(latest, checkpoints.LOG_U_KEY))
  assert visited.sum() == 4 * 16
  assert np.all(tau[~visited] == np.float32(0.1))  # never visited: the initial temperature
  scalars, histograms = {}, {}
  for step, tag, value in summaries.events(model_dir):
    if tag == 'train/tau':  # the histogram (u/log_u has its own at the same steps)
      assert value.metadata.plugin_data.plugin_name == 'histograms'
      histograms[step] = tf.make_ndarray(value.tensor)
    elif tag.startswith('train/tau'):
      scalars.setdefault(tag, {})[step] = float(tf.make_ndarray(value.tensor))
  assert set(scalars) == {'train/tau_mean', 'train/tau_min', 'train/tau_max',
                          'train/tau_batch_mean'}
  # The last call's statistics are those of the visited images' temperatures in ckpt-4.
  assert scalars['train/tau_mean'][4] == pytest.approx(np.mean(tau[visited]), rel=1e-5)
  assert scalars['train/tau_min'][4] == pytest.approx(np.min(tau[visited]))
  assert scalars['train/tau_max'][4] == pytest.approx(np.max(tau[visited]))
  assert scalars['train/tau_min'][4] < scalars['train/tau_max'][4]
  # A histogram at each checkpoint: [left edge, right edge, count] rows over the visited ones.
  assert sorted(histograms) == [2, 4]
  assert histograms[4][:, 2].sum() == visited.sum()
  assert histograms[4][0, 0] == pytest.approx(np.min(tau[visited]))


@pytest.mark.slow
def test_pretraining_on_an_unlabelled_split_ends_with_its_results_and_no_probe(
    tmp_path, tiny, run_main, caplog):
  # Finding (issue 24): the README's STL-10 case (labels -1, --lineareval_while_pretraining=
  # False) trained to the end, then the end-of-run probe stopped the run: rc 1, no result.
  import tensorflow_datasets as tfds  # noqa: PLC0415

  import imagenet  # noqa: PLC0415

  def image(i):
    pixels = np.random.RandomState(i).randint(0, 256, (16, 16, 3), np.uint8)
    return tf.io.encode_png(pixels).numpy()

  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(16, 16, 3), encoding_format='png'),
      'label': tfds.features.Scalar(dtype=np.int64)})
  data_dir = str(tmp_path / 'tfds')
  imagenet.write_dataset('minus_one', features, {
      'unlabelled': [{'image': image(i), 'label': -1} for i in range(48)],
      'test': [{'image': image(100 + i), 'label': i % 3} for i in range(12)]}, data_dir)
  model_dir = str(tmp_path / 'run')
  args = [f for f in tiny if not f.startswith(('--data_dir', '--dataset', '--eval_batch_size'))]
  results = run_main(*args, f'--data_dir={data_dir}', '--dataset=minus_one', '--num_classes=3',
                     '--train_split=unlabelled', '--eval_batch_size=4', '--train_steps=2',
                     '--lineareval_while_pretraining=False', f'--model_dir={model_dir}',
                     '--probe_max_examples=100000')
  assert 'No linear probe: the train split \'unlabelled\' has labels outside [0, 3)' in caplog.text
  saved = json.load(open(os.path.join(model_dir, 'result_2.json')))
  assert saved == results and saved['global_step'] == 2 and 'probe/top_1' not in saved
