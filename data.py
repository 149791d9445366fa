"""Datasets -> distributed tf.data pipelines of named batches.

Contract: every element is a batch (a dict, see `batch`) per replica, the same in training and
evaluation: 'views', a tuple of [b, H, W, 3] float32 images in [0, 1] (two augmented views of
the same images when pretraining, one view otherwise; the train step concatenates views on the
batch axis); 'labels', [b, num_classes] one-hot; 'ids', [b] int32 dense dataset ids in [0, N)
(the index into SogCLR's `u` table). With `augment_on='device'` (training) the views are only
cropped and resized (uint8 scale), and 'pixel_params', a tuple of [b, data_util.NUM_PARAMS]
float32 per view, carries the parameters of their flip, color distortion and blur, which the
train step applies (`data_util.distort_batch`). Evaluation's padded batches add 'mask' (False
on padding; evaluation.eval_dataset).

Ids come from the records' `image/ID`, from a numeric `id` proved dense, or else from TFDS's record
ids (shard offset + index in the shard). Ids, labels and image decoding are checked on the host:
a bad record stops the run with an error naming the dataset, split and record.
"""
import contextlib
import dataclasses
import itertools
import os
import re
import threading

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import data_util
import fashion_mnist
import imagenet  # noqa: F401  (registers the imagenet1k_ids and imagenet_s builders)
import schema


def batch(views, labels, ids, **optional):
  """The pipeline's element by name: {'views', 'labels', 'ids'} and the `optional` members
  ('pixel_params' of device augmentation in training, 'mask' of evaluation's padding)."""
  unknown = set(optional) - {'pixel_params', 'mask'}
  assert not unknown, unknown
  return {'views': views, 'labels': labels, 'ids': ids, **optional}


DEMO_DATASET = 'digits'
# Feature keys tried in order: the official SogCLR ImageNet layout first, then TFDS conventions.
IMAGE_KEYS = ('image/encoded', 'image')
LABEL_KEYS = ('image/class/label', 'label')
# Ids trusted as they are (the official SogCLR layout and imagenet.py's builders).
TRUSTED_ID_KEY = 'image/ID'
# A numeric id used only when a scan proves it dense; larger splits derive ids from tfds_id.
NUMERIC_ID_KEY = 'id'
MAX_ID_SCAN = 200_000
# Records decoded per nested dataset: the price of naming an undecodable record, amortized.
DECODE_CHUNK = 32
# Shard files read at once, interleaved record by record (as TFDS reads: 16).
READ_CYCLE = 16
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
class DataConfig:
  """A run's data: which dataset and splits, image size, and the training augmentations."""
  # 'name[/config][:version]' prepared under data_dir
  dataset: str = schema.setting('imagenet2012', defines_run=True, eval_inherits=True)
  # None: TFDS's own (~/tensorflow_datasets)
  data_dir: str | None = schema.setting(None, eval_inherits=True)
  train_split: str = schema.setting('train', defines_run=True, eval_inherits=True)
  eval_split: str = schema.setting('validation', eval_inherits=True)
  # 0: read from the dataset
  num_classes: int = schema.setting(0, defines_run=True, eval_inherits=True,
                                    allowed=schema.at_least(0))
  # subtracted from the records' labels (1: labels 1..K)
  label_offset: int = schema.setting(0, eval_inherits=True, allowed=schema.at_least(0))
  fashion_mnist_dir: str | None = None  # idx files of fashion_mnist (None: Debian's folder)
  image_size: int = schema.setting(224, architecture=True, allowed=schema.above(0))
  shuffle_buffer: int = schema.setting(50_000, allowed=schema.at_least(1))
  cache_dataset: bool = False
  color_jitter_strength: float = schema.setting(1.0, allowed=schema.at_least(0))
  crop_area_min: float = schema.setting(0.08, allowed=schema.Range(0, 1, low_open=True))
  random_flip: bool = True
  use_blur: bool = True
  augment_on: str = 'auto'  # where flips, color distortion and blur run: auto | host | device


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the training loop needs to know about a dataset."""
  name: str
  num_train_examples: int
  num_eval_examples: int
  num_classes: int
  image_key: str
  label_key: str  # '' when the records carry no label
  id_key: str     # '' when ids are derived from TFDS's record ids (tfds_id)
  num_ids: int = 0  # size of the per-image tables (SogCLR's u): ids lie in [0, num_ids)
  label_offset: int = 0  # subtracted from every record's label (1: labels 1..K become 0..K-1)
  grey: bool = False  # the images are stored with one channel (decoded to R = G = B)

  def __post_init__(self):
    if not self.num_ids:
      object.__setattr__(self, 'num_ids', self.num_train_examples)


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
  random_flip: bool = True       # horizontal flips in training
  use_blur: bool = True
  grey: bool = False           # grey images: color distortion is brightness and contrast only
  cache_dataset: bool = False
  seed: int = 0
  deterministic: bool = False
  initial_step: int = 0        # resume: the global step the pipeline starts at
  labels_required: bool = True  # False: a dataset without labels yields all-zero labels
  unique_ids: bool = False     # training: an id seen twice in one epoch stops the pipeline
  shuffle_buffer: int = 50_000  # encoded records held by the per-epoch shuffle
  # 'host': every augmentation in the pipeline; 'device': the pipeline crops and resizes, and
  # flips, color distortion and blur run batched in the train step (`pixel_augment`), from
  # parameters drawn here from the same seeds (batches gain their 'pixel_params').
  augment_on: str = 'host'

  def pixel_augment(self):
    """The PixelAugment the train step applies, or None when the host applies everything."""
    if not (self.is_training and self.augment_on == 'device'):
      return None
    return data_util.PixelAugment(
        height=self.image_size, color_jitter_strength=self.color_jitter_strength,
        flip=self.random_flip, color_distort=self.color_distort, blur=self.use_blur,
        grey=self.grey)


def _parse_name(name):
  """'name[/config][:version]' -> (name, config or None, version or None)."""
  match = re.fullmatch(r'([\w-]+)(?:/([\w.-]+))?(?::([\d.*]+))?', name)
  if not match:
    raise ValueError(f"--dataset={name!r} is not a dataset name (expected 'name', "
                     "'name/config' or 'name:version')")
  return match.groups()


def _version_key(version):
  return tuple(int(p) for p in version.split('.'))


def _prepared_dirs(root):
  """{version: directory} of the prepared versions directly under `root`."""
  found = {}
  if not tf.io.gfile.isdir(root):
    return found
  for child in tf.io.gfile.listdir(root):
    child = child.rstrip('/')
    if re.fullmatch(r'\d+\.\d+\.\d+', child) and tf.io.gfile.exists(
        os.path.join(root, child, 'dataset_info.json')):
      found[child] = os.path.join(root, child)
  return found


def find_prepared_dir(name, data_dir):
  """The directory of the prepared dataset `name` ('name[/config][:version]') under `data_dir`,
  or None. Without a version, the highest prepared one; without a config, the only one or the
  registered builder's default."""
  base, config, version = _parse_name(name)
  root = os.path.join(data_dir, base)
  if config is None:
    versions = _prepared_dirs(root)
    if not versions and tf.io.gfile.isdir(root):
      configs = sorted(c.rstrip('/') for c in tf.io.gfile.listdir(root)
                       if _prepared_dirs(os.path.join(root, c.rstrip('/'))))
      default = None
      try:
        builder_configs = tfds.builder_cls(base).BUILDER_CONFIGS
        default = builder_configs[0].name if builder_configs else None
      except tfds.core.registered.DatasetNotFoundError:
        pass
      if default in configs:
        config = default
      elif len(configs) == 1:
        config = configs[0]
      elif configs:
        raise ValueError(f'--dataset={name!r} has several prepared configs under '
                         f'--data_dir={data_dir!r}: {configs}; name one as {base}/<config>')
  if config is not None:
    versions = _prepared_dirs(os.path.join(root, config))
  if not versions:
    return None
  if version is not None:
    if version not in versions:
      raise ValueError(f'--dataset={name!r}: version {version} is not prepared under '
                       f'--data_dir={data_dir!r}; prepared versions: {sorted(versions)}')
    return versions[version]
  return versions[max(versions, key=_version_key)]


def get_builder(name, data_dir, fashion_mnist_dir=None):
  """The builder of dataset `name` ('name[/config][:version]') prepared under `data_dir`.

  A prepared directory is read from its own metadata, without the code that wrote it (so the
  official SogCLR `imagenet2012` with `image/ID`, imagenet.py's builders and image folders all
  read the same way). The demo dataset is prepared on first use, and so is `fashion_mnist`
  (from the idx files in `fashion_mnist_dir`, default Debian's folder) when no version of it
  is prepared under `data_dir`.
  """
  data_dir = data_dir or tfds.core.constants.DATA_DIR
  if tf.io.gfile.exists(data_dir) and not tf.io.gfile.isdir(data_dir):
    raise ValueError(f'--data_dir={data_dir!r} is a file, not a directory of prepared datasets')
  if name == DEMO_DATASET:
    builder = tfds.builder(name, data_dir=data_dir)
    version_dir = os.path.join(data_dir, name, str(Digits.VERSION))
    if (tf.io.gfile.isdir(version_dir) and
        not tf.io.gfile.exists(os.path.join(version_dir, 'dataset_info.json'))):
      raise ValueError(f'The demo data in {version_dir} is incomplete (no dataset_info.json); '
                       'delete that folder and it is prepared again')
    builder.download_and_prepare()
    return builder
  prepared = find_prepared_dir(name, data_dir)
  if prepared is None and name == fashion_mnist.NAME:
    logging.info('Preparing %s in %s from the idx files in %s (once; about a minute).', name,
                 data_dir, fashion_mnist_dir or fashion_mnist.DEFAULT_SOURCE_DIR)
    fashion_mnist.prepare(data_dir, fashion_mnist_dir)
    prepared = find_prepared_dir(name, data_dir)
  if prepared is not None:
    logging.info('Reading dataset %r from %s', name, prepared)
    return tfds.builder_from_directory(prepared)
  base = _parse_name(name)[0]
  try:
    tfds.builder_cls(base)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f'--dataset={name!r} is neither a TFDS dataset name nor prepared under '
        f'--data_dir={data_dir!r}; use {DEMO_DATASET!r} for the embedded demo data, or '
        'prepare one with `python imagenet.py ...` (docs/datasets.md)') from None
  raise ValueError(f'--dataset={name!r} is not prepared under --data_dir={data_dir!r} (looked in '
                   f'{os.path.join(data_dir, base)}); prepare it with `tfds build {base} '
                   f'--data_dir={data_dir}` (or `python imagenet.py` for ImageNet from local '
                   'files) first')


def _first_key(features, candidates):
  return next((key for key in candidates if key in features), '')


def _is_integer_scalar(feature):
  return (isinstance(feature, (tfds.features.Scalar, tfds.features.Tensor)) and
          not feature.shape and np.dtype(feature.np_dtype).kind in 'iu')


def base_split(split):
  """The split a split expression slices ('train' of 'train[:10%]'), or None for a union
  ('train+validation')."""
  if '+' in split:
    return None
  return re.sub(r'\[.*\]$', '', split.strip())


def _id_range(builder, info, split):
  """Ids of `split` lie in [0, this): the whole base split's size for the records' own ids
  (a slice keeps the ids of the full split), the slice's size for ids derived from record ids."""
  if info.id_key:
    # An evaluation split may join splits: each part's ids count from 0.
    return max(builder.info.splits[base_split(part)].num_examples for part in split.split('+'))
  return builder.info.splits[split].num_examples


def _numeric_ids_are_dense(builder, split, image_key):
  """True when the split's `id` feature holds each of 0..N-1 exactly once (a full scan)."""
  num_examples = builder.info.splits[split].num_examples
  if num_examples > MAX_ID_SCAN:
    return False
  dataset = builder.as_dataset(split=split, shuffle_files=False,
                               decoders={image_key: tfds.decode.SkipDecoding()},
                               read_config=tfds.ReadConfig(try_autocache=False))
  ids = np.concatenate([batch for batch in tfds.as_numpy(
      dataset.map(lambda ex: ex[NUMERIC_ID_KEY]).batch(8192))] or [np.zeros([0], np.int64)])
  return np.array_equal(np.sort(ids), np.arange(num_examples))


def describe(builder, train_split, eval_split, num_classes=0, label_offset=0):
  """DatasetInfo of `builder`; num_classes > 0 overrides the dataset's own count; the records'
  labels minus `label_offset` are the classes."""
  name = builder.info.name
  if builder.builder_config is not None:
    name = f'{name}/{builder.builder_config.name}'
  splits = builder.info.splits
  for flag, split in (('train_split', train_split), ('eval_split', eval_split)):
    try:
      splits[split]
    except (KeyError, ValueError):
      # The default --eval_split is ImageNet's 'validation'; most other datasets name it 'test'.
      others = [name for name in sorted(splits) if name != train_split.split('[')[0]]
      hint = (f': evaluate on --eval_split={others[0]}'
              if flag == 'eval_split' and len(others) == 1 else '')
      raise ValueError(f'--{flag}={split!r} is not a split of dataset {name!r}; '
                       f'it has {sorted(splits)}{hint}') from None
  features = builder.info.features
  image_key = _first_key(features, IMAGE_KEYS)
  if not image_key:
    raise ValueError(f'Dataset {name!r} has no image feature; expected one of {IMAGE_KEYS}, '
                     f'found {sorted(features)}')
  label_key = _first_key(features, LABEL_KEYS)
  if num_classes <= 0:
    if not label_key or not hasattr(features[label_key], 'num_classes'):
      raise ValueError(f'Dataset {name!r} has no class-label feature (one of {LABEL_KEYS}) to '
                       'count classes from; set --num_classes')
    num_classes = features[label_key].num_classes
  id_key = ''
  train_base = base_split(train_split)
  if train_base is None:
    # Two splits' own ids would collide (each counts from 0); record ids are unique.
    logging.info("Dataset %r: --train_split=%r joins splits; ids are derived from TFDS's "
                 'record ids.', name, train_split)
  elif TRUSTED_ID_KEY in features:
    id_key = TRUSTED_ID_KEY
  elif NUMERIC_ID_KEY in features and _is_integer_scalar(features[NUMERIC_ID_KEY]):
    if _numeric_ids_are_dense(builder, train_base, image_key):
      id_key = NUMERIC_ID_KEY
    else:
      logging.info('Dataset %r: its %r feature is not provably dense on %r; ids are derived '
                   "from TFDS's record ids.", name, NUMERIC_ID_KEY, train_base)
  num_ids = (splits[train_base].num_examples if id_key else
             splits[train_split].num_examples)
  if num_ids != splits[train_split].num_examples:
    logging.info('Dataset %r: --train_split=%r holds %d of the %d images of %r; the per-image '
                 'tables are indexed by the ids of all %d.', name, train_split,
                 splits[train_split].num_examples, num_ids, train_base, num_ids)
  shape = getattr(features[image_key], 'shape', None)
  return DatasetInfo(
      name=name,
      grey=bool(shape) and shape[-1] == 1,
      num_train_examples=splits[train_split].num_examples,
      num_eval_examples=splits[eval_split].num_examples,
      num_classes=num_classes,
      image_key=image_key,
      label_key=label_key,
      id_key=id_key,
      num_ids=num_ids,
      label_offset=label_offset)


def _record_offsets(builder, split, name):
  """(tfds_id prefixes, offsets): a record's dense id is offset[prefix] + its index in the shard.

  Offsets come from the shard lengths of `split` as a whole, so every sub-split of it (the
  per-pipeline `even_splits`) derives the ids of the full split.
  """
  instructions = builder.info.splits[split].file_instructions
  dirnames = {os.path.dirname(os.fspath(i.filename)) for i in instructions}
  if len(dirnames) != 1:
    raise ValueError(f'Dataset {name!r} split {split!r} spans several directories {dirnames}; '
                     "ids cannot be derived from TFDS's record ids: add an 'image/ID' feature")
  prefixes, skips, takes, offsets, start = [], [], [], [], 0
  for instruction in instructions:
    # A record's tfds_id index counts from the start of its shard file, not of the slice.
    prefixes.append(os.path.basename(os.fspath(instruction.filename)))
    skips.append(instruction.skip)
    takes.append(instruction.take)
    offsets.append(start - instruction.skip)
    start += instruction.take
  assert start == builder.info.splits[split].num_examples, (split, start)
  return prefixes, skips, takes, offsets


def _record_id_fn(builder, split, name):
  """tfds_id -> the record's dense id in `split` (-2**62 for a record outside it).

  A shard read once: a hash table of its offset. A union of slices of one shard
  (`train[:25%]+train[75%:]`): the slice the record's index in the shard falls in.
  """
  prefixes, skips, takes, offsets = _record_offsets(builder, split, name)
  if len(set(prefixes)) == len(prefixes):
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(prefixes), tf.constant(offsets, tf.int64)),
        default_value=-2**62)
    return lambda prefix, index: table.lookup(prefix) + index
  prefixes, offsets = tf.constant(prefixes), tf.constant(offsets, tf.int64)
  ends = tf.constant(np.add(skips, takes), tf.int64)
  skips = tf.constant(skips, tf.int64)

  def record_id(prefix, index):
    inside = tf.equal(prefixes, prefix) & (skips <= index) & (index < ends)
    return tf.where(tf.reduce_any(inside),
                    tf.gather(offsets, tf.argmax(tf.cast(inside, tf.int32))) + index,
                    tf.constant(-2**62, tf.int64))

  return record_id


def _decode_image(encoded):
  """Encoded JPEG/PNG/GIF/BMP bytes -> [H, W, 3] uint8 (grayscale and RGBA made RGB)."""
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def _undecodable(dataset_name, split):
  return f'Dataset {dataset_name} split {split}: undecodable image in record'


def _decode_naming_failures(dataset, dataset_name, split, deterministic):
  """Decodes `image` of each record dict; an undecodable image stops the pipeline with an
  error naming the record (its tfds_id) and its id.

  A failed decode cannot be caught inside a map function, so records are decoded in small
  nested datasets whose `ignore_errors` drops the failure; the gap in positions names it.
  """

  def decode_chunk(chunk):
    size = tf.shape(chunk['record'])[0]
    decoded = tf.data.Dataset.from_tensor_slices((tf.range(size), chunk)).map(
        lambda i, ex: (i, {**ex, 'image': _decode_image(ex['image'])})).ignore_errors()
    end = {k: tf.zeros_like(v[0]) for k, v in chunk.items()}
    end['image'] = tf.zeros([1, 1, 3], tf.uint8)
    decoded = decoded.concatenate(tf.data.Dataset.from_tensors((size, end)))

    def check(expected, element):
      position, example = element
      missing = tf.minimum(expected, size - 1)
      check_op = tf.debugging.Assert(
          tf.equal(position, expected),
          [_undecodable(dataset_name, split),
           chunk['record'][missing], 'id', chunk['id'][missing]])
      with tf.control_dependencies([check_op]):
        return expected + 1, (tf.identity(position), example)

    return decoded.scan(tf.constant(0), check).filter(
        lambda position, _: position < size).map(lambda _, example: example)

  # Whole chunks in turn (block_length): deterministic, the records keep their input order.
  return dataset.batch(DECODE_CHUNK).interleave(
      decode_chunk, cycle_length=tf.data.AUTOTUNE, block_length=DECODE_CHUNK,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)


def _select_fn(builder, info, split, num_classes, check_labels=True):
  """Returns the map function from a TFDS record to its checked `{image, label, id, record}`.

  The image stays encoded; the id and (when `check_labels`: something trains or scores on
  them) the label are checked against the split's size and `num_classes`, a bad one stopping
  the pipeline with an error naming the record. An unchecked label outside [0, num_classes),
  such as STL-10's -1 of its unlabelled split, one-hots to zeros.
  """
  split_size = _id_range(builder, info, split)
  low = info.label_offset
  fix = ('set --num_classes, or --label_offset=1 for labels counted from 1' if not low else
         'set --num_classes or --label_offset')
  # No quotes: TF escapes them in assertion messages.
  where = f'Dataset {info.name} split {split}:'
  if not info.id_key:
    record_id = _record_id_fn(builder, split, info.name)

  def select(example):
    """The fields the pipeline needs, ids and labels checked; the image still encoded."""
    record = example['tfds_id']
    if info.id_key:
      ids = tf.cast(example[info.id_key], tf.int64)
    else:
      prefix = tf.strings.regex_replace(record, r'__[0-9]+$', '')
      index = tf.strings.to_number(tf.strings.regex_replace(record, r'^.*__', ''), tf.int64)
      ids = record_id(prefix, index)
    checks = [tf.debugging.Assert(
        tf.logical_and(ids >= 0, ids < split_size),
        [f'{where} id outside [0, {split_size}) in record', record, 'id', ids])]
    if info.label_key:
      labels = tf.cast(example[info.label_key], tf.int64) - info.label_offset
    if info.label_key and check_labels:
      checks.append(tf.debugging.Assert(
          tf.logical_and(labels >= 0, labels < num_classes),
          [f'{where} label outside [{low}, {low + num_classes}) ({fix}) in record', record,
           'label', labels + info.label_offset]))
    elif not info.label_key:
      labels = tf.constant(-1, tf.int64)
    with tf.control_dependencies(checks):
      return {'image': example[info.image_key], 'label': tf.identity(labels),
              'id': tf.cast(ids, tf.int32), 'record': record}

  return select


class _RecordStages:
  """The per-record stages of one InputConfig's pipeline: read and check, decode, make views."""

  def __init__(self, builder, info, config, num_classes):
    if not info.label_key and config.labels_required:
      raise ValueError(f'Dataset {info.name!r} split {config.split!r} has no labels (one of '
                       f'{LABEL_KEYS}) and this run needs them (the supervised head)')
    self.builder = builder
    self.info = info
    self.config = config
    self.num_classes = num_classes
    self.encoded = isinstance(builder.info.features[info.image_key], tfds.features.Image)
    self.select = _select_fn(builder, info, config.split, num_classes,
                             check_labels=config.labels_required)

  def stored(self, split):
    """Returns the records of (sub-)split `split` as stored, in file order, images encoded."""
    return self.builder.as_dataset(
        split=split, shuffle_files=False,
        decoders={self.info.image_key: tfds.decode.SkipDecoding()} if self.encoded else None,
        read_config=tfds.ReadConfig(try_autocache=False, add_tfds_id=True,
                                    num_parallel_calls_for_decode=tf.data.AUTOTUNE))

  def read(self, split, deterministic):
    """Returns the checked records of (sub-)split `split`, images still encoded, cached if asked."""
    # Images are decoded after the cache, so a cached dataset holds the compact encoded bytes.
    dataset = self.stored(split).map(self.select, num_parallel_calls=tf.data.AUTOTUNE,
                                     deterministic=deterministic)
    return dataset.cache() if self.config.cache_dataset else dataset

  def read_epoch(self, split, seed):
    """Returns the checked records of (sub-)split `split` for one epoch: its shard files in an
    order drawn from `seed` ([2] int64), READ_CYCLE at a time, interleaved record by record.

    Every epoch starts in other shards and mixes other ones, so over the epochs an image meets
    the whole split, not only its neighbours in the files (a shuffle buffer mixes only what it
    holds). The order is a function of `seed` (never of timing), so a resumed run skips exactly
    the records it consumed. Images stay encoded.
    """
    instructions = self.builder.info.splits[split].file_instructions
    if self.builder.info.file_format != tfds.core.FileFormat.TFRECORD:
      return self.read(split, True)
    filenames = [os.fspath(i.filename) for i in instructions]
    columns = (filenames, [os.path.basename(f) for f in filenames],
               [i.skip for i in instructions], [i.take for i in instructions])
    order = tf.argsort(tf.random.stateless_uniform([len(filenames)], seed=seed))
    shards = tf.data.Dataset.from_tensor_slices(
        tuple(tf.gather(tf.constant(c, dtype), order)
              for c, dtype in zip(columns, (tf.string, tf.string, tf.int64, tf.int64),
                                  strict=True)))

    def shard_records(filename, prefix, skip, take):
      # tfds_id as TFDS makes it: the shard's basename and the index in the shard file.
      indices = tf.data.Dataset.counter(skip).map(
          lambda i: tf.strings.join([prefix, tf.strings.as_string(i)], separator='__'))
      return tf.data.Dataset.zip(indices, tf.data.TFRecordDataset(filename).skip(skip).take(take))

    features = self.builder.info.features
    decoders = {self.info.image_key: tfds.decode.SkipDecoding()} if self.encoded else None
    dataset = shards.interleave(shard_records, cycle_length=min(READ_CYCLE, len(filenames)),
                                block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                                deterministic=True)
    dataset = dataset.map(
        lambda record, serialized: {**features.deserialize_example(serialized, decoders=decoders),
                                    'tfds_id': record},
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.map(self.select, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def decode(self, dataset, deterministic):
    """Returns `dataset` with its images decoded (an undecodable one stops it, named)."""
    if self.encoded:
      return _decode_naming_failures(dataset, self.info.name, self.config.split, deterministic)
    return dataset

  def to_views(self, example, seed):
    """Returns the batch element (`batch`) of a decoded record; `seed` augments it in training.

    With the pixel augmentations on the device it holds the pixel params of each view.
    """
    config = self.config
    # The training views convert only their crops to float (the same values, fewer pixels).
    image = example['image']
    if image.shape[-1] == 1:
      image = tf.image.grayscale_to_rgb(image)
    pixel_augment = config.pixel_augment()
    if config.is_training and pixel_augment is not None:
      seeds = tf.random.experimental.stateless_split(seed, config.num_views)
      views = tuple(
          data_util.resized_crop(image, seeds[v], config.image_size, config.image_size,
                                 crop_area_min=config.crop_area_min)
          for v in range(config.num_views))
      params = tuple(data_util.pixel_params(seeds[v], pixel_augment)
                     for v in range(config.num_views))
      return batch(views, tf.one_hot(example['label'], self.num_classes), example['id'],
                   pixel_params=params)
    if config.is_training:
      seeds = tf.random.experimental.stateless_split(seed, config.num_views)
      views = tuple(
          data_util.preprocess_for_train(
              image, seeds[v], config.image_size, config.image_size,
              color_distort=config.color_distort, grey=config.grey,
              color_jitter_strength=config.color_jitter_strength,
              crop_area_min=config.crop_area_min, flip=config.random_flip,
              blur=config.use_blur)
          for v in range(config.num_views))
    else:
      views = (data_util.preprocess_for_eval(
          image, config.image_size, config.image_size,
          crop=config.image_size > SMALL_IMAGE_SIZE),)
    # A missing label (-1) one-hots to zeros.
    return batch(views, tf.one_hot(example['label'], self.num_classes), example['id'])


def epoch_batches(pipeline_size, per_replica_batch_size, replicas_per_pipeline):
  """Returns the per-replica batches one pipeline yields per epoch: whole steps only.

  A step takes one batch from each of the pipeline's replicas and never mixes two epochs, so an
  id never appears twice in one global batch; the count is a multiple of replicas_per_pipeline.
  """
  return (pipeline_size // per_replica_batch_size //
          replicas_per_pipeline * replicas_per_pipeline)


def resume_position(initial_step, batches_per_epoch, replicas_per_pipeline):
  """Returns `(start_epoch, skipped_batches)` of a pipeline resumed at global step `initial_step`.

  Contract: a step never spans two epochs; each step takes one per-replica batch from each of
  the pipeline's `replicas_per_pipeline` replicas, so an epoch of `batches_per_epoch` batches (a
  multiple of replicas_per_pipeline, see `epoch_batches`) is batches_per_epoch //
  replicas_per_pipeline steps. `start_epoch` is the (0-based) epoch step `initial_step` falls
  in; `skipped_batches` the batches of that epoch already consumed, across this pipeline's
  replicas, before it (0 at an epoch boundary).
  """
  start_epoch, start_offset = divmod(initial_step, batches_per_epoch // replicas_per_pipeline)
  return start_epoch, start_offset * replicas_per_pipeline


@dataclasses.dataclass(frozen=True)
class _EpochPlan:
  """How one training pipeline walks its epochs."""
  split: str                   # this pipeline's (sub-)split
  pipeline_size: int           # records of this pipeline's sub-split
  per_replica_batch_size: int
  batches_per_epoch: int       # per-replica batches per epoch, whole steps only
  start_epoch: int             # the epoch the run (re)starts in
  skipped_batches: int         # batches of start_epoch already consumed before a resume
  visits: '_EpochVisits | None' = None  # the duplicate-id check, when ids must be distinct


class _EpochVisits:
  """The epoch each id was last read in, for one pipeline: an id read twice in one epoch means
  two records share it (SogCLR would silently give two images one slot of `u`).

  A hash table on the host, filled as records pass (before decoding, no second pass over the
  images); it holds the ids this pipeline has read, at most the split. Records skipped when a
  run resumes mid-epoch are not in it: a duplicate among them shows in the next epoch.
  """

  def __init__(self, where):
    self.where = where
    self.table = tf.lookup.experimental.MutableHashTable(tf.int64, tf.int64, default_value=-1)

  def _check(self, examples, epoch):
    """Checks (and records) the ids of `examples`, a chunk of records: [k] tensors."""
    ids = tf.cast(examples['id'], tf.int64)
    unique, index = tf.unique(ids)
    positions = tf.range(tf.size(ids))
    first = tf.gather(tf.math.unsorted_segment_min(positions, index, tf.size(unique)), index)
    # Read in an earlier chunk of this epoch, or earlier in this chunk.
    twice = tf.logical_or(tf.equal(self.table.lookup(ids), epoch), first < positions)
    bad = tf.argmax(tf.cast(twice, tf.int32))
    seen = tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(twice)),
        [f'{self.where} id read twice in one epoch (two records share it; every image needs '
         'its own id) in record', examples['record'][bad], 'id', ids[bad]])
    with tf.control_dependencies([seen]):
      insert = self.table.insert(ids, tf.fill(tf.shape(ids), epoch))
    with tf.control_dependencies([insert]):
      return {**examples, 'id': tf.identity(examples['id'])}

  def checked(self, dataset, epoch, batched):
    """`dataset` of records with their ids checked in turn (a lookup, then an insert: the map
    is sequential). Encoded records are checked in chunks of DECODE_CHUNK, which costs almost
    nothing; decoded images, whose shapes may differ, one by one (about 3x the cost of reading
    a record)."""
    if not batched:
      return dataset.map(lambda ex: tf.nest.map_structure(
          lambda t: t[0], self._check(tf.nest.map_structure(lambda t: t[tf.newaxis], ex), epoch)))
    return dataset.batch(DECODE_CHUNK).map(lambda ex: self._check(ex, epoch)).unbatch()


def _epoch_dataset(stages, records, plan, base_seed, epoch):
  """Returns the batches of epoch `epoch` (a scalar tensor) from the undecoded `records`, or
  (None) from the split's shards in this epoch's order."""
  config = stages.config
  # Shuffle order and augmentations are functions of (seed, epoch, position): a run can be
  # repeated exactly, and resumed mid-epoch by skipping records before any decoding.
  epoch_seed = tf.random.experimental.stateless_fold_in(base_seed, epoch)
  shuffle_seed = tf.random.stateless_uniform([], epoch_seed, maxval=2**62, dtype=tf.int64)
  if records is None:  # not cached: this epoch's shard order
    records = stages.read_epoch(
        plan.split, tf.random.experimental.stateless_split(epoch_seed, 1)[0])
  # A shuffle's seed pair is (graph seed, op seed). Fixing this traced function's graph seed
  # makes the order a function of config.seed alone, whatever global seed the caller set
  # (and a global seed of 0 would make tf.data reject a tensor op seed).
  tf.random.set_seed(config.seed + 1)
  skip = tf.where(epoch == plan.start_epoch, tf.constant(plan.skipped_batches, tf.int64), 0)
  d = records.shuffle(min(plan.pipeline_size, config.shuffle_buffer), seed=shuffle_seed,
                      reshuffle_each_iteration=False)
  d = d.enumerate().skip(skip * plan.per_replica_batch_size).map(
      lambda position, ex: {**ex, 'position': position})
  if plan.visits is not None:
    d = plan.visits.checked(d, epoch, batched=stages.encoded)
  d = stages.decode(d, config.deterministic)
  d = d.map(
      lambda ex: stages.to_views(
          ex, tf.random.experimental.stateless_fold_in(epoch_seed, ex['position'])),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=config.deterministic)
  d = d.batch(plan.per_replica_batch_size, drop_remainder=True)
  return d.take(plan.batches_per_epoch - skip)


def _train_dataset(stages, split, input_context, per_replica_batch_size, replicas_per_pipeline):
  """Returns the endless, shuffled, augmented batches of this pipeline's (sub-)split `split`."""
  config = stages.config
  # Reading is deterministic: the per-epoch shuffle must see the same order every time. A cached
  # split is read once, in file order; otherwise each epoch reads the shards in its own order.
  records = stages.read(split, True) if config.cache_dataset else None
  pipeline_size = int(stages.builder.info.splits[split].num_examples)
  batches_per_epoch = epoch_batches(pipeline_size, per_replica_batch_size, replicas_per_pipeline)
  if batches_per_epoch == 0:
    raise ValueError(
        f'Split {config.split!r} of {stages.info.name!r} has {pipeline_size} images per input '
        f'pipeline, fewer than one step of --train_batch_size={config.global_batch_size}')
  base_seed = tf.constant([config.seed, input_context.input_pipeline_id], tf.int64)
  start_epoch, skipped_batches = resume_position(config.initial_step, batches_per_epoch,
                                                 replicas_per_pipeline)
  visits = None
  if config.unique_ids:
    visits = _EpochVisits(f'Dataset {stages.info.name} split {config.split}:')
  plan = _EpochPlan(split=split, pipeline_size=pipeline_size,
                    per_replica_batch_size=per_replica_batch_size,
                    batches_per_epoch=batches_per_epoch, start_epoch=start_epoch,
                    skipped_batches=skipped_batches, visits=visits)
  return tf.data.Dataset.range(start_epoch, 2**62).flat_map(
      lambda epoch: _epoch_dataset(stages, records, plan, base_seed, epoch))


def _eval_dataset(stages, split, per_replica_batch_size):
  """Returns the batches of (sub-)split `split` in record order, one unaugmented view each."""
  dataset = stages.decode(stages.read(split, True), True)
  dataset = dataset.map(lambda ex: stages.to_views(ex, None), tf.data.AUTOTUNE)
  return dataset.batch(per_replica_batch_size)


# Built with AutoGraph off, so every function the pipeline maps is traced as written: they branch
# on settings alone, and converting them cost seconds of each process' start.
@tf.autograph.experimental.do_not_convert
def _pipeline_dataset(stages, input_context):
  """Returns the dataset of per-replica batches of the input pipeline `input_context` names."""
  config = stages.config
  per_replica_batch_size = input_context.get_per_replica_batch_size(config.global_batch_size)
  replicas_per_pipeline = (input_context.num_replicas_in_sync //
                           input_context.num_input_pipelines)
  split = config.split
  if input_context.num_input_pipelines > 1:
    split = tfds.even_splits(split, n=input_context.num_input_pipelines)[
        input_context.input_pipeline_id]
  options = tf.data.Options()
  options.deterministic = config.deterministic or not config.is_training
  if config.is_training:
    dataset = _train_dataset(stages, split, input_context, per_replica_batch_size,
                             replicas_per_pipeline)
  else:
    dataset = _eval_dataset(stages, split, per_replica_batch_size)
  return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)


def build_input_fn(builder, info, config, num_classes):
  """Returns `input_fn(input_context) -> tf.data.Dataset` of per-replica batches.

  Raises ValueError at once when the dataset has no labels and `config` needs them.
  """
  stages = _RecordStages(builder, info, config, num_classes)

  def input_fn(input_context):
    return _pipeline_dataset(stages, input_context)

  return input_fn


def first_elements(builder, info, config, num_classes, count):
  """The batch element (`batch`) of the first `count` records of config.split in file order,
  each made into views as the pipeline makes the record at that position of epoch 0 (its
  augmentations and their seeds), computed eagerly: a handful of images, no pipeline to trace."""
  stages = _RecordStages(builder, info, config, num_classes)
  # int64 positions and epoch, as the pipeline's (a fold-in draws in the dtype of its data).
  epoch_seed = tf.random.experimental.stateless_fold_in(
      tf.constant([config.seed, 0], tf.int64), tf.constant(0, tf.int64))
  # The checks of `select` fail as in the pipeline (errors.one_line_error reads them).
  select = tf.function(stages.select, autograph=False)
  elements = []
  for position, stored in enumerate(stages.stored(config.split).take(count)):
    record = select(stored)
    if stages.encoded:
      try:
        record['image'] = _decode_image(record['image'])
      except tf.errors.InvalidArgumentError:  # the pipeline's line for it
        raise ValueError(f'{_undecodable(info.name, config.split)} '
                         f'{record["record"].numpy().decode()}: id {int(record["id"])}') from None
    elements.append(stages.to_views(record, tf.random.experimental.stateless_fold_in(
        epoch_seed, tf.constant(position, tf.int64))))
  return tf.nest.map_structure(lambda *parts: tf.stack(parts), *elements)


def build_distributed_dataset(strategy, builder, info, config, num_classes):
  """A distributed dataset of per-replica batches (`batch`)."""
  input_fn = build_input_fn(builder, info, config, num_classes)
  return strategy.distribute_datasets_from_function(input_fn)


def release_in_background(references):
  """Empties the list `references` (the last references to tf.data iterators) on a thread of its
  own, named 'release-input', and returns the thread.

  Deleting an iterator waits for tf.data's autotuning thread to end its current wait, which can
  run on after the deletion asked it to stop (measured: 50 s at the end of a Fashion-MNIST run,
  up to 16 s on one of two localhost workers, where the collective export then waits too).
  The run goes on meanwhile; the thread is not a daemon, so the interpreter lets it finish
  before it exits.
  """
  thread = threading.Thread(target=references.clear, name='release-input')
  thread.start()
  return thread


def input_release_pending():
  """True while a 'release-input' thread (release_in_background) is still deleting an
  iterator."""
  return any(thread.name == 'release-input' and thread.is_alive()
             for thread in threading.enumerate())


def batches(dataset, watching=None, what='batch'):
  """The elements of `dataset` (a tf.data or distributed dataset), as a for loop over it gives
  them; when the loop ends (exhausted, broken off or by an error) its iterator goes to
  release_in_background, so the loop's end does not wait for tf.data's autotuning.

  watching: None, or watching(description) -> a context manager (trainer.CallWatchdog.watching)
  around each element's reading and the loop's work on it, described as f'{what} {n}'.
  """
  references = [iter(dataset)]
  end = object()
  try:
    for number in itertools.count(1):
      with watching(f'{what} {number}') if watching else contextlib.nullcontext():
        element = next(references[0], end)
        if element is end:
          return
        yield element
  finally:
    release_in_background(references)


def steps_per_epoch(num_examples, global_batch_size):
  """Training steps in one pass over the data (a step never spans two epochs)."""
  return num_examples // global_batch_size
