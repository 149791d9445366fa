"""Tests for resnet.py: shapes, parameter counts, freezing, naming, mixed precision, sync BN."""
import numpy as np
import pytest
import tensorflow as tf

import resnet


def _num_params(variables):
  return sum(int(np.prod(v.shape)) for v in variables)


def _images(batch, size, seed=0):
  return tf.random.stateless_uniform([batch, size, size, 3], seed=[seed, 1])


def _all_layers(layer):
  return list(layer._flatten_layers(include_self=False, recursive=True))


@pytest.mark.parametrize('depth, output_dim', [(18, 128), (50, 512)])
@pytest.mark.parametrize('cifar_stem, size', [(True, 32), (False, 64)])
def test_output_shape_and_dim_at_quarter_width(depth, output_dim, cifar_stem, size):
  model = resnet.resnet(depth, width_multiplier=0.25, cifar_stem=cifar_stem)
  assert model.output_dim == output_dim  # known before any build
  features = model(_images(2, size), training=False)
  assert features.shape == (2, output_dim)
  assert features.dtype == tf.float32
  # Globally pooled post-ReLU activations: finite, non-negative, not all zero.
  assert np.all(np.isfinite(features)) and np.all(features.numpy() >= 0)
  assert np.any(features.numpy() > 0)


# ResNet-10: the stem (9,408 + 128), then per group one basic block (two 3x3 convolutions and
# their BatchNorms) and, from group 2, a 1x1 projection shortcut with its BatchNorm.
@pytest.mark.parametrize('depth, expected', [(10, 4_905_792), (18, 11_176_512), (50, 23_508_032)])
def test_trainable_param_count_matches_standard_resnet_trunk(depth, expected):
  model = resnet.resnet(depth)
  model.build((None, 64, 64, 3))
  assert _num_params(model.trainable_variables) == expected
  # The BN moving statistics are the only non-trainable state.
  assert all(v.name in ('moving_mean', 'moving_variance') for v in model.non_trainable_variables)


def test_squeeze_excitation_adds_exactly_its_two_bias_free_convs():
  plain = resnet.resnet(18, width_multiplier=0.25, cifar_stem=True)
  se = resnet.resnet(18, width_multiplier=0.25, cifar_stem=True, se_ratio=0.25)
  plain.build((None, 32, 32, 3))
  features = se(_images(2, 32))
  # Each basic block of width f gains reduce (f -> f/4) and expand (f/4 -> f) 1x1 kernels.
  expected_extra = sum(2 * (2 * f * (f // 4)) for f in (16, 32, 64, 128))
  extra = _num_params(se.trainable_variables) - _num_params(plain.trainable_variables)
  assert extra == expected_extra
  assert features.shape == (2, 128) and np.all(np.isfinite(features))


@pytest.fixture(scope='module')
def sk_se_resnet50():
  model = resnet.resnet(50, width_multiplier=0.25, sk_ratio=0.0625, se_ratio=0.25)
  model.build((None, 64, 64, 3))
  return model


@pytest.mark.slow
def test_selective_kernel_with_se_builds_runs_and_adds_params(sk_se_resnet50):
  plain = resnet.resnet(50, width_multiplier=0.25)
  plain.build((None, 64, 64, 3))
  features = sk_se_resnet50(_images(2, 64), training=True)
  assert features.shape == (2, 512) and np.all(np.isfinite(features))
  assert _num_params(sk_se_resnet50.trainable_variables) > _num_params(plain.trainable_variables)
  names = {layer.name for layer in _all_layers(sk_se_resnet50)}
  # SimCLR v2's deep stem and ResNet-D shortcut replace the 7x7 conv and strided 1x1 shortcut.
  assert {'stem1_conv', 'stem2_conv', 'stem3_conv', 'shortcut_pool', 'b_sk', 'se'} <= names
  assert 'stem_conv' not in names


@pytest.mark.slow
def test_layer_and_variable_names_are_the_checkpoint_scheme(sk_se_resnet50):
  model = sk_se_resnet50
  layers = _all_layers(model)
  batch_norms = [layer for layer in layers if isinstance(layer, tf.keras.layers.BatchNormalization)]
  convs = [layer for layer in layers if isinstance(layer, tf.keras.layers.Conv2D)]
  assert batch_norms and convs
  assert all(layer.name.endswith('_bn') for layer in batch_norms)
  assert all(layer.name.endswith('_conv') for layer in convs)
  assert not any(v.name == 'bias' for v in model.variables)
  assert {v.name for v in model.trainable_variables} == {'kernel', 'gamma', 'beta'}
  paths = [v.path for v in model.variables]
  assert len(paths) == len(set(paths))
  assert 'resnet/group1/block1/c_bn/gamma' in paths
  # init_zero: the last BN of every residual branch starts with gamma = 0.
  last_gammas = [v for v in model.variables if v.path.endswith('c_bn/gamma')]
  assert len(last_gammas) == 16 and all(np.all(v.numpy() == 0) for v in last_gammas)


def test_checkpoint_round_trip_restores_every_variable(tmp_path):
  source = resnet.resnet(18, width_multiplier=0.25, cifar_stem=True)
  target = resnet.resnet(18, width_multiplier=0.25, cifar_stem=True)
  images = _images(4, 32)
  source(images, training=True)  # moves the BN statistics away from their initial values
  target.build(images.shape)
  path = tf.train.Checkpoint(trunk=source).save(str(tmp_path / 'ckpt'))
  keys = {name for name, _ in tf.train.list_variables(path)}
  # Keys follow the layer names: 20 BN layers x 4 variables + 20 conv kernels.
  assert 'trunk/group4/block2/b_bn/moving_mean/.ATTRIBUTES/VARIABLE_VALUE' in keys
  assert sum(k.startswith('trunk/') for k in keys) == len(source.variables) == 100
  tf.train.Checkpoint(trunk=target).restore(path).assert_existing_objects_matched()
  for a, b in zip(source.variables, target.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def _frozen_prefixes(fine_tune_after_block):
  return ('resnet/stem/',) + tuple(f'resnet/group{g}/' for g in range(1, fine_tune_after_block + 1))


@pytest.mark.parametrize('fine_tune_after_block', [0, 2, 4])
def test_fine_tune_after_block_freezes_weights_and_bn_statistics(fine_tune_after_block):
  model = resnet.resnet(18, width_multiplier=0.25, cifar_stem=True,
                        fine_tune_after_block=fine_tune_after_block)
  images = _images(4, 32)
  model.build(images.shape)
  optimizer = tf.keras.optimizers.SGD(0.1)
  direction = tf.random.stateless_normal([model.output_dim], seed=[3, 4])

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(model(images, training=True) * direction)
    if model.trainable_variables:  # Keras optimizers reject an empty update.
      optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                    model.trainable_variables))

  before = {v.path: v.numpy().copy() for v in model.variables}
  # Two steps: zero-initialized gammas block the gradient of their branch in the first one.
  step()
  step()
  frozen = _frozen_prefixes(fine_tune_after_block)
  trainable_paths = {v.path for v in model.trainable_variables}
  for v in model.variables:
    is_frozen = v.path.startswith(frozen)
    if is_frozen:
      np.testing.assert_array_equal(v.numpy(), before[v.path], err_msg=v.path)
      assert v.path not in trainable_paths
    else:
      assert not np.array_equal(v.numpy(), before[v.path]), f'{v.path} did not change'
      assert (v.path in trainable_paths) == (v.name in ('kernel', 'gamma', 'beta'))
  if fine_tune_after_block == 4:
    assert model.trainable_variables == []


def test_fully_frozen_trunk_ignores_training_flag():
  model = resnet.resnet(18, width_multiplier=0.25, cifar_stem=True, fine_tune_after_block=4)
  images = _images(2, 32)
  np.testing.assert_array_equal(model(images, training=True), model(images, training=False))


def test_unknown_depth_and_fine_tune_value_raise():
  with pytest.raises(ValueError, match=r'depth 77.*10, 18, 34, 50, 101, 152, 200'):
    resnet.resnet(77)
  with pytest.raises(ValueError, match='fine_tune_after_block=5'):
    resnet.resnet(18, fine_tune_after_block=5)


@pytest.fixture
def mixed_bfloat16():
  tf.keras.mixed_precision.set_global_policy('mixed_bfloat16')
  try:
    yield
  finally:
    tf.keras.mixed_precision.set_global_policy('float32')


@pytest.mark.slow
def test_mixed_bfloat16_returns_finite_compute_dtype_features(mixed_bfloat16):
  model = resnet.resnet(18, width_multiplier=0.25, cifar_stem=True, sk_ratio=0.0625, se_ratio=0.25)
  features = tf.function(lambda x: model(x, training=True))(_images(2, 32))
  assert features.dtype == tf.bfloat16
  assert features.shape == (2, 128)
  assert np.all(np.isfinite(tf.cast(features, tf.float32)))
  assert all(v.dtype == tf.float32 for v in model.variables)


@pytest.mark.slow
def test_sync_bn_under_mirrored_strategy_matches_plain_bn(two_replicas):
  strategy = two_replicas
  images = _images(4, 32, seed=5)
  with strategy.scope():
    synced = resnet.resnet(18, width_multiplier=0.25, cifar_stem=True, sync_bn=True)
    synced.build(images.shape)
  plain = resnet.resnet(18, width_multiplier=0.25, cifar_stem=True)
  plain.build(images.shape)
  # Random (non-zero) gammas, so every block and its BN contributes to the output.
  for v in synced.variables:
    if v.name == 'gamma':
      v.assign(tf.random.stateless_uniform(v.shape, seed=[7, 8], minval=0.5, maxval=1.5))
  plain.set_weights(synced.get_weights())

  @tf.function
  def replica_step(x):
    return synced(x, training=True)

  dataset = tf.data.Dataset.from_tensor_slices(images).batch(4)
  per_replica = strategy.run(replica_step, args=(next(iter(
      strategy.experimental_distribute_dataset(dataset))),))
  distributed = tf.concat(strategy.experimental_local_results(per_replica), axis=0)
  # Synchronized BN over 2 replicas x 2 images uses the statistics of all 4 images.
  np.testing.assert_allclose(distributed, plain(images, training=True), rtol=1e-4, atol=1e-5)

  # One replica in inference mode: sync and plain BN are the same function of the same weights.
  np.testing.assert_allclose(synced(images, training=False), plain(images, training=False),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('policy', ['float32', 'mixed_bfloat16'])
def test_fused_batch_norm_matches_keras_batch_norm(policy):
  # Same outputs, gradients, moving statistics (biased variance) and inference as Keras' layer.
  x = tf.constant(np.random.RandomState(0).normal(2, 3, (8, 5, 5, 4)).astype(np.float32))
  weights = tf.constant(np.random.RandomState(1).normal(size=x.shape).astype(np.float32))
  tf.keras.mixed_precision.set_global_policy(policy)
  try:
    results = []
    for layer in (tf.keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5),
                  resnet.BatchNormalization(momentum=0.9, epsilon=1e-5)):
      layer.build(x.shape)
      layer.gamma.assign(np.linspace(0.5, 2, 4))
      layer.beta.assign(np.linspace(-1, 1, 4))
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * weights)
      gradients = tape.gradient(loss, [x, layer.gamma, layer.beta])
      results.append([y, *gradients, layer.moving_mean, layer.moving_variance,
                      layer(x, training=False)])
  finally:
    tf.keras.mixed_precision.set_global_policy('float32')
  keras_bn, fused_bn = results
  assert fused_bn[0].dtype == keras_bn[0].dtype
  tolerance = 1e-5 if policy == 'float32' else 2e-2  # bfloat16 rounds x itself
  # Moving variance: the biased batch variance (x has std 3, so 0.1 * ~9 after one update).
  np.testing.assert_allclose(fused_bn[5], 0.9 + 0.1 * np.var(x.numpy(), axis=(0, 1, 2)),
                             rtol=tolerance)
  for keras_value, fused_value in zip(keras_bn, fused_bn):
    np.testing.assert_allclose(np.asarray(tf.cast(fused_value, tf.float32)),
                               np.asarray(tf.cast(keras_value, tf.float32)),
                               rtol=tolerance, atol=tolerance * 10)


def test_resnet_uses_the_fused_batch_norm_on_images():
  model = resnet.resnet(18, width_multiplier=0.125, cifar_stem=True)
  model.build((None, 16, 16, 3))
  norms = [layer for layer in _all_layers(model)
           if isinstance(layer, tf.keras.layers.BatchNormalization)]
  assert norms and all(isinstance(layer, resnet.BatchNormalization) for layer in norms)


@pytest.mark.parametrize('kernel_size, strides', [(1, 1), (3, 1), (3, 2), (7, 2), (1, 2)])
@pytest.mark.parametrize('size', [8, 9])
def test_fixed_padding_conv_pads_k_minus_1_over_2_first(kernel_size, strides, size):
  """Outputs and both gradients equal a plain conv on the explicitly padded input."""
  conv = resnet.Conv2DFixedPadding(4, kernel_size, strides, name='conv')
  x = _images(2, size)
  upstream = tf.random.stateless_normal(conv.compute_output_shape(x.shape), [1, 2])
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    y = conv(x)
    total = kernel_size - 1
    sides = [total // 2, total - total // 2]
    padded = tf.pad(x, [[0, 0], sides, sides, [0, 0]])
    expected = tf.nn.conv2d(padded, conv.kernel, strides, 'VALID')
  assert y.shape == expected.shape == conv.compute_output_shape(x.shape)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  for got, want in zip(tape.gradient(y, [x, conv.kernel], upstream),
                       tape.gradient(expected, [x, conv.kernel], upstream)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_unstrided_1x1_conv_runs_as_a_matmul_for_any_image_size():
  """The matmul path keeps the conv's output and static shape, sizes unknown when traced too."""
  conv = resnet.Conv2DFixedPadding(4, 1, name='conv')
  x = _images(2, 8)
  assert conv(x).shape == (2, 8, 8, 4)
  expected = tf.nn.conv2d(x, conv.kernel, 1, 'VALID')
  traced = tf.function(conv.__call__, input_signature=[tf.TensorSpec([None, None, None, 3])])
  concrete = traced.get_concrete_function()
  assert concrete.structured_outputs.shape.as_list() == [None, None, None, 4]
  np.testing.assert_allclose(traced(x), expected, rtol=1e-5, atol=1e-5)
  # The graph holds a MatMul and no convolution.
  ops = {op.type for op in concrete.graph.get_operations()}
  assert 'MatMul' in ops and not any('Conv' in t for t in ops)
