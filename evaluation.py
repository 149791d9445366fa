"""Evaluation of a model under a strategy: the linear head's top-1/top-5, trunk features
(extracted once per step and shared), the kNN monitor and the logistic-regression probe.

`Evaluator` holds what every evaluation of one run shares (strategy, model, data, settings) and
builds its `tf.function`s once (without AutoGraph: no tensor-dependent Python branches), so
evaluating checkpoint after checkpoint never retraces.
"""
import dataclasses
import functools
import math

from absl import logging
import numpy as np
import tensorflow as tf

import data as data_lib
import distribution as distribution_lib
import lars_optimizer
import model as model_lib
import probe
import projector
import schema


def graph_function(method):
  """tf.function(method) without AutoGraph, its tracing counted for this object alone.

  TensorFlow counts the traces of every function made from one Python code object together and
  warns of "excessive retracing" when 5 calls in a row trace: each new evaluator (a run after
  runs in one process, a notebook) traces its own functions once, which is no retracing. A
  functools.partial has no code object, so TensorFlow keys its count on the partial itself."""
  return tf.function(functools.partial(method), autograph=False)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What an evaluation computes and on which data."""
  eval_batch_size: int = schema.setting(256, allowed=schema.above(0))
  eval_steps: int = schema.setting(0, allowed=schema.at_least(0))  # 0 = the whole eval split
  eval_name: str | None = None  # names the evaluation in its results and summary folder
  eval_timeout_seconds: int = schema.setting(3600, allowed=schema.at_least(0))
  probe_max_examples: int = schema.setting(100_000, allowed=schema.at_least(0))
  probe_baselines: bool = True
  knn_monitor: bool = False
  knn_k: int = schema.setting(200, allowed=schema.above(0))
  knn_temperature: float = schema.setting(0.1, allowed=schema.above(0))
  # eval images whose features go to the Projector; 0: none
  projector_max_points: int = schema.setting(10_000, allowed=schema.at_least(0))


def unsettled_statistics(step, decay, share=0.01):
  """The warning for an evaluation at `step` of a model whose BatchNorm moving statistics
  (updated with momentum `decay` from their initial means 0 and variances 1) still hold more
  than `share` of those initial values, or None.

  Inference mode normalizes with the moving statistics. The projection head's and the linear
  head's BatchNorm layers see inputs of variance about 1e-3 at the start, so until the initial
  1s have decayed their outputs are nearly the same for every image: the head's top-1 and the
  projections sit near chance (a 10-step run's head scores chance; bench/small_batch.py --quick's
  global objective is exactly chance at 5 steps).
  """
  held = decay ** step
  if held <= share:
    return None
  settled = 1 if decay == 0 else math.ceil(math.log(share) / math.log(decay))
  return (f'Evaluated at step {step}: the BatchNorm moving statistics (--batch_norm_decay='
          f'{decay:g}) still hold {held:.0%} of their initial values, which inference mode '
          "uses: the head's top-1 and the projections can be near chance until about step "
          f'{settled}')


def eval_dataset(strategy, builder, info, split, *, global_batch_size, image_size,
                 num_examples):
  """A non-repeating distributed pipeline of `split` (`num_examples` images) with the eval
  preprocessing, in batches of a static shape: per-replica data.batch elements with a 'mask'.

  Every replica gets the same number of full batches (so a TPU never sees a dynamic batch and
  every worker runs the same steps): the last ones are padded with all-zero images whose `mask`
  is False. Steps: ceil(images per input pipeline / the pipeline's images per step).
  """
  config = data_lib.InputConfig(split=split, global_batch_size=global_batch_size,
                                image_size=image_size, is_training=False, num_views=1)
  input_fn = data_lib.build_input_fn(builder, info, config, info.num_classes)

  def padded_input_fn(input_context):
    per_replica = input_context.get_per_replica_batch_size(global_batch_size)
    replicas = input_context.num_replicas_in_sync // input_context.num_input_pipelines
    # tfds.even_splits gives each pipeline at most this many images.
    pipeline_examples = -(-num_examples // input_context.num_input_pipelines)
    steps = max(1, -(-pipeline_examples // (per_replica * replicas)))
    unpadded = input_fn(input_context).unbatch()
    images = unpadded.map(tf.autograph.experimental.do_not_convert(lambda x: x | {'mask': True}))
    padding = tf.data.Dataset.from_tensors(tf.nest.map_structure(
        lambda spec: tf.zeros(spec.shape, spec.dtype), unpadded.element_spec) | {'mask': False})
    images = images.concatenate(padding.repeat()).take(steps * replicas * per_replica)
    return images.batch(per_replica, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  return strategy.distribute_datasets_from_function(padded_input_fn)


def head_hits(labels, logits):
  """(top-1, top-5) per image, booleans [N]: whether the label (one-hot [N, C]) is the head's
  first class, and among its first five (all of them with fewer classes)."""
  targets = tf.argmax(labels, 1)
  return (tf.math.in_top_k(targets, logits, 1),
          tf.math.in_top_k(targets, logits, min(5, logits.shape[-1])))


class HeadMetrics:
  """Top-1/top-5 of a model's supervised head over an eval_dataset; one tf.function for all
  calls (its batches have one static shape)."""

  def __init__(self, strategy, model):
    self.strategy = strategy
    self.model = model
    self._sums = graph_function(self._batch_sums_replicated)

  def _batch_sums(self, batch):
    logits = self.model(batch['views'][0], training=False)['supervised_logits']
    weights = tf.cast(batch['mask'], tf.float32)
    top_1, top_5 = (tf.reduce_sum(weights * tf.cast(hits, tf.float32))
                    for hits in head_hits(batch['labels'], logits))
    return {'top_1': top_1, 'top_5': top_5, 'count': tf.reduce_sum(weights)}

  def _batch_sums_replicated(self, inputs):
    per_replica = self.strategy.run(self._batch_sums, args=(inputs,))
    return {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
            for k, v in per_replica.items()}

  def __call__(self, dataset, num_steps=0, **watch):
    """{'top_1', 'top_5', 'num_examples'} over `dataset` (or its first `num_steps` batches).
    watch: data.batches' `watching` and `what`."""
    sums = {'top_1': 0.0, 'top_5': 0.0, 'count': 0.0}
    for i, inputs in enumerate(data_lib.batches(dataset, **watch)):
      if num_steps and i >= num_steps:
        break
      for k, v in self._sums(inputs).items():
        sums[k] += float(v)
    count = max(sums['count'], 1.0)
    return {'top_1': sums['top_1'] / count, 'top_5': sums['top_5'] / count,
            'num_examples': int(sums['count'])}


@dataclasses.dataclass(frozen=True)
class SplitOutputs:
  """A model's outputs over a whole split (its padding dropped), on the host."""
  features: np.ndarray  # [N, C] trunk features
  labels: np.ndarray  # [N] class indices
  ids: np.ndarray  # [N] image ids
  top_1: np.ndarray | None = None  # [N] bool: the head's top-1 is the label (None: no head)
  top_5: np.ndarray | None = None  # [N] bool: the label is in the head's top 5

  def head_metrics(self):
    """HeadMetrics' {'top_1', 'top_5', 'num_examples'} from the per-image hits."""
    count = max(len(self.labels), 1)
    return {'top_1': float(np.sum(self.top_1)) / count, 'top_5': float(np.sum(self.top_5)) / count,
            'num_examples': len(self.labels)}


class FeatureExtractor:
  """A model's trunk features, labels, ids and (with a linear head) the head's per-image
  top-1/top-5 hits over an eval_dataset (its padding dropped), on this host's replicas: one
  forward pass for the head's metrics and the features. One tf.function for all calls."""

  def __init__(self, strategy, model):
    self.strategy = strategy
    self.model = model
    self._run = graph_function(self._replicated)

  def _replica_outputs(self, batch):
    outputs = self.model(batch['views'][0], training=False)
    found = {'features': outputs['features'], 'labels': tf.argmax(batch['labels'], 1),
             'ids': batch['ids'], 'mask': batch['mask']}
    if 'supervised_logits' in outputs:
      found['top_1'], found['top_5'] = head_hits(batch['labels'], outputs['supervised_logits'])
    return found

  def _replicated(self, inputs):
    return self.strategy.run(self._replica_outputs, args=(inputs,))

  def outputs(self, dataset):
    """The SplitOutputs of `dataset`."""
    parts = {}
    for inputs in data_lib.batches(dataset):
      found = {key: self.strategy.experimental_local_results(value)
               for key, value in self._run(inputs).items()}
      for replica, mask in enumerate(found.pop('mask')):
        for key, values in found.items():
          parts.setdefault(key, []).append(values[replica].numpy()[mask.numpy()])
    return SplitOutputs(**{key: np.concatenate(value) for key, value in parts.items()})

  def __call__(self, dataset, with_ids=False):
    """(features, labels), and their ids with `with_ids`."""
    found = self.outputs(dataset)
    return ((found.features, found.labels, found.ids) if with_ids
            else (found.features, found.labels))


def merge_top_k(values, labels, similarities, chunk_labels, k):
  """The k largest of a running top-k and a chunk's similarities, per row.

  values, labels: [n, k] (similarities, descending, and the labels of those neighbours);
  similarities: [n, b] to the chunk's b rows (-inf: not a neighbour); chunk_labels: [b].
  Returns the new (values, labels), [n, k].
  """
  candidates = tf.concat([values, similarities], 1)
  candidate_labels = tf.concat(
      [labels, tf.broadcast_to(chunk_labels[tf.newaxis], tf.shape(similarities))], 1)
  values, index = tf.math.top_k(candidates, k)
  return values, tf.gather(candidate_labels, index, batch_dims=1)


def knn_votes_top_1(values, labels, eval_labels, num_classes, temperature):
  """Top-1 of the weighted kNN vote (probe.knn_accuracy's): each of the k neighbours (values,
  labels: [n, k]; -inf values never vote) adds exp(similarity / temperature) to its class."""
  weights = np.exp(np.asarray(values, np.float64) / temperature)
  votes = np.zeros((len(values), num_classes))
  np.add.at(votes, (np.arange(len(values))[:, None], np.asarray(labels)), weights)
  return float(np.mean(votes.argmax(1) == np.asarray(eval_labels)))


def knn_top_1(train_features, train_labels, eval_features, eval_labels, *, k, temperature,
              num_classes, chunk_size=1024):
  """probe.knn_accuracy's classifier on features held on the host, in TensorFlow (float32
  similarities, the top-k by tf.math.top_k: about 4 times NumPy's argpartition on 2 cores), in
  chunks of eval rows that bound the [chunk, n_train] similarities."""
  train = tf.math.l2_normalize(tf.constant(train_features, tf.float32), axis=1)
  train_labels = np.asarray(train_labels, np.int64)
  k = min(k, len(train_labels))
  values, labels = [], []
  for start in range(0, len(eval_features), chunk_size):
    rows = tf.math.l2_normalize(
        tf.constant(eval_features[start:start + chunk_size], tf.float32), axis=1)
    top, index = tf.math.top_k(tf.matmul(rows, train, transpose_b=True), k)
    values.append(top.numpy())
    labels.append(train_labels[index.numpy()])
  return knn_votes_top_1(np.concatenate(values), np.concatenate(labels), eval_labels,
                         num_classes, temperature)


class StreamingKNN:
  """Weighted kNN top-1 (probe.knn_accuracy's classifier) computed on the replicas, streaming.

  The eval split's L2-normalised features are gathered once onto every replica ([n_eval, D]);
  then each replica streams its share of the train split batch by batch, multiplies the eval
  features by the batch's ([n_eval, b] similarities) and merges them into a running top-k
  ([n_eval, k] similarities and labels). Nothing of the size of the train split is held, on the
  host or a device. At the end the replicas' top-k are gathered and merged (across workers too).

  embed(views) -> [b, D] features of a batch's views (e.g. the trunk's); datasets: eval_dataset
  pipelines (static batches with a mask). tf.functions are built once per object.
  """

  def __init__(self, strategy, embed, *, k, temperature, num_classes):
    self.strategy = strategy
    self.embed = embed
    self.k = k
    self.temperature = temperature
    self.num_classes = num_classes
    self._eval_step = graph_function(self._eval_features_replicated)
    self._train_step = graph_function(self._update_replicated)
    self._merge = graph_function(self._merged)

  def _normalised(self, views):
    return tf.math.l2_normalize(tf.cast(self.embed(views), tf.float32), axis=1)

  def _eval_features(self, batch):
    context = tf.distribute.get_replica_context()
    # all_gather takes no booleans.
    return tuple(context.all_gather(x, 0) for x in (
        self._normalised(batch['views']), tf.argmax(batch['labels'], 1),
        tf.cast(batch['mask'], tf.int32)))

  def _eval_features_replicated(self, inputs):
    return self.strategy.run(self._eval_features, args=(inputs,))

  def _update(self, values, labels, eval_features, batch):
    similarities = tf.matmul(eval_features, self._normalised(batch['views']), transpose_b=True)
    similarities = tf.where(batch['mask'][tf.newaxis], similarities, -np.inf)
    return merge_top_k(values, labels, similarities, tf.argmax(batch['labels'], 1), self.k)

  def _merged(self, values, labels):
    # [n, replicas * k] from every replica of every worker, merged to [n, k].
    values, index = tf.math.top_k(self.strategy.gather(values, axis=1), self.k)
    return values, tf.gather(self.strategy.gather(labels, axis=1), index, batch_dims=1)

  def _update_replicated(self, values, labels, eval_features, inputs):
    return self.strategy.run(self._update, args=(values, labels, eval_features, inputs))

  def gather_eval_features(self, eval_data, **watch):
    """(features [n_eval, D], labels [n_eval]) of the whole eval split, on this host (every
    worker gets all of them)."""
    features, labels = [], []
    for inputs in data_lib.batches(eval_data, **watch):
      x, y, mask = (self.strategy.experimental_local_results(t)[0].numpy()
                    for t in self._eval_step(inputs))
      features.append(x[mask == 1])
      labels.append(y[mask == 1])
    return np.concatenate(features), np.concatenate(labels)

  def __call__(self, train_data, eval_data, watching=None, what='batch'):
    """kNN top-1 of the eval split's images against the train split's. watching, what: as
    data.batches'."""
    eval_features, eval_labels = self.gather_eval_features(
        eval_data, watching=watching, what=f'{what}: eval split, batch')
    n = len(eval_features)
    per_replica = self.strategy.experimental_distribute_values_from_function
    on_replicas = per_replica(lambda _: tf.constant(eval_features))
    values = per_replica(lambda _: tf.fill([n, self.k], -np.inf))
    labels = per_replica(lambda _: tf.zeros([n, self.k], tf.int64))
    for inputs in data_lib.batches(train_data, watching, f'{what}: train split, batch'):
      values, labels = self._train_step(values, labels, on_replicas, inputs)
    values, labels = self._merge(values, labels)
    return knn_votes_top_1(values.numpy(), labels.numpy(), eval_labels, self.num_classes,
                           self.temperature)


# The probe's baselines: result key, name.
BASELINES = (('probe/raw_pixels_top_1', 'raw pixels'),
             ('probe/random_network_top_1', 'random network'))


def baseline_texts(results):
  """'raw pixels 0.8410', ... of the probe's baselines in `results`."""
  return [f'{name} {results[key]:.4f}' for key, name in BASELINES if key in results]


class Evaluator:
  """Evaluates one model (whose weights change between calls: pass the step) on a run's data.

  The step names the weights: the latest step's results and trunk features are kept, and
  evaluating that step again returns them without computing (the end of training's evaluation
  of a step evaluated while training). To evaluate other weights at a step already evaluated
  (another checkpoint restored into the model), pass another step or build a new Evaluator.

  On one host, with a train split of at most `probe_max_examples` images (the features the
  probe holds anyway), each split is read once per step: one forward pass gives the trunk
  features and the head's hits, shared by the head's metrics, the kNN, the probe and the
  Projector. Otherwise the head's metrics and the kNN run on the replicas (HeadMetrics,
  StreamingKNN), holding nothing of the train split's size.

  config: an EvalConfig; data: the run's data.DataConfig (splits, image size); weight_decay: the
  factor of eval/regularization_loss; summary_writer: where eval/ scalars go (None: nowhere);
  projector_dir: where each evaluation writes the Projector's embedding (None: nowhere);
  watchdog: a trainer.CallWatchdog bounding each batch of the evaluations every worker of a
  multi-worker job takes part in (the head's and kNN's: a hung peer blocks them), or None.
  """

  def __init__(self, strategy, model, builder, info, config, *, data, weight_decay=0.0,
               summary_writer=None, projector_dir=None, watchdog=None):
    self.strategy = strategy
    self.watching = watchdog.watching if watchdog is not None else None
    self.model = model
    self.builder = builder
    self.info = info
    self.config = config
    self.data = data
    self.weight_decay = weight_decay
    self.summary_writer = summary_writer
    self.projector_dir = projector_dir if config.projector_max_points else None
    self.one_host = distribution_lib.num_hosts(strategy) == 1
    # The train split's features fit where the probe would hold them.
    self.holds_features = self.one_host and (
        0 < info.num_train_examples <= config.probe_max_examples)
    self.head_metrics = HeadMetrics(strategy, model)
    self.extract_features = FeatureExtractor(strategy, model)
    self.streaming_knn = StreamingKNN(
        strategy, lambda views: model(views[0], training=False)['features'], k=config.knn_k,
        temperature=config.knn_temperature, num_classes=info.num_classes)
    self._features = {}  # {(step, split): SplitOutputs} of the current step only
    self._evaluated = {}  # {step: results} of the latest step evaluated

  def dataset(self, split):
    """A non-repeating eval_dataset of `split` (no augmentation, static padded batches)."""
    return eval_dataset(self.strategy, self.builder, self.info, split,
                        global_batch_size=self.config.eval_batch_size,
                        image_size=self.data.image_size,
                        num_examples=int(self.builder.info.splits[split].num_examples))

  def outputs(self, step, split):
    """The SplitOutputs of `split` at `step` (features, labels, ids, the head's hits),
    extracted once per step."""
    if (step, split) not in self._features:
      self._features = {key: value for key, value in self._features.items() if key[0] == step}
      self._features[step, split] = self.extract_features.outputs(self.dataset(split))
    return self._features[step, split]

  def features(self, step, split, with_ids=False):
    """Trunk features and labels (and ids) of `split` at `step`, extracted once per step."""
    found = self.outputs(step, split)
    return (found.features, found.labels, found.ids) if with_ids else (found.features,
                                                                         found.labels)

  def evaluate(self, step, knn=None, log=True):
    """Evaluates the model at `step`: its weight-decay loss, the supervised head's top-1/top-5
    on the eval split (when it has one) and, with `knn` (default: knn_monitor), a kNN
    classifier on trunk features. Logs one line (with `log`) and writes the eval/ summaries.

    Returns {'global_step', 'eval/regularization_loss', 'eval/top_1', ..., 'eval/knn_top_1'}.
    """
    config = self.config
    knn = config.knn_monitor if knn is None else knn
    evaluated = self._evaluated.get(step)
    if evaluated is not None and (not knn or 'eval/knn_top_1' in evaluated):
      # A step evaluated while training (the last --eval_every_epochs one) is not evaluated
      # again: the weights are the same, and its summaries and projector files are written.
      if log:
        logging.info('Eval at step %d on %s: as evaluated while training.', step,
                     self.data.eval_split)
        self._warn_if_unsettled(step)
      return dict(evaluated)
    # The quantity the train step logs as train/weight_decay.
    results = {'eval_name': config.eval_name} if config.eval_name else {}
    results |= {'global_step': step, 'eval/regularization_loss': float(
        lars_optimizer.weight_decay_loss(self.model.trainable_variables, self.weight_decay))}
    parts = [f"regularization loss {results['eval/regularization_loss']:.6g}"]
    if self.model.has_supervised_head:
      metrics = self._head_metrics(step, knn)
      results.update({f'eval/{k}': v for k, v in metrics.items()})
      parts.append(f"{metrics['num_examples']} images: top-1 {metrics['top_1']:.4f}, "
                   f"top-5 {metrics['top_5']:.4f}")
    if knn:
      results.update(self.knn(step))
      k = results['eval/knn_k']
      parts.append(f"kNN top-1 {results['eval/knn_top_1']:.4f} (k={k}" + (
          f", all of --train_split={self.data.train_split}: --knn_k={config.knn_k} is more)"
          if k < config.knn_k else ')'))
    if log:
      logging.info('Eval at step %d on %s: %s', step, self.data.eval_split, '; '.join(parts))
      self._warn_if_unsettled(step)
    self._write_summaries(step, results)
    if self.projector_dir:
      self.project(step)
    self._evaluated = {step: dict(results)}
    return results

  def project(self, step):
    """Writes the eval split's features at `step` (a fixed sample) for TensorBoard's Projector,
    with the sample's labels and thumbnails (projector.py)."""
    split = self.data.eval_split
    features, _, ids = self.features(step, split, with_ids=True)
    if len(np.unique(ids)) != len(ids):
      logging.warning('Projector skipped: --eval_split=%s repeats ids (a union of splits).',
                      split)
      return
    # The same images at every step: a fixed sample of the split's ids in increasing order.
    rows = np.argsort(ids)[projector.sample_ids(len(ids), self.config.projector_max_points)]
    sample = projector.write_sample(self.projector_dir, self.builder, self.info, split,
                                    ids[rows], self.data.image_size)
    projector.write_embedding(self.projector_dir, step, features[rows], sample)

  def _head_metrics(self, step, knn):
    """The head's metrics: from the eval split's features pass when this evaluation makes
    one anyway (the kNN on held features, the Projector) and the whole split is evaluated."""
    shared = (self.holds_features and knn) or (self.one_host and self.projector_dir)
    if shared and not self.config.eval_steps:
      return self.outputs(step, self.data.eval_split).head_metrics()
    return self.head_metrics(self.dataset(self.data.eval_split), self.config.eval_steps,
                             watching=self.watching,
                             what=f"the head's evaluation at step {step}, batch")

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

  def _warn_if_unsettled(self, step):
    unsettled = unsettled_statistics(step, self.model.config.batch_norm_decay)
    if unsettled:
      logging.warning(unsettled)

  def knn(self, step):
    """{'eval/knn_top_1': ...}: a weighted kNN (probe.knn_accuracy's classifier) of the eval
    split's trunk features against the train split's, both without augmentation: on the
    features held on the host (holds_features; knn_top_1), else streamed on the replicas
    (StreamingKNN; every worker of a multi-worker run takes part). 'eval/knn_k': the
    neighbours it used, at most the train split's images (a larger --knn_k votes with them all)."""
    k = min(self.config.knn_k, self.info.num_train_examples)
    if self.holds_features:
      train = self.outputs(step, self.data.train_split)
      test = self.outputs(step, self.data.eval_split)
      top_1 = knn_top_1(train.features, train.labels, test.features, test.labels, k=k,
                        temperature=self.config.knn_temperature,
                        num_classes=self.info.num_classes)
    else:
      top_1 = self.streaming_knn(
          self.dataset(self.data.train_split), self.dataset(self.data.eval_split),
          watching=self.watching, what=f'the kNN evaluation at step {step}')
    return {'eval/knn_top_1': top_1, 'eval/knn_k': k}

  def probe(self, step):
    """A logistic-regression probe on frozen trunk features, beside raw-pixel and
    random-network baselines, when the train split is small enough."""
    config, info = self.config, self.info
    if not config.probe_max_examples:
      return {}
    if info.num_train_examples > config.probe_max_examples:
      logging.warning('Linear probe skipped: --train_split=%s has %d images, more than '
                      '--probe_max_examples=%d (the probe uses the whole split or none).',
                      self.data.train_split, info.num_train_examples, config.probe_max_examples)
      return {}
    train_x, train_y = self.features(step, self.data.train_split)
    test_x, test_y = self.features(step, self.data.eval_split)
    results = {'probe/top_1': probe.linear_probe_accuracy(train_x, train_y, test_x, test_y)}
    if config.probe_baselines:
      results.update(self._probe_baselines())
    baselines = (''.join(f'{text}, ' for text in baseline_texts(results))
                 if config.probe_baselines else 'baselines off, ')
    logging.info('Linear probe on %s: top-1 %.4f (%schance %.2f)', self.data.eval_split,
                 results['probe/top_1'], baselines, 1 / info.num_classes)
    return results

  def _probe_baselines(self):
    """The probe on a randomly initialised network of the same shape and on raw pixels (the
    latter only for images of one size: the run's other results stand without it)."""
    with self.strategy.scope():
      random_model = model_lib.build_model(self.model.config, self.data.image_size)
    extract = FeatureExtractor(self.strategy, random_model)
    random_train = extract(self.dataset(self.data.train_split))
    random_test = extract(self.dataset(self.data.eval_split))
    results = {
        'probe/random_network_top_1': probe.linear_probe_accuracy(*random_train, *random_test)}
    if probe.fixed_image_shape(self.builder, self.info) is None:
      logging.warning('No raw-pixel baseline: the images of %s vary in size.', self.info.name)
      return results | {'probe/raw_pixels_skipped': 'images of varying size'}
    raw_train = probe.pixels(self.builder, self.info, self.data.train_split)
    raw_test = probe.pixels(self.builder, self.info, self.data.eval_split)
    return results | {
        'probe/raw_pixels_top_1': probe.linear_probe_accuracy(*raw_train, *raw_test)}
