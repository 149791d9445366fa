"""model.py: the linear head's inputs (the selected projection output, stop-gradient while
pretraining, optionally batch-normalized) and the projection head's layers."""
import warnings

import numpy as np
import pytest
import tensorflow as tf

import model as model_lib


def tiny_model(**overrides):
  settings = dict(resnet_depth=18, width_multiplier=0.125, cifar_stem=True, num_proj_layers=2,
                  proj_out_dim=16, num_classes=10)
  config = model_lib.ModelConfig(**(settings | overrides))
  return model_lib.build_model(config, 16)


@pytest.mark.parametrize('head_bn', [True, False])
def test_linear_head_is_linear_in_the_trunk_features_at_inference(head_bn):
  model = tiny_model(supervised_head_bn=head_bn)
  images = tf.random.stateless_uniform([8, 16, 16, 3], seed=[0, 1])
  if head_bn:
    assert not model.supervised_head_bn.trainable_weights  # no scale or offset
    bn = model.supervised_head_bn
    bn.moving_mean.assign(np.linspace(0, 1, bn.moving_mean.shape[0]))
    bn.moving_variance.assign(np.linspace(1, 2, bn.moving_variance.shape[0]))
  else:
    assert not hasattr(model, 'supervised_head_bn')
  outputs = model(images, training=False)
  features = outputs['features'].numpy().astype(np.float64)
  if head_bn:
    features = (features - bn.moving_mean.numpy()) / np.sqrt(bn.moving_variance.numpy() + 1e-5)
  kernel, bias = (w.numpy() for w in model.supervised_head.weights)
  np.testing.assert_allclose(outputs['supervised_logits'], features @ kernel + bias,
                             rtol=1e-4, atol=1e-5)


def test_linear_head_in_training_standardizes_with_batch_statistics_and_stops_gradients():
  model = tiny_model()
  images = tf.random.stateless_uniform([8, 16, 16, 3], seed=[2, 3])
  with tf.GradientTape() as tape:
    outputs = model(images, training=True)
    loss = tf.reduce_sum(outputs['supervised_logits'])
  features = outputs['features'].numpy().astype(np.float64)
  standardized = (features - features.mean(0)) / np.sqrt(features.var(0) + 1e-5)
  kernel, bias = (w.numpy() for w in model.supervised_head.weights)
  np.testing.assert_allclose(outputs['supervised_logits'], standardized @ kernel + bias,
                             rtol=1e-3, atol=1e-4)
  gradients = tape.gradient(loss, model.trunk.trainable_variables)
  assert all(g is None for g in gradients)  # the head does not shape the representation


@pytest.mark.parametrize('selector', [-1, 1, 2])
def test_pretraining_linear_head_reads_the_selected_projection_output(selector):
  model = tiny_model(supervised_head_bn=False, ft_proj_selector=selector)
  images = tf.random.stateless_uniform([4, 16, 16, 3], seed=[1, 2])
  outputs = model(images, training=False)
  _, hiddens = model.projection_head(model.trunk(images, training=False), training=False)
  expected = model.supervised_head(hiddens[selector])
  np.testing.assert_allclose(outputs['supervised_logits'], expected, rtol=1e-5, atol=1e-6)
  if selector in (-1, 2):  # the last layer: the projection itself
    np.testing.assert_allclose(hiddens[selector], outputs['projection'], rtol=1e-6)


def test_zero_projection_layers_make_the_projection_the_trunk_features():
  model = tiny_model(num_proj_layers=0, ft_proj_selector=-1, supervised_head_bn=False)
  images = tf.random.stateless_uniform([4, 16, 16, 3], seed=[3, 4])
  outputs = model(images, training=False)
  assert not model.projection_head.variables
  np.testing.assert_allclose(outputs['projection'], outputs['features'])
  np.testing.assert_allclose(outputs['supervised_logits'],
                             model.supervised_head(outputs['features']), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('layers, selector', [(2, 3), (2, -4), (2, -2), (0, 1), (0, -2)])
def test_selector_beyond_the_projection_layers_names_both_flags(layers, selector):
  with pytest.raises(ValueError, match=rf'--ft_proj_selector={selector} selects beyond .* '
                                       rf'{layers} layer'):
    model_lib.ModelConfig(num_proj_layers=layers, ft_proj_selector=selector)


@pytest.mark.parametrize('selector, layers', [(0, 0), (1, 1), (-1, 2)])
def test_a_fine_tuning_model_holds_the_projection_layers_its_head_reads(selector, layers):
  # The layers past the selected output are never called: made anyway, Keras warned at every
  # fine-tuning run that the head 'has unbuilt state' and 'may cause failures down the line'.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    model = tiny_model(train_mode='finetune', ft_proj_selector=selector, fine_tune_after_block=4)
  assert not [w for w in caught if 'unbuilt state' in str(w.message)]
  kernels = [v.path for v in model.projection_head.variables if v.path.endswith('kernel')]
  assert kernels == [f'contrastive_model/projection_head/proj_{j}_dense/kernel'
                     for j in range(layers)]
  images = tf.random.stateless_uniform([4, 16, 16, 3], seed=[5, 6])
  features = model.trunk(images, training=False)
  _, hiddens = model.projection_head(features, training=False, num_layers=layers)
  head = model.supervised_head_bn(hiddens[selector], training=False)
  np.testing.assert_allclose(model(images, training=False)['supervised_logits'],
                             model.supervised_head(head), rtol=1e-5, atol=1e-6)
