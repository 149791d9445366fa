"""Datasets -> distributed tf.data pipelines of (views, one-hot labels, ids).

Contract: every element is `(views, labels, ids)` per replica. `views` is a tuple of [b, H, W, 3]
float32 images in [0, 1]: two augmented views of the same images when pretraining, one view
otherwise; the train step concatenates views on the batch axis. `labels` is [b, num_classes]
one-hot, `ids` [b] int32 dense dataset ids in [0, N) (the index into SogCLR's `u` table).
"""
import dataclasses
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import data_util

DEMO_DATASET = 'digits'
# Feature keys tried in order: the official SogCLR ImageNet layout first, then TFDS conventions.
IMAGE_KEYS = ('image/encoded', 'image')
LABEL_KEYS = ('image/class/label', 'label')
ID_KEYS = ('image/ID', 'id')
# Images at most this size use the CIFAR stem and no centre crop at evaluation.
SMALL_IMAGE_SIZE = 32


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's bundled 8x8 handwritten digits (1,797 images), with dense ids; no download.

  A stratified, seeded split: 360 test images, 1,437 train images. Registered with TFDS as
  'digits'; prepared into `data_dir` on first use.
  """

  VERSION = tfds.core.Version('1.0.0')
  NUM_TEST = 360

  def _info(self):
    # A plain DatasetInfo: the dataset_info_from_configs helper expects a package of metadata.
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 3)),
            'label': tfds.features.ClassLabel(num_classes=10),
            'id': tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships inside scikit-learn.
    return {'train': self._generate_examples('train'), 'test': self._generate_examples('test')}

  def _generate_examples(self, split):
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.target))
    test = np.zeros(len(order), bool)
    # Stratified: the same share of every class in the test split.
    for label in range(10):
      members = order[digits.target[order] == label]
      test[members[:round(self.NUM_TEST * len(members) / len(order))]] = True
    test[np.flatnonzero(~test)[:self.NUM_TEST - test.sum()]] = True
    indices = np.flatnonzero(test if split == 'test' else ~test)
    for dense_id, index in enumerate(indices):
      pixels = np.round(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
      yield dense_id, {
          'image': np.repeat(pixels[:, :, None], 3, axis=2),
          'label': int(digits.target[index]),
          'id': dense_id,
      }


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the training loop needs to know about a dataset."""
  name: str
  num_train_examples: int
  num_eval_examples: int
  num_classes: int
  image_key: str
  label_key: str
  id_key: str    # '' when the records carry no id


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """One pipeline: which split, how it is batched and augmented."""
  split: str
  global_batch_size: int
  image_size: int
  is_training: bool            # shuffle, repeat, augment, drop the remainder
  num_views: int = 2           # 2 when pretraining, 1 otherwise
  color_distort: bool = True   # color jitter and grayscale (pretraining; SimCLR fine-tunes without)
  color_jitter_strength: float = 1.0
  crop_area_min: float = 0.08
  use_blur: bool = True
  cache_dataset: bool = False
  seed: int = 0
  deterministic: bool = False
  initial_step: int = 0        # resume: the global step the pipeline starts at


def get_builder(name, data_dir):
  """The TFDS builder of `name`; the demo dataset is prepared on first use."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'--dataset={name!r} is not a TFDS dataset name ({e.__class__.__name__}); '
                     f"use '{DEMO_DATASET}' for the embedded demo data") from None
  if name == DEMO_DATASET:
    builder.download_and_prepare()
  elif not tf.io.gfile.exists(os.path.join(builder.data_dir, 'dataset_info.json')):
    raise ValueError(f'--dataset={name!r} is not prepared under --data_dir={data_dir!r} '
                     f'(looked in {builder.data_dir}); prepare it with TFDS first')
  return builder


def _first_key(features, candidates, what, name):
  for key in candidates:
    if key in features:
      return key
  if what == 'id':
    return ''
  raise ValueError(f'Dataset {name!r} has no {what} feature; expected one of {candidates}, '
                   f'found {sorted(features)}')


def describe(builder, train_split, eval_split, num_classes=0):
  """DatasetInfo of `builder`; num_classes > 0 overrides the dataset's own count."""
  name = builder.info.name
  splits = builder.info.splits
  for flag, split in (('train_split', train_split), ('eval_split', eval_split)):
    if split not in splits:
      raise ValueError(f'--{flag}={split!r} is not a split of dataset {name!r}; '
                       f'it has {sorted(splits)}')
  features = builder.info.features
  label_key = _first_key(features, LABEL_KEYS, 'label', name)
  if num_classes <= 0:
    num_classes = features[label_key].num_classes
  return DatasetInfo(
      name=name,
      num_train_examples=splits[train_split].num_examples,
      num_eval_examples=splits[eval_split].num_examples,
      num_classes=num_classes,
      image_key=_first_key(features, IMAGE_KEYS, 'image', name),
      label_key=label_key,
      id_key=_first_key(features, ID_KEYS, 'id', name))


def _checked_ids(ids, num_examples, dataset_name, split):
  """Stops the input pipeline, on the host, on an id outside [0, num_examples)."""
  ids = tf.cast(ids, tf.int32)
  in_range = tf.logical_and(ids >= 0, ids < num_examples)
  check = tf.debugging.Assert(
      in_range,
      [f'Dataset {dataset_name!r} split {split!r}: id outside [0, {num_examples}):', ids],
      name='check_ids')
  with tf.control_dependencies([check]):
    return tf.identity(ids)


def build_input_fn(builder, info, config, num_classes):
  """Returns `input_fn(input_context) -> tf.data.Dataset` of per-replica batches."""
  split_size = builder.info.splits[config.split].num_examples
  image_feature = builder.info.features[info.image_key]
  if config.is_training and config.num_views == 2 and not info.id_key:
    raise ValueError(f'Dataset {info.name!r} split {config.split!r} has no id feature '
                     f'(one of {ID_KEYS}); SogCLR needs a dense id per training image')

  def preprocess(example, seed):
    image = image_feature.decode_example(example[info.image_key])
    image = tf.image.convert_image_dtype(image, tf.float32)
    if image.shape[-1] == 1:
      image = tf.image.grayscale_to_rgb(image)
    if config.is_training:
      seeds = tf.random.experimental.stateless_split(seed, config.num_views)
      views = tuple(
          data_util.preprocess_for_train(
              image, seeds[v], config.image_size, config.image_size,
              color_distort=config.color_distort,
              color_jitter_strength=config.color_jitter_strength,
              crop_area_min=config.crop_area_min, blur=config.use_blur)
          for v in range(config.num_views))
    else:
      views = (data_util.preprocess_for_eval(
          image, config.image_size, config.image_size,
          crop=config.image_size > SMALL_IMAGE_SIZE),)
    if info.id_key:
      ids = _checked_ids(example[info.id_key], split_size, info.name, config.split)
    else:
      ids = tf.constant(-1, tf.int32)
    labels = tf.one_hot(example[info.label_key], num_classes)
    return views, labels, ids

  def input_fn(input_context):
    per_replica_batch_size = input_context.get_per_replica_batch_size(config.global_batch_size)
    replicas_per_pipeline = (input_context.num_replicas_in_sync //
                             input_context.num_input_pipelines)
    split = config.split
    if input_context.num_input_pipelines > 1:
      split = tfds.even_splits(split, n=input_context.num_input_pipelines)[
          input_context.input_pipeline_id]
    # Images are decoded in `preprocess`, after the cache, so a cached dataset holds the
    # compact encoded bytes.
    dataset = builder.as_dataset(
        split=split, shuffle_files=False,
        decoders={info.image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(try_autocache=False))
    if config.cache_dataset:
      dataset = dataset.cache()
    options = tf.data.Options()
    options.deterministic = config.deterministic or not config.is_training
    if not config.is_training:
      dataset = dataset.map(lambda ex: preprocess(ex, None), tf.data.AUTOTUNE)
      dataset = dataset.batch(per_replica_batch_size)
      return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)

    pipeline_size = int(dataset.cardinality())
    # Whole steps of distinct images per epoch: a step never mixes two epochs, so an id never
    # appears twice in one global batch.
    batches_per_epoch = (pipeline_size // per_replica_batch_size //
                         replicas_per_pipeline * replicas_per_pipeline)
    if batches_per_epoch == 0:
      raise ValueError(
          f'Split {config.split!r} of {info.name!r} has {pipeline_size} images per input '
          f'pipeline, fewer than one step of --train_batch_size={config.global_batch_size}')
    base_seed = tf.constant([config.seed, input_context.input_pipeline_id], tf.int64)
    start_epoch, start_offset = divmod(config.initial_step,
                                       batches_per_epoch // replicas_per_pipeline)
    # Batches of the first (resumed) epoch already consumed, across this pipeline's replicas.
    skipped_batches = start_offset * replicas_per_pipeline

    def epoch_dataset(epoch):
      # Shuffle order and augmentations are functions of (seed, epoch, position): a run can be
      # repeated exactly, and resumed mid-epoch by skipping records before any decoding.
      epoch_seed = tf.random.experimental.stateless_fold_in(base_seed, epoch)
      shuffle_seed = tf.random.stateless_uniform([], epoch_seed, maxval=2**62, dtype=tf.int64)
      skip = tf.where(epoch == start_epoch, tf.constant(skipped_batches, tf.int64), 0)
      d = dataset.shuffle(min(pipeline_size, 50_000), seed=shuffle_seed,
                          reshuffle_each_iteration=False)
      d = d.enumerate().skip(skip * per_replica_batch_size).map(
          lambda index, ex: preprocess(
              ex, tf.random.experimental.stateless_fold_in(epoch_seed, index)),
          num_parallel_calls=tf.data.AUTOTUNE, deterministic=config.deterministic)
      d = d.batch(per_replica_batch_size, drop_remainder=True)
      return d.take(batches_per_epoch - skip)

    dataset = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_dataset)
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)

  return input_fn


def build_distributed_dataset(strategy, builder, info, config, num_classes):
  """A distributed dataset of per-replica `(views, labels, ids)` batches."""
  input_fn = build_input_fn(builder, info, config, num_classes)
  return strategy.distribute_datasets_from_function(input_fn)


def steps_per_epoch(num_examples, global_batch_size):
  """Training steps in one pass over the data (a step never spans two epochs)."""
  return num_examples // global_batch_size
