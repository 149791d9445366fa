"""Fine-tuning, evaluation and export of a pretraining checkpoint (tiny models, the demo data)."""
import glob
import json
import os
import shutil
import types

import numpy as np
import pytest
import tensorflow as tf

import data as data_lib
import model as model_lib
import probe
import run
from test_run import TINY, run_main

ARCHITECTURE = [f for f in TINY if f.split('=')[0].lstrip('-') in run.ARCHITECTURE_FLAGS]
NOT_ARCHITECTURE = [f for f in TINY if f not in ARCHITECTURE]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


# Monitors of the pretraining run; a real weight decay makes the regularization loss visible.
MONITORS = ['--knn_monitor', '--knn_k=20', '--weight_decay=1e-3']


@pytest.fixture(scope='module')
def pretraining(tmp_path_factory, data_dir):
  """3 SogCLR steps with LARS, evaluated with the monitors and the probe, and exported.

  model_dir, results, and extracted: the (features, labels) of each feature extraction.
  """
  model_dir = str(tmp_path_factory.mktemp('pretrained'))
  extracted = []
  extract_features = run.extract_features

  def counted(*args, **kwargs):
    value = extract_features(*args, **kwargs)
    extracted.append(value)
    return value

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(run, 'extract_features', counted)
    # The default --optimizer (LARS) and --loss (SogCLR), which --mode=eval is not told.
    results = run_main(*TINY, *MONITORS, f'--data_dir={data_dir}', f'--model_dir={model_dir}',
                       '--train_steps=3', '--probe_baselines=False', '--DCL_mode=True',
                       '--optimizer=lars', '--learning_rate=1.0')
  return types.SimpleNamespace(model_dir=model_dir, results=results, extracted=extracted)


@pytest.fixture(scope='module')
def pretrained_run(pretraining):
  """(model_dir, results) of the pretraining run."""
  return pretraining.model_dir, pretraining.results


@pytest.fixture(scope='module')
def pretrained(pretrained_run):
  return pretrained_run[0]


def copied_model_dir(pretrained, tmp_path):
  """A copy of the pretraining run, for jobs that write into their model_dir."""
  model_dir = str(tmp_path / 'copy')
  shutil.copytree(pretrained, model_dir)
  return model_dir


def summary_tags(model_dir):
  tags = set()
  for event_file in glob.glob(os.path.join(model_dir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(event_file):
      tags.update(v.tag for v in event.summary.value)
  return tags


def split_features(model, data_dir, split):
  """(trunk features, labels) of a digits split, computed here without run.py's loops."""
  builder = data_lib.get_builder('digits', data_dir)
  info = data_lib.describe(builder, 'train', 'test')
  config = data_lib.InputConfig(split=split, global_batch_size=100, image_size=16,
                                is_training=False, num_views=1)
  dataset = data_lib.build_input_fn(builder, info, config, info.num_classes)(
      tf.distribute.InputContext())
  features, labels = [], []
  for views, one_hot, _ in dataset:
    features.append(model(views[0], training=False)['features'].numpy())
    labels.append(np.argmax(one_hot.numpy(), 1))
  return np.concatenate(features), np.concatenate(labels)


def tiny_model(**overrides):
  """The tiny architecture, freshly initialized."""
  config = dict(resnet_depth=18, width_multiplier=0.125, cifar_stem=True, num_proj_layers=2,
                proj_out_dim=16, num_classes=10)
  return run.build_model(model_lib.ModelConfig(**(config | overrides)), 16)


def restored_model(path, **overrides):
  """The tiny architecture with the model variables of checkpoint `path`."""
  model = tiny_model(**overrides)
  tf.train.Checkpoint(model=model).restore(path).expect_partial()
  return model


@pytest.fixture(scope='module')
def final_features(data_dir, pretrained):
  """(train features, labels, test features, labels) of the pretraining run's final model."""
  model = restored_model(tf.train.latest_checkpoint(pretrained))
  return (*split_features(model, data_dir, 'train'), *split_features(model, data_dir, 'test'))


def test_linear_eval_freezes_the_trunk_and_zeroes_the_head_and_reads_the_architecture(
    tmp_path, data_dir, pretrained):
  model_dir = str(tmp_path / 'lineval')
  # Only non-architecture flags: depth, width and head sizes come from the pretraining run's
  # flags.json.
  results = run_main(*NOT_ARCHITECTURE, f'--data_dir={data_dir}', f'--model_dir={model_dir}',
                     '--train_mode=finetune', f'--checkpoint={pretrained}',
                     '--fine_tune_after_block=4', '--zero_init_logits_layer=True',
                     '--optimizer=momentum', '--learning_rate=0.1', '--train_steps=3',
                     '--mode=train_then_eval')
  assert results['global_step'] == 3 and results['eval/num_examples'] == 360
  flags = json.load(open(os.path.join(model_dir, 'flags.json')))
  assert flags['train_mode'] == 'finetune' and flags['resolved_loss'] == 'cross_entropy'
  before = restored_model(tf.train.latest_checkpoint(pretrained))
  after = restored_model(tf.train.latest_checkpoint(model_dir), train_mode='finetune')
  trunk_before = {v.path.split('/', 1)[1]: v.numpy() for v in before.trunk.variables}
  trunk_after = {v.path.split('/', 1)[1]: v.numpy() for v in after.trunk.variables}
  assert trunk_before.keys() == trunk_after.keys() and len(trunk_before) > 50
  for name, value in trunk_before.items():  # BN moving statistics included
    np.testing.assert_array_equal(trunk_after[name], value, err_msg=name)
  # The head trained from zeros (not from the pretraining run's head).
  assert np.any(after.supervised_head.kernel.numpy() != 0)
  assert not np.allclose(after.supervised_head.kernel.numpy(),
                         before.supervised_head.kernel.numpy())


def test_zero_init_logits_layer_zeroes_the_restored_head(tmp_path, data_dir, pretrained,
                                                         monkeypatch):
  logged = []
  info = run.logging.info
  monkeypatch.setattr(run.logging, 'info',
                      lambda msg, *args: logged.append(msg % args) or info(msg, *args))
  model_dir = str(tmp_path / 'zero')
  run_main(*TINY, f'--data_dir={data_dir}', f'--model_dir={model_dir}', '--train_mode=finetune',
           f'--checkpoint={pretrained}', '--fine_tune_after_block=4',
           '--zero_init_logits_layer=True', '--optimizer=momentum', '--learning_rate=0',
           '--train_steps=1')
  head = restored_model(tf.train.latest_checkpoint(model_dir), train_mode='finetune')
  assert np.all(head.supervised_head.kernel.numpy() == 0)
  assert np.all(head.supervised_head.bias.numpy() == 0)
  # Fine-tuning uses no contrastive loss, so the log names none (it said "loss sogclr").
  strategy_line = [line for line in logged if 'replica(s)' in line]
  assert len(strategy_line) == 1 and 'loss n/a (finetune);' in strategy_line[0], strategy_line


def test_eval_mode_evaluates_the_final_checkpoint_and_exits(tmp_path, data_dir, pretrained_run):
  pretrained, pretrained_results = pretrained_run
  model_dir = copied_model_dir(pretrained, tmp_path)
  shutil.rmtree(os.path.join(model_dir, 'saved_model'))
  # TINY's --optimizer=adam is not the run's (LARS): harmless, only the model is restored.
  results = run_main(*TINY, *MONITORS, f'--data_dir={data_dir}', f'--model_dir={model_dir}',
                     '--mode=eval', '--train_steps=3', '--eval_timeout_seconds=60')
  assert results['global_step'] == 3 and results['eval/num_examples'] == 360
  saved = json.load(open(os.path.join(model_dir, 'result_3.json')))
  assert saved['eval/top_1'] == pytest.approx(results['eval/top_1'])
  assert json.load(open(os.path.join(model_dir, 'flags.json')))['mode'] == 'train'
  # The same checkpoint as the pretraining run's own evaluation, so the same monitors.
  for key in ('eval/knn_top_1', 'eval/regularization_loss', 'eval/top_1'):
    assert saved[key] == results[key] == pretrained_results[key], key
  assert os.listdir(os.path.join(model_dir, 'saved_model')) == ['3']


def test_eval_mode_without_a_supervised_head_still_runs_the_knn_monitor(
    tmp_path, data_dir, pretrained_run):
  pretrained, pretrained_results = pretrained_run
  model_dir = copied_model_dir(pretrained, tmp_path)
  results = run_main(*TINY, *MONITORS, f'--data_dir={data_dir}', f'--model_dir={model_dir}',
                     '--mode=eval', '--train_steps=3', '--eval_timeout_seconds=60',
                     '--lineareval_while_pretraining=False', '--keep_hub_module_max=0')
  assert 'eval/top_1' not in results
  assert results['eval/knn_top_1'] == pretrained_results['eval/knn_top_1']
  assert 0 < results['eval/regularization_loss'] < pretrained_results['eval/regularization_loss']
  saved = json.load(open(os.path.join(model_dir, 'result_3.json')))
  assert {key: saved[key] for key in results} == results
  # The training run's linear-head numbers, not recomputed here, stay.
  assert saved['eval/top_1'] == pretrained_results['eval/top_1']


def test_regularization_loss_is_the_weight_decay_of_the_kernels(pretrained_run):
  pretrained, results = pretrained_run
  model = restored_model(tf.train.latest_checkpoint(pretrained))
  # 1e-3 * sum(w^2) / 2 over trainable variables except BN scales/offsets and biases.
  kernels = [v.numpy().astype(np.float64) for v in model.trainable_variables
             if v.name not in ('gamma', 'beta', 'bias')]
  assert len(kernels) > 20 and len(kernels) < len(model.trainable_variables)
  expected = 1e-3 * sum(np.sum(k ** 2) for k in kernels) / 2
  assert results['eval/regularization_loss'] == pytest.approx(expected, rel=1e-5)
  saved = json.load(open(os.path.join(pretrained, 'result_3.json')))
  assert saved['eval/regularization_loss'] == results['eval/regularization_loss']
  assert 'eval/regularization_loss' in summary_tags(pretrained)


def test_knn_monitor_equals_knn_on_the_checkpoint_features(pretrained_run, final_features):
  pretrained, results = pretrained_run
  train_x, train_y, test_x, test_y = final_features
  assert train_x.shape == (1437, 64) and test_x.shape == (360, 64)
  expected = probe.knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=0.1)
  assert results['eval/knn_top_1'] == expected
  assert 0.1 < expected <= 1.0
  saved = json.load(open(os.path.join(pretrained, 'result_3.json')))
  assert saved['eval/knn_top_1'] == expected
  assert 'eval/knn_top_1' in summary_tags(pretrained)


def test_knn_monitor_and_probe_extract_each_split_once(pretraining, final_features):
  # One extraction of the train split and one of the eval split serve both ...
  assert [len(x) for x, _ in pretraining.extracted] == [1437, 360]
  (train_x, train_y), (test_x, test_y) = pretraining.extracted
  # ... and are the final model's features (to float32 round-off).
  for extracted, expected in zip((train_x, train_y, test_x, test_y), final_features):
    np.testing.assert_allclose(extracted, expected, rtol=1e-4, atol=1e-5)
  assert pretraining.results['eval/knn_top_1'] == probe.knn_accuracy(
      train_x, train_y, test_x, test_y, k=20, temperature=0.1)
  assert pretraining.results['probe/top_1'] == probe.linear_probe_accuracy(
      train_x, train_y, test_x, test_y)


@pytest.fixture(scope='module')
def evaluated_copy(tmp_path_factory, pretrained):
  """(model_dir, results) of --mode=eval on a copy of the pretraining run, given only the
  model_dir: no model, data, optimizer, loss, weight-decay or training-length flag."""
  model_dir = str(tmp_path_factory.mktemp('evaluated') / 'copy')
  shutil.copytree(pretrained, model_dir)
  results = run_main(f'--model_dir={model_dir}', '--mode=eval', '--eval_timeout_seconds=60',
                     '--keep_hub_module_max=0')
  return model_dir, results


def test_eval_mode_needs_only_the_model_dir(pretrained_run, evaluated_copy):
  # The run's LARS and SogCLR state is not restored (the step is read from the checkpoint);
  # its --weight_decay=1e-3, data and length come from its flags.json.
  _, pretrained_results = pretrained_run
  _, results = evaluated_copy
  assert results['global_step'] == 3
  for key in ('eval/num_examples', 'eval/top_1', 'eval/top_5', 'eval/regularization_loss'):
    assert results[key] == pretrained_results[key], key


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


def test_write_results_merges_and_never_leaves_a_truncated_file(tmp_path, monkeypatch):
  path = tmp_path / 'result_7.json'
  path.write_text(json.dumps({'probe/top_1': 0.9, 'eval/top_1': 0.1}))
  merged = run.write_results(str(tmp_path), 7, {'eval/top_1': 0.2, 'global_step': 7})
  assert merged == {'probe/top_1': 0.9, 'eval/top_1': 0.2, 'global_step': 7}
  assert json.loads(path.read_text()) == merged

  def crash(*args, **kwargs):
    raise OSError('simulated crash')

  # A crash before the rename leaves the previous file whole.
  monkeypatch.setattr(tf.io.gfile, 'rename', crash)
  with pytest.raises(OSError, match='simulated'):
    run.write_results(str(tmp_path), 7, {'eval/top_1': 0.3})
  assert json.loads(path.read_text()) == merged
  monkeypatch.undo()
  # A file that is not json (cut short by an older version) is kept aside, not overwritten.
  path.write_text('{"probe/top_1": 0.')
  assert run.write_results(str(tmp_path), 7, {'global_step': 7}) == {'global_step': 7}
  assert (tmp_path / 'result_7.json.unreadable').read_text() == '{"probe/top_1": 0.'
  assert sorted(os.listdir(tmp_path)) == ['result_7.json', 'result_7.json.unreadable']


def test_non_chief_evaluation_writes_no_results_and_removes_its_directory(
    tmp_path, data_dir, pretrained, one_replica):
  model_dir = copied_model_dir(pretrained, tmp_path)
  os.remove(os.path.join(model_dir, 'result_3.json'))
  shutil.rmtree(os.path.join(model_dir, 'saved_model'))
  run.FLAGS.unparse_flags()
  run.FLAGS(['run.py', *TINY, f'--data_dir={data_dir}', f'--model_dir={model_dir}',
             '--train_steps=3', '--eval_timeout_seconds=60'])
  builder = data_lib.get_builder('digits', data_dir)
  info = data_lib.describe(builder, 'train', 'test')
  with one_replica.scope():
    model = run.build_model(run.model_config(info.num_classes), 16)
  before = sorted(os.listdir(model_dir))
  write_dir = os.path.join(model_dir, '.worker_1_tmp')  # as prepare_write_dir names it
  os.makedirs(write_dir)
  results = run.evaluate_checkpoints(one_replica, model, builder, info,
                                     tf.summary.create_noop_writer(), 3, write_dir=write_dir,
                                     chief=False)
  assert results['global_step'] == 3 and results['eval/num_examples'] == 360
  # It evaluated (and exported: saving is collective), but left model_dir as it was.
  assert sorted(os.listdir(model_dir)) == before


def test_restore_model_names_missing_and_mismatched_variables(tmp_path, data_dir, pretrained):
  path = tf.train.latest_checkpoint(pretrained)
  with pytest.raises(ValueError, match=r'supervised_head/kernel \(64, 5\) is \(64, 10\) there'):
    run.restore_model(tiny_model(num_classes=5), path)
  with pytest.raises(ValueError, match=r'another architecture: \S+ \([\d, ]*\) missing'):
    run.restore_model(tiny_model(se_ratio=0.25), path)
  model = tiny_model()
  run.restore_model(model, path)
  expected = restored_model(path)
  for a, b in zip(model.variables, expected.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
  # Through --mode=eval: one line naming --model_dir and the variable.
  model_dir = copied_model_dir(pretrained, tmp_path)
  with pytest.raises(ValueError, match=r'--model_dir=.*another architecture: .*projection_head/'
                                       r'\S+ \(.*32,?\) is \(.*16,?\) there'):
    run_main(f'--model_dir={model_dir}', f'--data_dir={data_dir}', '--mode=eval',
             '--proj_out_dim=32', '--eval_timeout_seconds=60')


def test_restore_pretrained_checks_every_trunk_and_projection_variable(tmp_path, pretrained):
  """--checkpoint: trunk and projection head must all be there; the linear head may be new or
  for another number of classes."""
  with pytest.raises(ValueError, match=r"--checkpoint='[^']*' holds another architecture: "
                                       r'\S+/se/\S+ \([\d, ]*\) missing'):
    run.restore_pretrained(tiny_model(se_ratio=0.25, train_mode='finetune'), pretrained)
  # Fine-tuning on a dataset with another number of classes: the pretraining run's 10-class
  # head is left out, the new 5-class head starts as initialized; the rest is restored.
  model = tiny_model(num_classes=5, train_mode='finetune')
  head_before = [v.numpy() for v in model.supervised_head.variables]
  run.restore_pretrained(model, pretrained)
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
  run.restore_pretrained(model, trunk_only)
  for a, b in zip(model.trunk.variables, source.trunk.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
  for a, b in zip(model.supervised_head.variables, head_before):
    np.testing.assert_array_equal(a.numpy(), b)


def test_checkpoint_step_reads_the_optimizer_step_or_the_file_name(tmp_path, pretrained):
  assert run.checkpoint_step(tf.train.latest_checkpoint(pretrained)) == 3
  variable = tf.Variable(tf.ones([3]))
  optimizer = tf.keras.optimizers.LossScaleOptimizer(tf.keras.optimizers.SGD(0.1))
  optimizer.build([variable])
  for _ in range(2):
    optimizer.apply_gradients([(tf.ones([3]), variable)])
  # float16 training: the wrapper's own counter stays 0, the inner optimizer's counts.
  path = tf.train.Checkpoint(optimizer=optimizer).write(str(tmp_path / 'mixed' / 'ckpt-9'))
  assert run.checkpoint_step(path) == 2
  path = tf.train.Checkpoint(variable=variable).write(str(tmp_path / 'plain' / 'ckpt-7'))
  assert run.checkpoint_step(path) == 7


def test_export_signature_matches_the_keras_model(pretrained):
  export = os.path.join(pretrained, 'saved_model', '3')
  assert os.listdir(os.path.join(pretrained, 'saved_model')) == ['3']
  assert json.load(open(os.path.join(export, 'flags.json')))['resnet_depth'] == 18
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


def test_export_keeps_the_newest_and_outputs_float32_under_mixed_precision(tmp_path):
  tf.keras.mixed_precision.set_global_policy('mixed_bfloat16')
  try:
    model = run.build_model(model_lib.ModelConfig(
        resnet_depth=18, width_multiplier=0.125, cifar_stem=True, num_proj_layers=2,
        proj_out_dim=16, num_classes=10), 16)
  finally:
    tf.keras.mixed_precision.set_global_policy('float32')
  export_dir = str(tmp_path / 'saved_model')
  for step in (1, 2, 3):
    path = run.export_saved_model(model, export_dir, step, image_size=16, keep=2)
  assert path == os.path.join(export_dir, '3')
  assert sorted(os.listdir(export_dir)) == ['2', '3']  # no temporary directory left either
  outputs = tf.saved_model.load(path).signatures['serving_default'](
      images=tf.random.uniform([2, 16, 16, 3]))
  assert {k: v.dtype for k, v in outputs.items()} == {
      'features': tf.float32, 'projection': tf.float32, 'supervised_logits': tf.float32}


def test_finetune_from_an_export_starts_from_the_exported_weights(tmp_path, data_dir,
                                                                  pretrained):
  export = os.path.join(pretrained, 'saved_model', '3')
  model_dir = str(tmp_path / 'from_export')
  # Only non-architecture flags: the architecture comes from the export's flags.json.
  results = run_main(*NOT_ARCHITECTURE, f'--data_dir={data_dir}', f'--model_dir={model_dir}',
                     '--train_mode=finetune', f'--checkpoint={export}',
                     '--fine_tune_after_block=4', '--train_steps=2')
  assert results['global_step'] == 2 and 0 <= results['eval/top_1'] <= 1
  exported = restored_model(os.path.join(export, 'variables', 'variables'))
  pretrained_model = restored_model(tf.train.latest_checkpoint(pretrained))
  after = restored_model(tf.train.latest_checkpoint(model_dir), train_mode='finetune')
  trunks = [{v.path.split('/', 1)[1]: v.numpy() for v in m.trunk.variables}
            for m in (exported, pretrained_model, after)]
  assert trunks[0].keys() == trunks[2].keys() and len(trunks[0]) > 50
  for name, value in trunks[0].items():
    np.testing.assert_array_equal(value, trunks[1][name], err_msg=name)
    np.testing.assert_array_equal(trunks[2][name], value, err_msg=name)
