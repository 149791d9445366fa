"""LARS, weight-decay exclusions and the warmup-cosine schedule checked against NumPy."""
import math

import numpy as np
import pytest
import tensorflow as tf

import lars_optimizer

W0 = np.array([[1.0, -2.0], [0.5, 3.0]], np.float32)
GRADS = [np.array([[0.3, -0.1], [0.2, 0.4]], np.float32),
         np.array([[-0.2, 0.5], [0.1, -0.3]], np.float32)]


def lars_numpy(w, grads, lrs, *, momentum=0.9, weight_decay=0.0, eeta=0.001, classic=True,
               nesterov=False, excluded=False):
  """The SimCLR LARS update written from its formula; returns w after len(grads) steps."""
  w = w.astype(np.float64)
  v = np.zeros_like(w)

  def trust(direction):
    w_norm, d_norm = np.linalg.norm(w), np.linalg.norm(direction)
    return eeta * w_norm / d_norm if w_norm > 0 and d_norm > 0 and not excluded else 1.0

  for grad, lr in zip(grads, lrs):
    g = grad + (0.0 if excluded else weight_decay) * w
    if classic:
      scaled_lr = lr * trust(g)
      v = momentum * v + scaled_lr * g
      w = w - (momentum * v + scaled_lr * g if nesterov else v)
    else:
      v = momentum * v + g
      update = momentum * v + g if nesterov else v
      w = w - lr * trust(update) * update
  return w


def apply_steps(optimizer, variable, grads):
  step = tf.function(lambda g: optimizer.apply_gradients([(g, variable)]))
  for g in grads:
    step(tf.constant(g))
  return variable.numpy()


@pytest.mark.parametrize('num_steps', [1, 2])
@pytest.mark.parametrize('weight_decay', [0.0, 1e-2])
@pytest.mark.parametrize('nesterov', [False, True])
@pytest.mark.parametrize('classic', [True, False])
def test_lars_matches_numpy_on_2x2_variable(num_steps, weight_decay, nesterov, classic):
  variable = tf.keras.Variable(W0, name='kernel')
  optimizer = lars_optimizer.LARS(0.5, momentum=0.9, weight_decay_rate=weight_decay,
                                  classic_momentum=classic, nesterov=nesterov)
  got = apply_steps(optimizer, variable, GRADS[:num_steps])
  want = lars_numpy(W0, GRADS[:num_steps], [0.5] * num_steps, weight_decay=weight_decay,
                    classic=classic, nesterov=nesterov)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # The trust ratio (~1e-3) must actually have scaled the step.
  assert not np.allclose(got, lars_numpy(W0, GRADS[:num_steps], [0.5] * num_steps,
                                         weight_decay=weight_decay, classic=classic,
                                         nesterov=nesterov, excluded=True))


def test_lars_with_schedule_uses_the_learning_rate_of_each_step():
  schedule = lars_optimizer.WarmUpAndCosineDecay(0.1, 512, 'linear', warmup_steps=2,
                                                 total_steps=10)
  variable = tf.keras.Variable(W0, name='kernel')
  optimizer = lars_optimizer.LARS(schedule, weight_decay_rate=1e-2)
  got = apply_steps(optimizer, variable, GRADS + GRADS)
  lrs = [float(schedule(step)) for step in range(4)]
  assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.2)
  want = lars_numpy(W0, GRADS + GRADS, lrs, weight_decay=1e-2)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_excluded_layer_variables_get_no_decay_and_no_trust_ratio():
  dense = tf.keras.layers.Dense(2)
  norm = tf.keras.layers.BatchNormalization()
  norm(dense(tf.zeros([1, 2])))
  variables = [dense.bias, norm.gamma, norm.beta]
  inits = [np.array([0.5, -1.0], np.float32), np.array([1.5, 0.7], np.float32),
           np.array([0.2, -0.4], np.float32)]
  grads = [np.array([[0.3, -0.1]], np.float32), np.array([[0.2, 0.4]], np.float32)]
  for variable, init in zip(variables, inits):
    variable.assign(init)
  optimizer = lars_optimizer.LARS(0.5, weight_decay_rate=0.1)

  @tf.function
  def step(g):
    optimizer.apply_gradients([(g[0], v) for v in variables])

  for g in grads:
    step(tf.constant(g))
  for variable, init in zip(variables, inits):
    want = lars_numpy(init, [g[0] for g in grads], [0.5, 0.5], weight_decay=0.1, excluded=True)
    np.testing.assert_allclose(variable.numpy(), want, rtol=1e-6)


def small_model():
  conv = tf.keras.layers.Conv2D(3, 3, use_bias=False)
  norm = tf.keras.layers.BatchNormalization()
  dense = tf.keras.layers.Dense(2)
  model = tf.keras.Sequential([tf.keras.Input([5, 5, 2]), conv, norm,
                               tf.keras.layers.GlobalAveragePooling2D(), dense])
  return model, conv, norm, dense


def test_is_excluded_exactly_for_gamma_beta_bias_of_a_real_model():
  model, conv, norm, dense = small_model()
  excluded = [v for v in model.trainable_variables if lars_optimizer.is_excluded(v)]
  kept = [v for v in model.trainable_variables if not lars_optimizer.is_excluded(v)]
  assert {id(v) for v in excluded} == {id(norm.gamma), id(norm.beta), id(dense.bias)}
  assert {id(v) for v in kept} == {id(conv.kernel), id(dense.kernel)}
  # Every exclusion pattern matches a real variable, so a renamed layer cannot silently escape.
  assert {v.name for v in excluded} == set(lars_optimizer.EXCLUDED_NAMES)
  # tf.Variable-style names ('scope/bias:0') are recognised too.
  assert lars_optimizer.is_excluded(tf.Variable([1.0], name='head/bias'))
  assert not lars_optimizer.is_excluded(tf.Variable([1.0], name='head/kernel'))


def test_weight_decay_loss_matches_numpy_over_kernels_only():
  model, conv, _, dense = small_model()
  for v in model.trainable_variables:
    v.assign(np.random.default_rng(0).normal(size=v.shape).astype(np.float32))
  want = 1e-4 * sum(0.5 * np.sum(v.numpy().astype(np.float64) ** 2)
                    for v in (conv.kernel, dense.kernel))
  got = lars_optimizer.weight_decay_loss(model.trainable_variables, 1e-4)
  assert got.dtype == tf.float32
  assert float(got) == pytest.approx(want, rel=1e-5)
  assert float(lars_optimizer.weight_decay_loss(model.trainable_variables, 0.0)) == 0.0


@pytest.mark.parametrize('scaling, peak',
                         [('linear', 0.3 * 512 / 256), ('sqrt', 0.3 * math.sqrt(512))])
@pytest.mark.parametrize('dtype', [tf.int64, tf.float32])
def test_warmup_cosine_schedule_values(scaling, peak, dtype):
  schedule = lars_optimizer.WarmUpAndCosineDecay(0.3, 512, scaling, warmup_steps=10,
                                                 total_steps=110)
  want = {0: 0.0, 5: peak / 2, 10: peak, 60: peak / 2, 110: 0.0, 120: 0.0}
  for step, value in want.items():
    got = schedule(tf.constant(step, dtype))
    assert got.dtype == tf.float32
    assert float(got) == pytest.approx(value, rel=1e-5, abs=1e-6), step
  restored = lars_optimizer.WarmUpAndCosineDecay.from_config(schedule.get_config())
  assert float(restored(tf.constant(60, dtype))) == pytest.approx(peak / 2, rel=1e-5)


def test_schedule_without_warmup_starts_at_peak():
  schedule = lars_optimizer.WarmUpAndCosineDecay(0.1, 256, 'linear', warmup_steps=0,
                                                 total_steps=100)
  assert float(schedule(0)) == pytest.approx(0.1)
  assert float(schedule(50)) == pytest.approx(0.05, rel=1e-5)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)


def test_bad_scaling_and_warmup_are_rejected():
  with pytest.raises(ValueError, match="'cubic'"):
    lars_optimizer.scaled_learning_rate(0.1, 256, 'cubic')
  with pytest.raises(ValueError, match='warmup_steps'):
    lars_optimizer.WarmUpAndCosineDecay(0.1, 256, 'linear', warmup_steps=20, total_steps=10)


def test_build_optimizer_returns_the_named_optimizer():
  lars = lars_optimizer.build_optimizer('lars', 0.1, momentum=0.8, weight_decay=1e-6)
  assert isinstance(lars, lars_optimizer.LARS)
  assert (lars.momentum, lars.weight_decay_rate, lars.weight_decay) == (0.8, 1e-6, None)
  sgd = lars_optimizer.build_optimizer('momentum', 0.1, momentum=0.8, weight_decay=1e-6)
  assert isinstance(sgd, tf.keras.optimizers.SGD) and sgd.momentum == 0.8
  assert isinstance(lars_optimizer.build_optimizer('adam', 0.1), tf.keras.optimizers.Adam)
  # LARS decays the weights itself; the others need the L2 penalty in the loss, also when
  # wrapped for float16 loss scaling.
  assert not lars_optimizer.weight_decay_in_loss(lars)
  assert lars_optimizer.weight_decay_in_loss(sgd)
  assert lars_optimizer.weight_decay_in_loss(lars_optimizer.build_optimizer('adam', 0.1))
  assert not lars_optimizer.weight_decay_in_loss(tf.keras.optimizers.LossScaleOptimizer(lars))
  with pytest.raises(ValueError, match="Unknown optimizer 'sgd'"):
    lars_optimizer.build_optimizer('sgd', 0.1)


def test_lars_config_round_trip():
  schedule = lars_optimizer.WarmUpAndCosineDecay(0.1, 256, 'sqrt', warmup_steps=3, total_steps=9)
  lars = lars_optimizer.LARS(schedule, momentum=0.8, weight_decay_rate=1e-6, eeta=0.002,
                             classic_momentum=False, nesterov=True)
  restored = lars_optimizer.LARS.from_config(lars.get_config())
  for key in ('momentum', 'weight_decay_rate', 'eeta', 'classic_momentum', 'nesterov'):
    assert getattr(restored, key) == getattr(lars, key), key
  assert restored.learning_rate.numpy() == pytest.approx(float(schedule(0)))
  with pytest.raises(ValueError, match='weight_decay_rate'):
    lars_optimizer.LARS(0.1, weight_decay=1e-4)


def test_lars_on_two_replicas_matches_one_device(two_replicas):
  strategy = two_replicas
  with strategy.scope():
    kernel = tf.keras.Variable(W0, name='kernel')
    bias = tf.keras.Variable(W0[0], name='bias')
    optimizer = lars_optimizer.LARS(0.5, weight_decay_rate=1e-2, nesterov=True)
    optimizer.build([kernel, bias])

  @tf.function
  def step(g):
    def replica_step():
      # apply_gradients sums over replicas, so each contributes half.
      optimizer.apply_gradients([(g / 2, kernel), (g[0] / 2, bias)])
    strategy.run(replica_step)

  for g in GRADS:
    step(tf.constant(g))

  single_kernel = tf.keras.Variable(W0, name='kernel')
  single_bias = tf.keras.Variable(W0[0], name='bias')
  single = lars_optimizer.LARS(0.5, weight_decay_rate=1e-2, nesterov=True)
  single_step = tf.function(
      lambda g: single.apply_gradients([(g, single_kernel), (g[0], single_bias)]))
  for g in GRADS:
    single_step(tf.constant(g))

  np.testing.assert_allclose(kernel.numpy(), single_kernel.numpy(), rtol=1e-6)
  np.testing.assert_allclose(bias.numpy(), single_bias.numpy(), rtol=1e-6)
  np.testing.assert_allclose(
      kernel.numpy(), lars_numpy(W0, GRADS, [0.5, 0.5], weight_decay=1e-2, nesterov=True),
      rtol=1e-5)
  np.testing.assert_allclose(
      bias.numpy(), lars_numpy(W0[0], [g[0] for g in GRADS], [0.5, 0.5], weight_decay=1e-2,
                               nesterov=True, excluded=True), rtol=1e-5)
  assert optimizer.iterations.numpy() == 2
  for replica_value in strategy.experimental_local_results(kernel.value):
    np.testing.assert_allclose(replica_value.numpy(), kernel.numpy())


def nesterov_sgd_numpy(w, grads, lr, momentum):
  """Keras/TF Nesterov SGD (the official code's tf.keras SGD(nesterov=True)) from its formula."""
  w, v = w.astype(np.float64), np.zeros_like(w, np.float64)
  for g in grads:
    v = momentum * v - lr * g
    w = w + momentum * v - lr * g
  return w


def test_momentum_optimizer_is_nesterov_as_in_the_official_code():
  optimizer = lars_optimizer.build_optimizer('momentum', 0.5, momentum=0.9)
  assert optimizer.nesterov
  variable = tf.keras.Variable(W0, name='kernel')
  got = apply_steps(optimizer, variable, GRADS)
  np.testing.assert_allclose(got, nesterov_sgd_numpy(W0, GRADS, 0.5, 0.9), rtol=1e-5)


def test_linear_head_gets_neither_lars_decay_nor_trust_ratio_and_its_l2_goes_in_the_loss():
  head = tf.keras.layers.Dense(2, name=lars_optimizer.LINEAR_HEAD_NAME)
  other = tf.keras.layers.Dense(2, use_bias=False, name='proj_0_dense')
  head(tf.zeros([1, 2]))
  other(tf.zeros([1, 2]))
  assert lars_optimizer.is_linear_head(head.kernel) and lars_optimizer.is_linear_head(head.bias)
  assert not lars_optimizer.is_linear_head(other.kernel)
  assert not lars_optimizer.is_linear_head(tf.Variable([1.0], name='supervised_head_bn/x'))
  head.kernel.assign(W0)
  other.kernel.assign(W0)
  optimizer = lars_optimizer.LARS(0.5, momentum=0.9, weight_decay_rate=0.1)

  @tf.function
  def step(g):
    optimizer.apply_gradients([(g, head.kernel), (g, other.kernel)])

  for g in GRADS:
    step(tf.constant(g))
  # The head: plain momentum at the learning rate (the official exclusion list holds it) ...
  want_head = lars_numpy(W0, GRADS, [0.5, 0.5], weight_decay=0.1, excluded=True)
  np.testing.assert_allclose(head.kernel.numpy(), want_head, rtol=1e-6)
  # ... every other kernel: LARS with its decay and trust ratio.
  want_other = lars_numpy(W0, GRADS, [0.5, 0.5], weight_decay=0.1)
  np.testing.assert_allclose(other.kernel.numpy(), want_other, rtol=1e-5, atol=1e-7)
  # Its decay instead enters the loss: weight_decay * ||kernel||^2 / 2 (the bias excluded).
  loss = lars_optimizer.linear_head_decay_loss([head.kernel, head.bias, other.kernel], 1e-3)
  np.testing.assert_allclose(float(loss), 1e-3 * 0.5 * np.sum(head.kernel.numpy() ** 2),
                             rtol=1e-6)
