"""run.py end to end on the demo data with tiny models, and the distributed train step."""
import glob
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

import lars_optimizer
import model as model_lib
import objective
import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--dataset=digits', '--image_size=16', '--resnet_depth=18', '--width_multiplier=0.125',
        '--train_batch_size=16', '--eval_batch_size=100', '--eval_split=test',
        '--optimizer=adam', '--learning_rate=0.01', '--warmup_epochs=0', '--num_proj_layers=2',
        '--proj_out_dim=16', '--use_blur=False', '--log_every_seconds=0',
        # Exact comparisons: the CPU default is bfloat16 where the CPU has it natively.
        '--mixed_precision=float32']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def run_main(*args):
  run.FLAGS.unparse_flags()
  run.FLAGS(['run.py', *args])
  return run.main([])


def checkpoint_values(path, name):
  return tf.train.load_variable(path, name)


U_KEY = 'sogclr/log_u/.ATTRIBUTES/VARIABLE_VALUE'


@pytest.mark.parametrize('aliases, expected', [
    ({}, 'sogclr'),
    ({'DCL_mode': True}, 'sogclr'),
    ({'DCL_mode': True, 'GCL_mode': True}, 'sogclr'),
    ({'BI_mode': False}, 'simclr'),
    ({'DCL_mode': False, 'GCL_mode': None, 'BI_mode': False}, 'simclr'),
])
def test_loss_aliases_agreeing(aliases, expected):
  assert run.resolve_loss(None, aliases) == expected


@pytest.mark.parametrize('loss, aliases', [
    (None, {'DCL_mode': True, 'BI_mode': False}),
    (None, {'DCL_mode': False, 'GCL_mode': True}),
    ('simclr', {'GCL_mode': True}),
])
def test_loss_aliases_conflicting_is_an_error(loss, aliases):
  with pytest.raises(ValueError, match='Conflicting loss flags'):
    run.resolve_loss(loss, aliases)


def test_pretraining_writes_checkpoint_summaries_flags_and_probe(tmp_path, data_dir):
  model_dir = str(tmp_path / 'run')
  results = run_main(*TINY, f'--data_dir={data_dir}', f'--model_dir={model_dir}',
                     '--train_steps=3', '--checkpoint_steps=2', '--DCL_mode=True',
                     '--probe_baselines=False')
  # Checkpoints at step 2 and at the end, never past train_steps.
  assert tf.train.latest_checkpoint(model_dir).endswith('ckpt-3')
  assert os.path.exists(os.path.join(model_dir, 'ckpt-2.index'))
  shapes = dict(tf.train.list_variables(tf.train.latest_checkpoint(model_dir)))
  assert shapes[U_KEY] == [1437]
  # Every model variable (projection head included) is in the checkpoint.
  restored = run.build_model(run.model_config(10), 16)
  tf.train.Checkpoint(model=restored).restore(
      tf.train.latest_checkpoint(model_dir)).assert_existing_objects_matched()
  assert len(restored.projection_head.variables) == 9
  log_u = checkpoint_values(tf.train.latest_checkpoint(model_dir), U_KEY)
  assert np.isfinite(log_u).sum() == 3 * 16  # three steps of 16 distinct images
  assert checkpoint_values(tf.train.latest_checkpoint(model_dir),
                           'optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE') == 3

  flags = json.load(open(os.path.join(model_dir, 'flags.json')))
  assert flags['train_steps'] == 3 and flags['resolved_loss'] == 'sogclr'

  tags = set()
  for event_file in glob.glob(os.path.join(model_dir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(event_file):
      tags.update(v.tag for v in event.summary.value)
  for tag in ('learning_rate', 'total_loss', 'contrast_loss', 'supervised_loss',
              'contrast_acc', 'contrast_entropy', 'weight_decay', 'supervised_acc', 'u_mean'):
    assert f'train/{tag}' in tags, tag
  assert 'eval/label_top_1_accuracy' in tags

  assert results['eval/num_examples'] == 360
  assert 0.0 <= results['eval/top_1'] <= 1.0
  assert 0.1 < results['probe/top_1'] <= 1.0
  assert json.load(open(os.path.join(model_dir, 'result_3.json')))['global_step'] == 3


class SimulatedCrash(Exception):
  pass


def test_resumed_run_continues_step_count_and_u_table(tmp_path, data_dir, monkeypatch):
  common = [*TINY, f'--data_dir={data_dir}', '--probe_max_examples=0', '--deterministic',
            '--DCL_mode=True', '--checkpoint_steps=3', '--train_steps=5']
  straight = str(tmp_path / 'straight')
  run_main(*common, f'--model_dir={straight}')

  # The same run, crashed right after its step-3 checkpoint, then restarted.
  resumed = str(tmp_path / 'resumed')
  save = tf.train.CheckpointManager.save

  def save_then_crash(manager, *args, **kwargs):
    path = save(manager, *args, **kwargs)
    raise SimulatedCrash(path)

  monkeypatch.setattr(tf.train.CheckpointManager, 'save', save_then_crash)
  with pytest.raises(SimulatedCrash):
    run_main(*common, f'--model_dir={resumed}')
  monkeypatch.setattr(tf.train.CheckpointManager, 'save', save)
  saved_u = checkpoint_values(tf.train.latest_checkpoint(resumed), U_KEY)
  assert tf.train.latest_checkpoint(resumed).endswith('ckpt-3')
  run_main(*common, f'--model_dir={resumed}')

  final = tf.train.latest_checkpoint(resumed)
  assert final.endswith('ckpt-5')
  final_u = checkpoint_values(final, U_KEY)
  # The restart kept every u that steps 4 and 5 did not revisit ...
  assert (np.isfinite(saved_u) & (final_u == saved_u)).sum() >= 3 * 16 - 2 * 16
  # ... and continued the same run: same data, u and weights as the run never stopped.
  expected = tf.train.latest_checkpoint(straight)
  np.testing.assert_allclose(final_u, checkpoint_values(expected, U_KEY), rtol=1e-5)
  names = [name for name, _ in tf.train.list_variables(expected) if name != 'save_counter/.ATTRIBUTES/VARIABLE_VALUE' and name != '_CHECKPOINTABLE_OBJECT_GRAPH']
  assert len(names) > 100
  for name in names:
    np.testing.assert_allclose(checkpoint_values(final, name), checkpoint_values(expected, name),
                               rtol=1e-4, atol=1e-5, err_msg=name)


def _tiny_model_config(**kwargs):
  return model_lib.ModelConfig(resnet_depth=18, width_multiplier=0.125, cifar_stem=True,
                               num_proj_layers=2, proj_out_dim=16, num_classes=10, **kwargs)


@pytest.mark.parametrize('mode', ['simclr', 'sogclr', 'finetune'])
def test_two_replica_train_steps_equal_one_replica(mode, one_replica, two_replicas):
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
  config = _tiny_model_config(global_bn=True,
                              train_mode='finetune' if mode == 'finetune' else 'pretrain')
  initial_weights = None
  final = {}
  for replicas, strategy in ((1, one_replica), (2, two_replicas)):
    with strategy.scope():
      model = run.build_model(config, 16)
      if initial_weights is None:
        initial_weights = model.get_weights()
      model.set_weights(initial_weights)
      optimizer = lars_optimizer.build_optimizer('lars', 0.01, weight_decay=1e-4)
      optimizer.build(model.trainable_variables)
      sogclr = objective.SogCLRLoss(20, 0.1, 0.9) if mode == 'sogclr' else None
    trainer = run.Trainer(strategy, model, optimizer, loss=mode, temperature=0.1,
                          hidden_norm=True, weight_decay=1e-4, optimizer_name='lars',
                          sogclr=sogclr)
    dataset = tf.data.Dataset.from_tensor_slices((views, labels, ids)).batch(global_batch)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    first = trainer.train_loop(iterator, 1)
    after_first = [v.numpy() for v in model.variables]
    rest = trainer.train_loop(iterator, 2)
    # LARS decays inside the optimizer: the reported penalty is that of the final weights.
    penalty = 1e-4 * sum(0.5 * np.sum(np.square(v.numpy())) for v in model.trainable_variables
                         if v.path.split('/')[-1] not in ('gamma', 'beta', 'bias'))
    np.testing.assert_allclose(rest['weight_decay'], penalty, rtol=1e-5)
    names = [v.path for v in model.variables]
    u = strategy.experimental_local_results(sogclr.log_u) if sogclr else []
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


def _bench_flags():
  """{script: flags it defines}, read from the bench scripts' argparse calls."""
  found = {}
  for path in glob.glob(os.path.join(REPO, 'bench', '*.py')):
    source = open(path).read()
    found['bench/' + os.path.basename(path)] = set(
        re.findall(r"add_argument\(\s*'--(\w+)'", source))
  return found


def test_every_flag_named_in_the_readme_exists():
  readme = open(os.path.join(REPO, 'README.md')).read()
  text = re.sub(r'\\\n', ' ', readme)
  bench = _bench_flags()
  assert bench['bench/train_step.py'] >= {'models', 'precisions', 'xla'}
  # A command of a bench script names that script's flags.
  for line in text.splitlines():
    for script in re.findall(r'bench/\w+\.py', line):
      if script in bench and re.search(r'python ' + re.escape(script), line):
        named = set(re.findall(r'--([A-Za-z_]\w*)', line.split(script, 1)[1]))
        assert named <= bench[script], (script, sorted(named - bench[script]))
  # Every other flag is run.py's; a bench flag may be named in prose about the benchmarks.
  # Commands of other tools (imagenet.py, tfds, tensorboard) have their own flags.
  text = '\n'.join(line for line in text.splitlines()
                   if not re.search(r'(imagenet\.py|bench/\w+\.py|tfds build|tensorboard) ', line))
  named = set(re.findall(r'--([A-Za-z_][A-Za-z0-9_]*)', text))
  defined = set(run.FLAGS) | set().union(*bench.values())
  missing = sorted(named - defined - {'help', 'helpfull'})
  assert not missing, f'README names flags neither run.py nor a bench script defines: {missing}'
  assert len(named) > 20


def test_cpu_bfloat16_detection_reads_the_cpu_flags(tmp_path):
  with_bf16 = tmp_path / 'with'
  with_bf16.write_text('processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n')
  without = tmp_path / 'without'
  without.write_text('processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n')
  assert run.cpu_supports_bfloat16(str(with_bf16))
  assert not run.cpu_supports_bfloat16(str(without))
  assert not run.cpu_supports_bfloat16(str(tmp_path / 'missing'))


@pytest.mark.parametrize('native, flag, expected', [
    (True, 'auto', 'mixed_bfloat16'), (False, 'auto', 'float32'),
    (True, 'float32', 'float32'), (False, 'bfloat16', 'mixed_bfloat16')])
def test_cpu_precision_default_follows_native_bfloat16(monkeypatch, one_replica, native, flag,
                                                       expected):
  monkeypatch.setattr(run, 'cpu_supports_bfloat16', lambda: native)
  run.FLAGS.unparse_flags()
  run.FLAGS(['run.py', f'--mixed_precision={flag}'])
  assert run.resolve_precision_and_jit(one_replica) == (expected, False)
