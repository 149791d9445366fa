"""Probes of frozen features: multinomial logistic regression (L-BFGS), weighted kNN."""
import numpy as np
import tensorflow_datasets as tfds
import threadpoolctl

# Features up to this size fit on one BLAS thread: a step's products over them are too small to
# share (the thin [N, C] x [C, classes] product is bound by memory, and waking the other threads
# costs more than it saves). Measured on 2 cores: 1,437 x 128 features 7x faster on one thread,
# 60,000 x 128 about 1.2x; 60,000 x 784 (188 MB) about equal, left to the BLAS library's threads.
ONE_THREAD_BYTES = 64 << 20


def _normalised(x):
  """[N, ...] -> [N, C] float64 rows of unit L2 norm."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def linear_probe_accuracy(train_x, train_y, test_x, test_y, l2=1e-4, max_iterations=1000):
  """Top-1 on the test set of a multinomial logistic regression on frozen features.

  Features are L2-normalised, then standardised with the train set's per-dimension mean and
  standard deviation (so the problem is well conditioned: a few hundred L-BFGS iterations on
  60,000 x 128 features, under a minute on 2 cores); the regression minimises the mean
  cross-entropy plus l2/2 |W|^2 (bias not penalised) by full-batch L-BFGS in float32.
  """
  train_x, test_x = _standardised(_normalised(train_x), _normalised(test_x))
  weights, bias = fit_logistic_regression(train_x, np.asarray(train_y, np.int64), l2=l2,
                                          max_iterations=max_iterations)
  predictions = np.argmax(test_x @ weights + bias, axis=1)
  return float(np.mean(predictions == np.asarray(test_y, np.int64)))


def _standardised(train_x, test_x):
  """Both sets centred and scaled by the train set's per-dimension mean and deviation; float32."""
  mean = train_x.mean(0)
  scale = 1.0 / np.maximum(train_x.std(0), 1e-6)
  return (((train_x - mean) * scale).astype(np.float32),
          ((test_x - mean) * scale).astype(np.float32))


def fit_logistic_regression(x, y, *, l2, max_iterations=1000, num_classes=None):
  """(weights [C, K], bias [K]) minimising mean softmax cross-entropy + l2/2 |weights|^2 over
  x [N, C] and integer labels y [N], by L-BFGS from zeros."""
  import scipy.optimize  # pylint: disable=import-outside-toplevel  (scikit-learn's dependency)
  num_classes = num_classes or int(y.max()) + 1
  n, dim = x.shape
  one_hot = np.eye(num_classes, dtype=np.float32)[y]

  def loss_and_gradient(flat):
    weights = flat[:dim * num_classes].reshape(dim, num_classes).astype(np.float32)
    bias = flat[dim * num_classes:].astype(np.float32)
    logits = x @ weights + bias
    logits -= logits.max(1, keepdims=True)
    exp = np.exp(logits)
    total = exp.sum(1, keepdims=True)
    loss = np.mean(np.log(total[:, 0]) - np.sum(logits * one_hot, axis=1), dtype=np.float64)
    residual = (exp / total - one_hot) / n
    gradient = np.concatenate([(x.T @ residual + l2 * weights).ravel(), residual.sum(0)])
    loss += 0.5 * l2 * float(np.sum(np.square(weights), dtype=np.float64))
    return loss, gradient.astype(np.float64)

  with threadpoolctl.threadpool_limits(1 if x.nbytes <= ONE_THREAD_BYTES else None,
                                       user_api='blas'):
    result = scipy.optimize.minimize(
        loss_and_gradient, np.zeros(dim * num_classes + num_classes), jac=True,
        method='L-BFGS-B', options={'maxiter': max_iterations})
  flat = result.x.astype(np.float32)
  return flat[:dim * num_classes].reshape(dim, num_classes), flat[dim * num_classes:]


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


def fixed_image_shape(builder, info):
  """The shape every image of the dataset has, or None when their sizes vary (an image
  folder of photographs): raw pixels are no feature vector then."""
  shape = tuple(builder.info.features[info.image_key].shape)
  return None if None in shape else shape


def pixels(builder, info, split, batch_size=4096):
  """(images flattened to [N, H*W*C] in [0, 1], labels [N]) of a whole split of images of one
  shape (fixed_image_shape; ValueError otherwise), read in batches (measured: 60,000
  Fashion-MNIST images in 7 s, against 42 s one record at a time)."""
  if fixed_image_shape(builder, info) is None:
    raise ValueError(f'the images of {builder.name} vary in size: no raw-pixel features')
  images, labels = [], []
  for batch in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False,
                                                batch_size=batch_size)):
    chunk = batch[info.image_key]
    images.append(chunk.reshape(len(chunk), -1).astype(np.float32) / 255.0)
    labels.append(batch[info.label_key].astype(np.int64))
  return np.concatenate(images), np.concatenate(labels)
