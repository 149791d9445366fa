"""Fine-tuning and evaluation from a pretraining checkpoint (tiny models, the demo data)."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import model as model_lib
import run
from test_run import TINY, run_main

ARCHITECTURE = [f for f in TINY if f.split('=')[0].lstrip('-') in run.ARCHITECTURE_FLAGS]
NOT_ARCHITECTURE = [f for f in TINY if f not in ARCHITECTURE]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory, data_dir):
  model_dir = str(tmp_path_factory.mktemp('pretrained'))
  run_main(*TINY, f'--data_dir={data_dir}', f'--model_dir={model_dir}', '--train_steps=3',
           '--probe_max_examples=0', '--DCL_mode=True')
  return model_dir


def restored_model(path, **overrides):
  """The tiny architecture with the model variables of checkpoint `path`."""
  config = model_lib.ModelConfig(resnet_depth=18, width_multiplier=0.125, cifar_stem=True,
                                 num_proj_layers=2, proj_out_dim=16, num_classes=10,
                                 **overrides)
  model = run.build_model(config, 16)
  tf.train.Checkpoint(model=model).restore(path).expect_partial()
  return model


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


def test_zero_init_logits_layer_zeroes_the_restored_head(tmp_path, data_dir, pretrained):
  model_dir = str(tmp_path / 'zero')
  run_main(*TINY, f'--data_dir={data_dir}', f'--model_dir={model_dir}', '--train_mode=finetune',
           f'--checkpoint={pretrained}', '--fine_tune_after_block=4',
           '--zero_init_logits_layer=True', '--optimizer=momentum', '--learning_rate=0',
           '--train_steps=1')
  head = restored_model(tf.train.latest_checkpoint(model_dir), train_mode='finetune')
  assert np.all(head.supervised_head.kernel.numpy() == 0)
  assert np.all(head.supervised_head.bias.numpy() == 0)


def test_eval_mode_evaluates_the_final_checkpoint_and_exits(data_dir, pretrained):
  results = run_main(*TINY, f'--data_dir={data_dir}', f'--model_dir={pretrained}',
                     '--mode=eval', '--train_steps=3', '--eval_timeout_seconds=60')
  assert results['global_step'] == 3 and results['eval/num_examples'] == 360
  saved = json.load(open(os.path.join(pretrained, 'result_3.json')))
  assert saved['eval/top_1'] == pytest.approx(results['eval/top_1'])
  assert json.load(open(os.path.join(pretrained, 'flags.json')))['mode'] == 'train'
