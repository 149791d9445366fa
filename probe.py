"""Probes of frozen features on small datasets: logistic regression (scikit-learn), weighted kNN."""
import numpy as np
import tensorflow_datasets as tfds


def _normalised(x):
  """[N, ...] -> [N, C] float64 rows of unit L2 norm."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def linear_probe_accuracy(train_x, train_y, test_x, test_y, inverse_regularization=100.0):
  """Top-1 on the test set of a logistic regression fitted on L2-normalised train features.

  Normalised features have a small scale, so the probe must be weakly regularised (C = 100,
  not scikit-learn's 1) to reach what the features allow.
  """
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel

  classifier = LogisticRegression(C=inverse_regularization, max_iter=5000)
  classifier.fit(_normalised(train_x), train_y)
  return float(classifier.score(_normalised(test_x), test_y))


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=200,
                 temperature=0.1, chunk_size=1024):
  """Top-1 of a weighted k-nearest-neighbour classifier on cosine similarity (InstDisc's monitor).

  Each test image votes with its k most similar training images, each vote weighted by
  exp(similarity / temperature); the class with the largest total wins. Features: [N, C] any
  scale (L2-normalised here); labels: [N] integers in [0, num_classes).
  """
  train_x, test_x = _normalised(train_features), _normalised(test_features)
  train_y, test_y = np.asarray(train_labels, np.int64), np.asarray(test_labels, np.int64)
  k = min(k, len(train_x))
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  correct = 0
  # Chunks of test rows bound the [chunk, N_train] similarity matrix on large splits.
  for start in range(0, len(test_x), chunk_size):
    sims = test_x[start:start + chunk_size] @ train_x.T
    nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sims, nearest, 1) / temperature)
    votes = np.zeros((len(sims), num_classes))
    np.add.at(votes, (np.arange(len(sims))[:, None], train_y[nearest]), weights)
    correct += int(np.sum(votes.argmax(1) == test_y[start:start + chunk_size]))
  return correct / len(test_x)


def pixels(builder, info, split):
  """(images flattened to [N, H*W*C] in [0, 1], labels [N]) of a whole split."""
  images, labels = [], []
  for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
    images.append(example[info.image_key].astype(np.float32).reshape(-1) / 255.0)
    labels.append(int(example[info.label_key]))
  return np.stack(images), np.asarray(labels)
