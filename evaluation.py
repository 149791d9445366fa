"""Evaluation of a model under a strategy: the linear head's top-1/top-5, trunk features
(extracted once per step and shared), the kNN monitor and the logistic-regression probe.

`Evaluator` holds what every evaluation of one run shares (strategy, model, data, settings) and
builds its `tf.function`s once, so evaluating checkpoint after checkpoint never retraces.
"""
import dataclasses

from absl import logging
import numpy as np
import tensorflow as tf

import data as data_lib
import distribution
import lars_optimizer
import model as model_lib
import probe


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What an evaluation computes and on which data."""
  eval_batch_size: int = 256
  eval_steps: int = 0  # 0 = the whole eval split
  eval_name: str | None = None  # names the evaluation in its results and summary folder
  eval_timeout_seconds: int = 3600
  probe_max_examples: int = 20_000
  probe_baselines: bool = True
  knn_monitor: bool = False
  knn_k: int = 200
  knn_temperature: float = 0.1


def _unless_empty(images, compute, empty):
  """compute() on a replica's batch, or empty() when it has no images.

  The last step of a split that does not fill every replica gives some replicas an empty batch;
  oneDNN's CPU convolution returns a wrongly shaped output for it (TF 2.21), which the next
  BatchNormalization rejects.
  """
  return tf.cond(tf.shape(images)[0] > 0, compute, empty)


class HeadMetrics:
  """Top-1/top-5 of a model's supervised head over a dataset; one tf.function for all calls."""

  def __init__(self, strategy, model):
    self.strategy = strategy
    self.model = model
    # The last batch is smaller: one more trace, not one per call.
    self._sums = tf.function(self._batch_sums_replicated, reduce_retracing=True)

  def _batch_sums(self, views, labels, ids):
    del ids
    zeros = {k: tf.constant(0.0) for k in ('top_1', 'top_5', 'count')}

    def sums():
      logits = self.model(views[0], training=False)['supervised_logits']
      targets = tf.argmax(labels, 1)
      return {
          'top_1': tf.reduce_sum(tf.cast(tf.math.in_top_k(targets, logits, 1), tf.float32)),
          'top_5': tf.reduce_sum(tf.cast(tf.math.in_top_k(
              targets, logits, min(5, logits.shape[-1])), tf.float32)),
          'count': tf.cast(tf.shape(logits)[0], tf.float32),
      }

    return _unless_empty(views[0], sums, lambda: zeros)

  def _batch_sums_replicated(self, inputs):
    per_replica = self.strategy.run(self._batch_sums, args=inputs)
    return {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
            for k, v in per_replica.items()}

  def __call__(self, dataset, num_steps=0):
    """{'top_1', 'top_5', 'num_examples'} over `dataset` (or its first `num_steps` batches)."""
    sums = {'top_1': 0.0, 'top_5': 0.0, 'count': 0.0}
    for i, inputs in enumerate(dataset):
      if num_steps and i >= num_steps:
        break
      for k, v in self._sums(inputs).items():
        sums[k] += float(v)
    count = max(sums['count'], 1.0)
    return {'top_1': sums['top_1'] / count, 'top_5': sums['top_5'] / count,
            'num_examples': int(sums['count'])}


class FeatureExtractor:
  """(features [N, C], labels [N]) of a model's trunk over a non-repeating dataset, on this
  host's replicas; one tf.function for all calls."""

  def __init__(self, strategy, model):
    self.strategy = strategy
    self.model = model
    self._run = tf.function(self._replicated, reduce_retracing=True)

  def _replica_features(self, views, labels):
    empty = (tf.zeros([0, self.model.trunk.output_dim]), tf.zeros([0], tf.int64))
    return _unless_empty(
        views[0],
        lambda: (self.model(views[0], training=False)['features'], tf.argmax(labels, 1)),
        lambda: empty)

  def _replicated(self, inputs):
    views, labels, _ = inputs
    return self.strategy.run(self._replica_features, args=(views, labels))

  def __call__(self, dataset):
    features, labels = [], []
    local = self.strategy.experimental_local_results
    for inputs in dataset:
      batch_features, batch_labels = self._run(inputs)
      features += [x.numpy() for x in local(batch_features)]
      labels += [x.numpy() for x in local(batch_labels)]
    return np.concatenate(features), np.concatenate(labels)


class Evaluator:
  """Evaluates one model (whose weights change between calls: pass the step) on a run's data.

  config: an EvalConfig; data: the run's data.DataConfig (splits, image size); weight_decay: the
  factor of eval/regularization_loss; summary_writer: where eval/ scalars go (None: nowhere).
  """

  def __init__(self, strategy, model, builder, info, config, *, data, weight_decay=0.0,
               summary_writer=None):
    self.strategy = strategy
    self.model = model
    self.builder = builder
    self.info = info
    self.config = config
    self.data = data
    self.weight_decay = weight_decay
    self.summary_writer = summary_writer
    self.head_metrics = HeadMetrics(strategy, model)
    self.extract_features = FeatureExtractor(strategy, model)
    self._features = {}  # {(step, split): (features, labels)} of the current step only

  def dataset(self, split):
    """A non-repeating pipeline of `split` with the eval preprocessing (no augmentation)."""
    config = data_lib.InputConfig(split=split, global_batch_size=self.config.eval_batch_size,
                                  image_size=self.data.image_size, is_training=False,
                                  num_views=1)
    return data_lib.build_distributed_dataset(self.strategy, self.builder, self.info, config,
                                              self.info.num_classes)

  def features(self, step, split):
    """Trunk features and labels of `split` at `step`, extracted once per step."""
    if (step, split) not in self._features:
      self._features = {key: value for key, value in self._features.items() if key[0] == step}
      self._features[step, split] = self.extract_features(self.dataset(split))
    return self._features[step, split]

  def evaluate(self, step):
    """Evaluates the model at `step`: its weight-decay loss, the supervised head's top-1/top-5
    on the eval split (when it has one) and, with knn_monitor, a kNN classifier on trunk
    features. Logs one line and writes the eval/ summaries.

    Returns {'global_step', 'eval/regularization_loss', 'eval/top_1', ..., 'eval/knn_top_1'}.
    """
    config = self.config
    # The quantity the train step logs as train/weight_decay.
    results = {'eval_name': config.eval_name} if config.eval_name else {}
    results |= {'global_step': step, 'eval/regularization_loss': float(
        lars_optimizer.weight_decay_loss(self.model.trainable_variables, self.weight_decay))}
    parts = [f"regularization loss {results['eval/regularization_loss']:.6g}"]
    if self.model.has_supervised_head:
      metrics = self.head_metrics(self.dataset(self.data.eval_split), config.eval_steps)
      results.update({f'eval/{k}': v for k, v in metrics.items()})
      parts.append(f"{metrics['num_examples']} images: top-1 {metrics['top_1']:.4f}, "
                   f"top-5 {metrics['top_5']:.4f}")
    if config.knn_monitor:
      results.update(self.knn(step))
      if 'eval/knn_top_1' in results:
        parts.append(f"kNN top-1 {results['eval/knn_top_1']:.4f} (k={config.knn_k})")
    logging.info('Eval at step %d on %s: %s', step, self.data.eval_split, '; '.join(parts))
    self._write_summaries(step, results)
    return results

  def _write_summaries(self, step, results):
    if self.summary_writer is None:
      return
    with self.summary_writer.as_default(step=step):
      tf.summary.scalar('eval/regularization_loss', results['eval/regularization_loss'])
      if 'eval/top_1' in results:
        tf.summary.scalar('eval/label_top_1_accuracy', results['eval/top_1'])
        tf.summary.scalar('eval/label_top_5_accuracy', results['eval/top_5'])
      if 'eval/knn_top_1' in results:
        tf.summary.scalar('eval/knn_top_1', results['eval/knn_top_1'])
    self.summary_writer.flush()

  def knn(self, step):
    """{'eval/knn_top_1': ...}: a weighted kNN (probe.knn_accuracy) of the eval split's trunk
    features against the train split's, both without augmentation."""
    if distribution.num_workers(self.strategy) > 1:
      logging.warning('--knn_monitor skipped: in a multi-worker run each host extracts only its '
                      'shard of the features.')
      return {}
    train_x, train_y = self.features(step, self.data.train_split)
    test_x, test_y = self.features(step, self.data.eval_split)
    return {'eval/knn_top_1': probe.knn_accuracy(
        train_x, train_y, test_x, test_y, k=self.config.knn_k,
        temperature=self.config.knn_temperature)}

  def probe(self, step):
    """A logistic-regression probe on frozen trunk features, beside raw-pixel and
    random-network baselines, when the train split is small enough."""
    config, info = self.config, self.info
    if not 0 < info.num_train_examples <= config.probe_max_examples:
      return {}
    train_x, train_y = self.features(step, self.data.train_split)
    test_x, test_y = self.features(step, self.data.eval_split)
    results = {'probe/top_1': probe.linear_probe_accuracy(train_x, train_y, test_x, test_y)}
    if config.probe_baselines:
      results.update(self._probe_baselines())
    logging.info('Linear probe on %s: top-1 %.4f (raw pixels %.4f, random network %.4f, chance '
                 '%.2f)', self.data.eval_split, results['probe/top_1'],
                 results.get('probe/raw_pixels_top_1', float('nan')),
                 results.get('probe/random_network_top_1', float('nan')), 1 / info.num_classes)
    return results

  def _probe_baselines(self):
    """The probe on a randomly initialised network of the same shape and on raw pixels."""
    with self.strategy.scope():
      random_model = model_lib.build_model(self.model.config, self.data.image_size)
    extract = FeatureExtractor(self.strategy, random_model)
    random_train = extract(self.dataset(self.data.train_split))
    random_test = extract(self.dataset(self.data.eval_split))
    raw_train = probe.pixels(self.builder, self.info, self.data.train_split)
    raw_test = probe.pixels(self.builder, self.info, self.data.eval_split)
    return {
        'probe/random_network_top_1': probe.linear_probe_accuracy(*random_train, *random_test),
        'probe/raw_pixels_top_1': probe.linear_probe_accuracy(*raw_train, *raw_test),
    }
