"""model.py: the linear head's inputs (stop-gradient features, optionally batch-normalized)."""
import numpy as np
import pytest
import tensorflow as tf

import model as model_lib


def tiny_model(**overrides):
  config = model_lib.ModelConfig(resnet_depth=18, width_multiplier=0.125, cifar_stem=True,
                                 num_proj_layers=2, proj_out_dim=16, num_classes=10,
                                 **overrides)
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
