"""objective.py against an independent NumPy implementation written from DESIGN.md's formulas."""
import numpy as np
import pytest
import tensorflow as tf

import objective


def normalized(rng, n, d):
  z = rng.normal(size=(n, d))
  return z / np.linalg.norm(z, axis=1, keepdims=True)


def np_nt_xent(za, zb, temperature):
  """Mean over anchors of -log softmax(positive) over the other 2B-1 vectors, view a + view b."""
  b = len(za)
  z = np.concatenate([za, zb])
  total = 0.0
  for view in range(2):
    losses = []
    for i in range(b):
      anchor, positive = view * b + i, (1 - view) * b + i
      others = [k for k in range(2 * b) if k != anchor]
      logits = z[others] @ z[anchor] / temperature
      positive_logit = z[positive] @ z[anchor] / temperature
      losses.append(-positive_logit + np.log(np.sum(np.exp(logits))))
    total += np.mean(losses)
  return total


def np_sogclr(za, zb, ids, u, temperature, gamma):
  """SogCLR in the linear domain (u == 0 means never visited), loss, d loss / d z, new u."""
  b = len(za)
  z = np.concatenate([za, zb])
  c = 1.0 / (2 * (b - 1))
  loss = 0.0
  grad = np.zeros_like(z)
  u_views = []
  for view in range(2):
    u_view = np.zeros(b)
    losses = []
    for i in range(b):
      anchor, positive = view * b + i, (1 - view) * b + i
      negatives = [k for k in range(2 * b) if k not in (anchor, positive)]
      assert len(negatives) == 2 * (b - 1)
      sims = z[negatives] @ z[anchor]
      g = np.mean(np.exp(sims / temperature))
      stored = u[ids[i]]
      step = 1.0 if stored == 0 else gamma
      u_view[i] = (1 - step) * stored + step * g
      weights = np.exp(sims / temperature) / u_view[i]
      losses.append(-z[anchor] @ z[positive] + c * np.sum(weights * sims))
      # Gradient of this anchor's term (weights held constant), divided by b for the mean.
      grad[anchor] += (-z[positive] + c * weights @ z[negatives]) / b
      grad[positive] += -z[anchor] / b
      grad[negatives] += c * weights[:, None] * z[anchor][None, :] / b
    loss += np.mean(losses)
    u_views.append(u_view)
  new_u = u.copy()
  new_u[ids] = (u_views[0] + u_views[1]) / 2
  return loss, grad[:b], grad[b:], new_u


def tf_sogclr_step(sogclr, za, zb, ids):
  za, zb = tf.constant(za, tf.float32), tf.constant(zb, tf.float32)
  with tf.GradientTape() as tape:
    tape.watch([za, zb])
    result = sogclr(za, zb, tf.constant(ids))
  grad_a, grad_b = tape.gradient(result['loss'], [za, zb])
  return result, grad_a.numpy(), grad_b.numpy()


def test_nt_xent_matches_numpy_value_and_gradient():
  rng = np.random.default_rng(0)
  za, zb = normalized(rng, 6, 5), normalized(rng, 6, 5)
  a, b = tf.constant(za, tf.float32), tf.constant(zb, tf.float32)
  with tf.GradientTape() as tape:
    tape.watch([a, b])
    loss, logits_a, positive_mask = objective.nt_xent_loss(a, b, 0.2, hidden_norm=False)
  grad_a = tape.gradient(loss, a).numpy()
  np.testing.assert_allclose(loss.numpy(), np_nt_xent(za, zb, 0.2), rtol=1e-5)
  # Central finite differences of the NumPy loss (float64).
  eps = 1e-6
  numeric = np.zeros_like(za)
  for i in range(za.shape[0]):
    for j in range(za.shape[1]):
      plus, minus = za.copy(), za.copy()
      plus[i, j] += eps
      minus[i, j] -= eps
      numeric[i, j] = (np_nt_xent(plus, zb, 0.2) - np_nt_xent(minus, zb, 0.2)) / (2 * eps)
  np.testing.assert_allclose(grad_a, numeric, rtol=1e-3, atol=1e-4)
  assert logits_a.shape == (6, 12)
  np.testing.assert_array_equal(np.argmax(positive_mask, 1), np.arange(6))


def test_nt_xent_hidden_norm_normalizes_inputs():
  rng = np.random.default_rng(1)
  za, zb = normalized(rng, 4, 3), normalized(rng, 4, 3)
  scaled, _, _ = objective.nt_xent_loss(za * 3.0, zb * 0.5, 0.1, hidden_norm=True)
  np.testing.assert_allclose(scaled.numpy(), np_nt_xent(za, zb, 0.1), rtol=1e-5)


@pytest.mark.parametrize('gamma', [0.9, 0.5, 1.0])
def test_sogclr_loss_gradients_and_u_over_steps_match_numpy(gamma):
  rng = np.random.default_rng(2)
  num_examples, temperature = 10, 0.2
  sogclr = objective.SogCLRLoss(num_examples, temperature, gamma, hidden_norm=False)
  u = np.zeros(num_examples)
  # Overlapping batches: first visits, revisits, and a mix of both in one batch.
  for ids in ([0, 1, 2, 3], [2, 3, 4, 5], [0, 5, 7, 9], [1, 2, 7, 8]):
    ids = np.array(ids)
    za, zb = normalized(rng, 4, 6), normalized(rng, 4, 6)
    loss, grad_a, grad_b, u = np_sogclr(za, zb, ids, u, temperature, gamma)
    result, tf_grad_a, tf_grad_b = tf_sogclr_step(sogclr, za, zb, ids.astype(np.int32))
    np.testing.assert_allclose(result['loss'].numpy(), loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tf_grad_a, grad_a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(tf_grad_b, grad_b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result['nt_xent'].numpy(), np_nt_xent(za, zb, temperature),
                               rtol=1e-5)
    np.testing.assert_allclose(np.exp(sogclr.log_u.numpy()), u, rtol=1e-5)
    visited = np.flatnonzero(u > 0)
    np.testing.assert_allclose(result['log_u_mean'].numpy(), np.log(np.mean(u[ids])),
                               rtol=1e-5)
  assert np.all(np.isneginf(sogclr.log_u.numpy()[np.setdiff1d(np.arange(10), visited)]))


def test_sogclr_first_visit_uses_gamma_one_only_for_that_sample():
  rng = np.random.default_rng(3)
  sogclr = objective.SogCLRLoss(6, 0.5, 0.3, hidden_norm=False)
  za, zb = normalized(rng, 3, 4), normalized(rng, 3, 4)
  tf_sogclr_step(sogclr, za, zb, np.array([0, 1, 2], np.int32))
  after_first = np.exp(sogclr.log_u.numpy())
  za2, zb2 = normalized(rng, 3, 4), normalized(rng, 3, 4)
  _, _, _, expected = np_sogclr(za2, zb2, np.array([2, 3, 4]), after_first, 0.5, 0.3)
  tf_sogclr_step(sogclr, za2, zb2, np.array([2, 3, 4], np.int32))
  u = np.exp(sogclr.log_u.numpy())
  np.testing.assert_allclose(u, expected, rtol=1e-5)
  # Sample 2 was revisited (gamma = 0.3 mixes in the old value); 3 and 4 took g whole.
  assert u[2] != pytest.approx(expected[2] / 0.3)
  assert after_first[3] == 0 and u[3] > 0


def test_sogclr_stable_at_temperature_001():
  # exp(1/0.01) = 2.7e43 overflows float32; the log-domain table must not.
  rng = np.random.default_rng(4)
  sogclr = objective.SogCLRLoss(8, 0.01, 0.9, hidden_norm=False)
  u = np.zeros(8)
  for ids in ([0, 1, 2, 3], [2, 3, 4, 5]):
    ids = np.array(ids)
    za, zb = normalized(rng, 4, 3), normalized(rng, 4, 3)
    # Views close to each other and to some negatives: large similarities.
    zb = za + 0.05 * zb
    zb /= np.linalg.norm(zb, axis=1, keepdims=True)
    loss, grad_a, grad_b, u = np_sogclr(za, zb, ids, u, 0.01, 0.9)
    result, tf_grad_a, tf_grad_b = tf_sogclr_step(sogclr, za, zb, ids.astype(np.int32))
    assert np.isfinite(result['loss'].numpy()) and np.all(np.isfinite(tf_grad_a))
    np.testing.assert_allclose(result['loss'].numpy(), loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tf_grad_a, grad_a, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(tf_grad_b, grad_b, rtol=1e-3, atol=1e-5)
  log_u = sogclr.log_u.numpy()
  visited = u > 0
  np.testing.assert_allclose(log_u[visited], np.log(u[visited]), rtol=1e-5)
  assert np.all(np.isneginf(log_u[~visited]))


def test_sogclr_rejects_bad_hyperparameters():
  # The ranges ObjectiveConfig declares for the flags (schema), NaN outside each.
  for args, message in (((0.1, 0.0), r'gamma must be in \(0, 1\], got 0.0'),
                        ((0.1, 1.5), r'gamma must be in \(0, 1\], got 1.5'),
                        ((-0.1, 0.9), 'temperature must be > 0, got -0.1'),
                        ((float('nan'), 0.9), 'temperature must be > 0, got nan')):
    with pytest.raises(ValueError, match=f'^{message}$'):
      objective.SogCLRLoss(4, *args)
  with pytest.raises(ValueError, match='^temperature must be > 0, got 0$'):
    objective.SimCLRLoss(0)


def test_u_table_survives_checkpoint_save_and_restore(tmp_path):
  rng = np.random.default_rng(5)
  sogclr = objective.SogCLRLoss(7, 0.1, 0.9)
  tf_sogclr_step(sogclr, normalized(rng, 3, 4), normalized(rng, 3, 4),
                 np.array([4, 0, 6], np.int32))
  path = tf.train.Checkpoint(sogclr=sogclr).save(str(tmp_path / 'ckpt'))
  shapes = dict(tf.train.list_variables(path))
  assert shapes['sogclr/log_u/.ATTRIBUTES/VARIABLE_VALUE'] == [7]
  restored = objective.SogCLRLoss(7, 0.1, 0.9)
  tf.train.Checkpoint(sogclr=restored).restore(path).assert_consumed()
  np.testing.assert_array_equal(restored.log_u.numpy(), sogclr.log_u.numpy())


def _run_split(strategy, fn, *global_arrays):
  """Runs fn on a global batch split evenly over the replicas."""
  replicas = strategy.num_replicas_in_sync

  def split(array):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(np.split(array, replicas)[ctx.replica_id_in_sync_group]))
  return strategy.run(fn, args=tuple(split(a) for a in global_arrays))


@pytest.mark.slow
@pytest.mark.parametrize('loss_name', ['simclr', 'sogclr', 'isogclr'])
def test_two_replicas_equal_one_on_the_same_global_batch(loss_name, one_replica, two_replicas):
  rng = np.random.default_rng(6)
  za = rng.normal(size=(8, 5)).astype(np.float32)
  zb = rng.normal(size=(8, 5)).astype(np.float32)
  ids = rng.permutation(12)[:8].astype(np.int32)
  strategies = {1: one_replica, 2: two_replicas}
  results = {}
  for replicas, strategy in strategies.items():
    with strategy.scope():
      if loss_name == 'isogclr':
        # Large temperature steps, so the tables differ clearly from their initial values.
        sogclr = objective.ISogCLRLoss(12, 0.1, 0.9, eta=0.5, tau_min=0.05, tau_max=0.5)
      else:
        sogclr = objective.SogCLRLoss(12, 0.1, 0.9)

    # Traced and run within this iteration, so `step` always sees this iteration's `sogclr`.
    def step(a, b, i):
      with tf.GradientTape() as tape:
        tape.watch([a, b])
        if loss_name != 'simclr':
          loss = sogclr(a, b, i)['loss']  # noqa: B023
        else:
          loss = objective.nt_xent_loss(a, b, 0.1)[0]
        scaled = loss / tf.distribute.get_replica_context().num_replicas_in_sync
      return (loss, *tape.gradient(scaled, [a, b]))

    losses, grads = [], ([], [])
    for _ in range(3):  # Several steps on the same batch: the second and third reuse u.
      out = _run_split(strategy, tf.function(step), za, zb, ids)
      loss, grad_a, grad_b = (strategy.experimental_local_results(o) for o in out)
      losses.append(np.mean([x.numpy() for x in loss]))
      grads[0].append(np.concatenate([x.numpy() for x in grad_a]))
      grads[1].append(np.concatenate([x.numpy() for x in grad_b]))
    names = ('log_u', 'tau', 'tau_momentum') if loss_name == 'isogclr' else ('log_u',)
    tables = {name: [v.numpy() for v in strategy.experimental_local_results(
        getattr(sogclr, name))] for name in names}
    results[replicas] = (losses, grads, tables)
  np.testing.assert_allclose(results[2][0], results[1][0], rtol=1e-5)
  for view in range(2):
    np.testing.assert_allclose(results[2][1][view], results[1][1][view], rtol=1e-4, atol=1e-6)
  if loss_name != 'simclr':
    for name, copies in results[2][2].items():
      assert len(copies) == 2
      for table in copies:  # every replica's copy
        np.testing.assert_allclose(table, results[1][2][name][0], rtol=1e-5, atol=1e-6)
    if loss_name == 'isogclr':
      assert not np.allclose(results[1][2]['tau'][0][ids], 0.1)


def np_global_nt_xent(za, zb, temperature):
  """Per anchor of all 2N vectors: -log softmax of its positive over the other 2N-1, vectorized;
  the mean over view-a anchors plus the mean over view-b anchors."""
  n = len(za)
  z = np.concatenate([za, zb]).astype(np.float64)
  logits = z @ z.T / temperature
  np.fill_diagonal(logits, -np.inf)
  positives = logits[np.arange(2 * n), (np.arange(2 * n) + n) % (2 * n)]
  largest = logits.max(axis=1)
  log_denominators = largest + np.log(np.exp(logits - largest[:, None]).sum(axis=1))
  return np.sum(log_denominators - positives) / n


@pytest.mark.parametrize('chunk_size', [7, 20, 1024])
def test_global_nt_xent_matches_numpy_for_any_chunking(chunk_size):
  rng = np.random.default_rng(7)
  za, zb = normalized(rng, 10, 4), normalized(rng, 10, 4)
  value = objective.global_nt_xent(za, zb, 0.1, hidden_norm=False, chunk_size=chunk_size)
  np.testing.assert_allclose(value.numpy(), np_global_nt_xent(za, zb, 0.1), rtol=1e-5)
  # The loop implementation of the batch NT-Xent, with the whole dataset as the batch.
  np.testing.assert_allclose(value.numpy(), np_nt_xent(za, zb, 0.1), rtol=1e-5)


def test_global_nt_xent_equals_nt_xent_of_the_whole_dataset_as_one_batch():
  rng = np.random.default_rng(8)
  za, zb = rng.normal(size=(9, 5)), rng.normal(size=(9, 5))
  expected, _, _ = objective.nt_xent_loss(za, zb, 0.2, hidden_norm=True)
  value = objective.global_nt_xent(za * 4.0, zb * 0.3, 0.2, hidden_norm=True, chunk_size=5)
  np.testing.assert_allclose(value.numpy(), expected.numpy(), rtol=1e-5)
  np.testing.assert_allclose(value.numpy(), np_global_nt_xent(
      za / np.linalg.norm(za, axis=1, keepdims=True),
      zb / np.linalg.norm(zb, axis=1, keepdims=True), 0.2), rtol=1e-5)


def test_global_nt_xent_extremes_and_low_temperature():
  # Identical vectors everywhere: every logit equal, each anchor's loss is log(2N - 1).
  same = np.ones((6, 3)) / np.sqrt(3)
  np.testing.assert_allclose(objective.global_nt_xent(same, same, 0.1).numpy(),
                             2 * np.log(11), rtol=1e-5)
  # tau = 0.01 puts logits at +-100: float32 exp overflows, the log-sum-exp must not.
  rng = np.random.default_rng(9)
  za = normalized(rng, 12, 3)
  zb = za + 0.05 * normalized(rng, 12, 3)
  zb /= np.linalg.norm(zb, axis=1, keepdims=True)
  value = objective.global_nt_xent(za, zb, 0.01, chunk_size=5).numpy()
  assert np.isfinite(value)
  np.testing.assert_allclose(value, np_global_nt_xent(za, zb, 0.01), rtol=1e-4, atol=1e-5)


def test_log_u_updates_in_the_replicated_step_under_tensorflows_tpu_policy(monkeypatch,
                                                                            two_replicas):
  # TPUStrategy maps ON_WRITE variables to TPUOnWritePolicy; inside the replicated step (a TPU
  # context) its scatter_update accepts only NONE aggregation. No TPU here: the policy class is
  # TensorFlow's own, the TPU context is the one fact supplied.
  from tensorflow.python.distribute import tpu_util  # noqa: PLC0415
  from tensorflow.python.distribute import tpu_values  # noqa: PLC0415
  tpu = tf.distribute.TPUStrategy.__new__(tf.distribute.TPUStrategy)
  assert objective.log_u_aggregation(tpu) == tf.VariableAggregation.NONE
  assert (objective.log_u_aggregation(two_replicas) ==
          tf.VariableAggregation.ONLY_FIRST_REPLICA)
  monkeypatch.setattr(tpu_util, 'enclosing_tpu_context', lambda: object())
  table = tf.Variable(tf.fill([6], -np.inf))
  update = tf.IndexedSlices(tf.constant([0.5, 2.0]), tf.constant([1, 4]))
  tpu_values.TPUOnWritePolicy(aggregation=objective.log_u_aggregation(tpu)).scatter_update(
      table, update)
  np.testing.assert_array_equal(table.numpy(), [-np.inf, 0.5, -np.inf, -np.inf, 2.0, -np.inf])
  # The aggregation used before on every strategy is what TPUs refused.
  with pytest.raises(NotImplementedError, match='scatter_update is only supported'):
    tpu_values.TPUOnWritePolicy(
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA).scatter_update(table, update)


def np_isogclr(za, zb, ids, u, tau, momentum, gamma, rho, eta, beta, tau_min, tau_max):
  """iSogCLR in the linear domain (u == 0: never visited): loss, d loss / d z, new u, tau, m.

  Pinned to LibAUC's GCLoss_v1(enable_isogclr=True) (libauc/losses/contrastive.py, v2.0.1):
  u is the moving average of exp(s / tau_i) with the image's stored tau_i (the one before this
  step's update); the weights and the gradient of tau use the new u of the view; the gradient is
  log u + rho - mean_k(w_ik s_ik / tau_i), averaged over the two views; the momentum is
  m <- (1 - beta) m + beta grad, then tau <- clip(tau - eta m). A first visit takes gamma = 1
  per image, as SogCLRLoss does. LibAUC decides per batch instead: gamma = 1 while the whole
  batch is unvisited in epoch 0 (constant schedule) or throughout epoch 0 (cosine: gamma(0) = 1),
  which is the same when every image is first seen in epoch 0, as an epoch-wise shuffle does.
  """
  b = len(za)
  z = np.concatenate([za, zb])
  c = 1.0 / (2 * (b - 1))
  loss = 0.0
  grad = np.zeros_like(z)
  u_views, tau_grads = [], []
  for view in range(2):
    u_view, tau_grad, losses = np.zeros(b), np.zeros(b), []
    for i in range(b):
      anchor, positive = view * b + i, (1 - view) * b + i
      negatives = [k for k in range(2 * b) if k not in (anchor, positive)]
      t = tau[ids[i]]
      sims = z[negatives] @ z[anchor]
      g = np.mean(np.exp(sims / t))
      stored = u[ids[i]]
      step = 1.0 if stored == 0 else gamma
      u_view[i] = (1 - step) * stored + step * g
      weights = np.exp(sims / t) / u_view[i]
      losses.append(-z[anchor] @ z[positive] + c * np.sum(weights * sims))
      tau_grad[i] = np.log(u_view[i]) + rho - c * np.sum(weights * sims / t)
      grad[anchor] += (-z[positive] + c * weights @ z[negatives]) / b
      grad[positive] += -z[anchor] / b
      grad[negatives] += c * weights[:, None] * z[anchor][None, :] / b
    loss += np.mean(losses)
    u_views.append(u_view)
    tau_grads.append(tau_grad)
  new_u, new_tau, new_momentum = u.copy(), tau.copy(), momentum.copy()
  new_u[ids] = (u_views[0] + u_views[1]) / 2
  new_momentum[ids] = (1 - beta) * momentum[ids] + beta * (tau_grads[0] + tau_grads[1]) / 2
  new_tau[ids] = np.clip(tau[ids] - eta * new_momentum[ids], tau_min, tau_max)
  return loss, grad[:b], grad[b:], new_u, new_tau, new_momentum


ISOGCLR_DEFAULTS = dict(rho=0.3, eta=0.01, beta=0.9, tau_min=0.05, tau_max=0.7)


@pytest.mark.parametrize('gamma, hyper', [
    (0.9, ISOGCLR_DEFAULTS),
    (1.0, ISOGCLR_DEFAULTS),
    # Large steps: temperatures hit both bounds within the few steps.
    (0.5, dict(rho=0.3, eta=2.0, beta=0.5, tau_min=0.1, tau_max=0.3)),
    (0.9, dict(rho=3.0, eta=0.5, beta=1.0, tau_min=0.05, tau_max=0.25))])
def test_isogclr_loss_gradients_u_tau_and_momentum_over_steps_match_numpy(gamma, hyper):
  rng = np.random.default_rng(10)
  num_examples, temperature = 10, 0.2
  isogclr = objective.ISogCLRLoss(num_examples, temperature, gamma, hidden_norm=False, **hyper)
  u, tau, momentum = np.zeros(num_examples), np.full(num_examples, temperature), np.zeros(10)
  # First visits, revisits and a mix of both in one batch; ids 6 never visited.
  for ids in ([0, 1, 2, 3], [2, 3, 4, 5], [0, 5, 7, 9], [1, 2, 7, 8], [0, 1, 2, 3]):
    ids = np.array(ids)
    za, zb = normalized(rng, 4, 6), normalized(rng, 4, 6)
    loss, grad_a, grad_b, u, tau, momentum = np_isogclr(za, zb, ids, u, tau, momentum, gamma,
                                                        **hyper)
    result, tf_grad_a, tf_grad_b = tf_sogclr_step(isogclr, za, zb, ids.astype(np.int32))
    np.testing.assert_allclose(result['loss'].numpy(), loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tf_grad_a, grad_a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(tf_grad_b, grad_b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.exp(isogclr.log_u.numpy()), u, rtol=1e-5)
    # The gradient of tau is a difference of terms of size s / tau (up to 1 / tau_min = 20):
    # float32 leaves about 1e-5 of it.
    np.testing.assert_allclose(isogclr.tau_momentum.numpy(), momentum, rtol=1e-5, atol=5e-5)
    np.testing.assert_allclose(isogclr.tau.numpy(), tau, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result['tau_mean'].numpy(), np.mean(tau[ids]), rtol=1e-5)
    # The batch NT-Xent stays at the fixed temperature (comparable with SimCLR's).
    np.testing.assert_allclose(result['nt_xent'].numpy(), np_nt_xent(za, zb, temperature),
                               rtol=1e-5)
  tau_now = isogclr.tau.numpy()
  assert np.all((tau_now >= hyper['tau_min']) & (tau_now <= hyper['tau_max']))
  assert tau_now[6] == np.float32(temperature) and isogclr.tau_momentum.numpy()[6] == 0
  np.testing.assert_allclose(np.sort(isogclr.temperature_table().numpy()),
                             np.sort(tau[u > 0]), rtol=1e-6)
  if hyper['eta'] >= 0.5:  # the large steps reach a bound
    assert np.any(np.isclose(tau_now, hyper['tau_min']) | np.isclose(tau_now, hyper['tau_max']))


def test_isogclr_stable_at_small_temperatures():
  # tau_i = 0.01: exp(1/tau) overflows float32; u, the gradient of tau and the loss must not.
  rng = np.random.default_rng(11)
  hyper = dict(rho=0.3, eta=0.001, beta=0.9, tau_min=0.005, tau_max=0.05)
  isogclr = objective.ISogCLRLoss(8, 0.01, 0.9, hidden_norm=False, **hyper)
  u, tau, momentum = np.zeros(8), np.full(8, 0.01), np.zeros(8)
  for ids in ([0, 1, 2, 3], [2, 3, 4, 5]):
    ids = np.array(ids)
    za = normalized(rng, 4, 3)
    zb = za + 0.05 * normalized(rng, 4, 3)
    zb /= np.linalg.norm(zb, axis=1, keepdims=True)
    with np.errstate(over='ignore'):  # float64 holds exp(100); the reference is fine
      loss, grad_a, _, u, tau, momentum = np_isogclr(za, zb, ids, u, tau, momentum, 0.9,
                                                     **hyper)
    result, tf_grad_a, _ = tf_sogclr_step(isogclr, za, zb, ids.astype(np.int32))
    assert np.isfinite(result['loss'].numpy()) and np.all(np.isfinite(tf_grad_a))
    np.testing.assert_allclose(result['loss'].numpy(), loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tf_grad_a, grad_a, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(isogclr.tau.numpy(), tau, rtol=1e-5)
    np.testing.assert_allclose(isogclr.tau_momentum.numpy(), momentum, rtol=1e-4, atol=1e-4)
  visited = u > 0
  np.testing.assert_allclose(isogclr.log_u.numpy()[visited], np.log(u[visited]), rtol=1e-5)


def test_isogclr_rejects_bad_hyperparameters():
  for bad, match in ((dict(rho=-0.1), '^isogclr_rho must be >= 0, got -0.1$'),
                     (dict(eta=0.0), '^isogclr_eta must be > 0, got 0.0$'),
                     (dict(beta=0.0), r'^isogclr_beta must be in \(0, 1\], got 0.0$'),
                     (dict(beta=1.5), 'isogclr_beta'), (dict(tau_min=0.0), 'isogclr_tau_min'),
                     (dict(tau_min=0.2), 'tau_min <= temperature'),
                     (dict(tau_max=0.05), 'temperature <= tau_max')):
    with pytest.raises(ValueError, match=match):
      objective.ISogCLRLoss(4, 0.1, 0.9, **bad)


def test_cosine_gamma_schedule_matches_libauc_formula():
  # LibAUC adjust_gamma: (1 - gamma) * 0.5 * (1 + cos(pi * epoch / E)) + gamma for epoch < E.
  epochs = np.arange(8)
  expected = np.where(epochs < 5, 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * epochs / 5)), 0.1)
  np.testing.assert_allclose(objective.cosine_gamma(epochs, 0.1, 5).numpy(), expected, rtol=1e-6)
  assert objective.cosine_gamma(0, 0.1, 5).numpy() == 1.0


@pytest.mark.parametrize('loss_class', [objective.SogCLRLoss, objective.ISogCLRLoss])
def test_cosine_gamma_schedule_drives_the_u_update_of_sogclr_and_isogclr(loss_class):
  rng = np.random.default_rng(12)
  steps_per_epoch, decay_epochs, gamma_min = 2, 3, 0.2
  loss = loss_class(6, 0.2, gamma_min, hidden_norm=False, gamma_schedule='cosine',
                    gamma_decay_epochs=decay_epochs, steps_per_epoch=steps_per_epoch)
  u, tau, momentum = np.zeros(6), np.full(6, 0.2), np.zeros(6)
  for step in range(8):
    ids = np.array([0, 1, 2]) if step % 2 == 0 else np.array([3, 4, 5])
    epoch = step // steps_per_epoch
    gamma = (gamma_min + (1 - gamma_min) * 0.5 * (1 + np.cos(np.pi * epoch / decay_epochs))
             if epoch < decay_epochs else gamma_min)
    za, zb = normalized(rng, 3, 4), normalized(rng, 3, 4)
    if loss_class is objective.ISogCLRLoss:
      expected, _, _, u, tau, momentum = np_isogclr(za, zb, ids, u, tau, momentum, gamma,
                                                    **ISOGCLR_DEFAULTS)
    else:
      expected, _, _, u = np_sogclr(za, zb, ids, u, 0.2, gamma)
    result = loss(tf.constant(za, tf.float32), tf.constant(zb, tf.float32),
                  tf.constant(ids, tf.int32), step=tf.constant(step, tf.int64))
    np.testing.assert_allclose(result['loss'].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.exp(loss.log_u.numpy()), u, rtol=1e-5)
  with pytest.raises(ValueError, match='gamma_decay_epochs'):
    loss_class(6, 0.2, 0.5, gamma_schedule='cosine')


def test_isogclr_tables_survive_checkpoint_save_and_restore(tmp_path):
  rng = np.random.default_rng(13)
  isogclr = objective.ISogCLRLoss(7, 0.1, 0.9)
  for ids in ([4, 0, 6], [0, 1, 2]):
    tf_sogclr_step(isogclr, normalized(rng, 3, 4), normalized(rng, 3, 4), np.array(ids, np.int32))
  path = tf.train.Checkpoint(sogclr=isogclr).save(str(tmp_path / 'ckpt'))
  shapes = dict(tf.train.list_variables(path))
  for key in ('log_u', 'tau', 'tau_momentum'):
    assert shapes[f'sogclr/{key}/.ATTRIBUTES/VARIABLE_VALUE'] == [7]
  restored = objective.ISogCLRLoss(7, 0.1, 0.9)
  tf.train.Checkpoint(sogclr=restored).restore(path).assert_consumed()
  for name in ('log_u', 'tau', 'tau_momentum'):
    np.testing.assert_array_equal(getattr(restored, name).numpy(), getattr(isogclr, name).numpy())
  assert not np.all(restored.tau.numpy() == np.float32(0.1))  # the updates were restored
  # A restored run continues exactly as the original.
  za, zb = normalized(rng, 3, 4), normalized(rng, 3, 4)
  first = tf_sogclr_step(isogclr, za, zb, np.array([2, 3, 4], np.int32))[0]['loss'].numpy()
  second = tf_sogclr_step(restored, za, zb, np.array([2, 3, 4], np.int32))[0]['loss'].numpy()
  assert first == second
  np.testing.assert_array_equal(restored.tau.numpy(), isogclr.tau.numpy())


def test_isogclr_tables_are_created_as_the_u_table_is(two_replicas):
  # The same synchronization and aggregation as log_u: every replica's scatter of the gathered
  # ids keeps the copies equal, and the TPU on-write policy (tested above for log_u) accepts it.
  with two_replicas.scope():
    isogclr = objective.ISogCLRLoss(5, 0.1, 0.9)
  for table in (isogclr.log_u, isogclr.tau, isogclr.tau_momentum):
    assert table.synchronization == tf.VariableSynchronization.ON_WRITE
    assert table.aggregation == objective.log_u_aggregation(two_replicas)
    assert not table.trainable
  np.testing.assert_array_equal(isogclr.tau.numpy(), np.full(5, 0.1, np.float32))
  np.testing.assert_array_equal(isogclr.tau_momentum.numpy(), np.zeros(5, np.float32))


# --- One interface: build, call, tables, soundness, fingerprint --------------------------------

@pytest.mark.parametrize('loss', sorted(objective.OBJECTIVES))
def test_every_objective_is_built_from_its_config_and_returns_the_same_dict(loss):
  """build() makes each registered objective; every call returns the keys the trainer reads,
  its declared METRICS among them, and 'nt_xent' is NT-Xent at the config's temperature."""
  rng = np.random.default_rng(0)
  za, zb = normalized(rng, 4, 8), normalized(rng, 4, 8)
  config = objective.ObjectiveConfig(loss=loss, temperature=0.2, gamma=0.9)
  built = objective.build(config, num_examples=6, steps_per_epoch=2)
  assert type(built) is objective.OBJECTIVES[loss]
  result = built(tf.constant(za, tf.float32), tf.constant(zb, tf.float32),
                 tf.constant([0, 1, 2, 3]), step=tf.constant(0, tf.int64))
  assert {'loss', 'nt_xent', 'logits_a', 'positive_mask'} <= set(result)
  assert set(built.METRICS.values()) <= set(result)
  np.testing.assert_allclose(float(result['nt_xent']), np_nt_xent(za, zb, 0.2), rtol=1e-5)
  assert result['logits_a'].shape == (4, 8) and result['positive_mask'].shape == (4, 8)
  assert config.per_image == bool(built.tables())
  if loss == 'simclr':
    assert float(result['loss']) == float(result['nt_xent'])
  else:  # the first visit of every image: u is the batch's own estimate
    assert np.isfinite(built.log_u.numpy()[:4]).all()
    assert np.isneginf(built.log_u.numpy()[4:]).all()


def test_an_unknown_loss_names_the_registered_ones():
  with pytest.raises(ValueError, match=r"Unknown loss 'byol'.*isogclr.*simclr.*sogclr"):
    objective.build(objective.ObjectiveConfig(loss='byol'), 6, 2)


def test_each_objective_declares_the_hyperparameters_it_reads():
  """What the resume identity check compares: SimCLR has no gamma, a constant gamma reads no
  decay length, iSogCLR adds its temperature updates."""
  config = objective.ObjectiveConfig
  assert config(loss='simclr').hyperparameters() == ('temperature', 'hidden_norm')
  assert config(loss='sogclr').hyperparameters() == (
      'temperature', 'hidden_norm', 'gamma', 'gamma_schedule')
  assert 'gamma_decay_epochs' in config(loss='sogclr', gamma_schedule='cosine').hyperparameters()
  assert set(config(loss='isogclr').hyperparameters()) - set(
      config(loss='sogclr').hyperparameters()) == {
          'isogclr_rho', 'isogclr_eta', 'isogclr_beta', 'isogclr_tau_min', 'isogclr_tau_max'}
  # Every ObjectiveConfig field is read by some objective: no dead setting.
  every = set().union(*(config(loss=name, gamma_schedule='cosine').hyperparameters()
                        for name in objective.OBJECTIVES))
  assert every | {'loss'} == {f for f in config.__dataclass_fields__}


def test_a_never_visited_u_is_sound_and_nan_or_plus_inf_is_not():
  sogclr = objective.SogCLRLoss(3, temperature=0.1, gamma=0.9)

  def sound(values):
    return bool(sogclr.table_is_sound('log_u', tf.constant(values)))

  assert sound([-np.inf, 0.5, 3.0])
  assert not sound([np.nan, 0.5, 3.0])
  assert not sound([np.inf, 0.5, 3.0])
  isogclr = objective.ISogCLRLoss(3, temperature=0.1, gamma=0.9)
  assert not bool(isogclr.table_is_sound('tau', tf.constant([-np.inf, 0.1, 0.1])))


def test_fingerprint_and_call_metrics_summarise_the_tables():
  assert objective.SimCLRLoss(0.1).fingerprint() == ''
  assert objective.SimCLRLoss(0.1).call_metrics({'log_u_mean': 1.0}) == {}
  isogclr = objective.ISogCLRLoss(4, temperature=0.1, gamma=0.9)
  isogclr.log_u.assign([1.0, 2.0, -np.inf, -np.inf])
  isogclr.tau.assign([0.2, 0.4, 0.1, 0.1])
  assert isogclr.fingerprint() == (
      'u visited 2, log u sum 3.0000000000e+00, tau sum 8.0000001192e-01, '
      'tau momentum sum 0.0000000000e+00')
  metrics = isogclr.call_metrics({'log_u_mean': 0.0})
  assert metrics['u_mean'] == 1.0
  np.testing.assert_allclose([metrics['tau_mean'], metrics['tau_min'], metrics['tau_max']],
                             [0.3, 0.2, 0.4], rtol=1e-6)
  # u beyond float32: no u_mean, its log still logged by the step.
  assert 'u_mean' not in isogclr.call_metrics({'log_u_mean': 200.0})
