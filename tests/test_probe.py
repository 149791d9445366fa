"""probe.py: the weighted kNN against a loop written from its definition, and the linear probe."""
import numpy as np
import pytest

import probe


def loop_knn_accuracy(train_x, train_y, test_x, test_y, k, temperature):
  """One test image at a time: cosine similarities, the k largest, votes exp(sim / T) per class."""
  correct = 0
  for x, y in zip(test_x, test_y):
    sims = [float(np.dot(x, t) / (np.linalg.norm(x) * np.linalg.norm(t))) for t in train_x]
    nearest = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
    votes = {}
    for j in nearest:
      votes[train_y[j]] = votes.get(train_y[j], 0.0) + np.exp(sims[j] / temperature)
    correct += max(votes, key=votes.get) == y
  return correct / len(test_y)


@pytest.mark.parametrize('k, temperature, chunk_size', [(1, 0.1, 1024), (5, 0.1, 7), (40, 1.0, 3)])
def test_knn_matches_loop_implementation(k, temperature, chunk_size):
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 6))
  train_y, test_y = rng.integers(0, 3, 40), rng.integers(0, 3, 25)
  # Overlapping clusters at different scales: cosine similarity, not distance, must decide.
  train_x = (centres[train_y] + rng.normal(size=(40, 6))) * rng.uniform(0.1, 5, (40, 1))
  test_x = centres[test_y] + rng.normal(size=(25, 6))
  accuracy = probe.knn_accuracy(train_x, train_y, test_x, test_y, k=k, temperature=temperature,
                                chunk_size=chunk_size)
  assert accuracy == pytest.approx(
      loop_knn_accuracy(train_x, train_y, test_x, test_y, k, temperature))
  assert 0.4 < accuracy <= 1.0


def test_knn_votes_are_weighted_by_similarity_over_temperature():
  # One very close neighbour of class 1 against two farther ones of class 0 (k = 3).
  angles = np.array([0.0, 1.0, -1.0])
  train_x = np.stack([np.cos(angles), np.sin(angles)], 1)
  train_y = np.array([1, 0, 0])
  test_x, test_y = np.array([[1.0, 0.0]]), np.array([1])
  # cos(1) = 0.54: at T = 0.1 one vote exp(10) beats two of exp(5.4); at T = 10 the count wins.
  assert probe.knn_accuracy(train_x, train_y, test_x, test_y, k=3, temperature=0.1) == 1.0
  assert probe.knn_accuracy(train_x, train_y, test_x, test_y, k=3, temperature=10.0) == 0.0
  # k larger than the training set uses all of it.
  assert probe.knn_accuracy(train_x, train_y, test_x, test_y, k=200, temperature=0.1) == 1.0


def test_linear_probe_separates_separable_classes():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 4, 200)
  features = np.eye(4)[labels] * 3 + 0.3 * rng.normal(size=(200, 4))
  assert probe.linear_probe_accuracy(features[:150], labels[:150], features[150:],
                                     labels[150:]) > 0.95


def test_small_probes_fit_on_one_blas_thread_and_large_ones_on_the_library_default(monkeypatch):
  import scipy.optimize  # noqa: PLC0415
  import threadpoolctl  # noqa: PLC0415

  def blas_threads():
    return {pool['num_threads'] for pool in threadpoolctl.threadpool_info()
            if pool['user_api'] == 'blas'}

  seen = []
  minimize = scipy.optimize.minimize

  def recording(*args, **kwargs):
    seen.append(blas_threads())
    return minimize(*args, **kwargs)

  monkeypatch.setattr(scipy.optimize, 'minimize', recording)
  rng = np.random.default_rng(0)
  features, labels = rng.normal(size=(300, 8)).astype(np.float32), rng.integers(0, 3, 300)
  probe.fit_logistic_regression(features, labels, l2=1e-4)
  monkeypatch.setattr(probe, 'ONE_THREAD_BYTES', features.nbytes - 1)  # now a large problem
  probe.fit_logistic_regression(features, labels, l2=1e-4)
  assert seen == [{1}, blas_threads()]
  assert blas_threads()  # numpy's BLAS was found: the first fit's {1} was the limit, not empty
