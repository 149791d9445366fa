"""Linear probes on frozen features (scikit-learn logistic regression), for small datasets."""
import numpy as np
import tensorflow_datasets as tfds


def linear_probe_accuracy(train_x, train_y, test_x, test_y, inverse_regularization=100.0):
  """Top-1 on the test set of a logistic regression fitted on L2-normalised train features.

  Normalised features have a small scale, so the probe must be weakly regularised (C = 100,
  not scikit-learn's 1) to reach what the features allow.
  """
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel

  def normalise(x):
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

  classifier = LogisticRegression(C=inverse_regularization, max_iter=5000)
  classifier.fit(normalise(train_x), train_y)
  return float(classifier.score(normalise(test_x), test_y))


def pixels(builder, info, split):
  """(images flattened to [N, H*W*C] in [0, 1], labels [N]) of a whole split."""
  images, labels = [], []
  for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
    images.append(example[info.image_key].astype(np.float32).reshape(-1) / 255.0)
    labels.append(int(example[info.label_key]))
  return np.stack(images), np.asarray(labels)
