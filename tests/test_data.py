"""data.py on small TFDS datasets the tests write: id derivation, host-side checks, pipelines."""
import contextlib
import dataclasses
import threading
import weakref

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import data
import data_util
import errors
import imagenet

NUM_TRAIN = 37  # not a multiple of the shard count or the batch size


def _png(value):
  """A 4x4 PNG whose pixels all hold `value`: the image names its record."""
  return tf.io.encode_png(np.full([4, 4, 3], value, np.uint8)).numpy()


def write_dataset(data_dir, name, features, train, test=None, num_shards=4):
  """Writes `{split: [example dict]}` with TFDS's own writer into `data_dir`; returns a builder."""
  splits = {'train': train, 'test': test if test is not None else train[:5]}
  imagenet.write_dataset(name, tfds.features.FeaturesDict(features), splits, data_dir,
                         num_shards=num_shards)
  return data.get_builder(name, data_dir)


def plain_features(**extra):
  return {'image': tfds.features.Image(shape=(4, 4, 3), encoding_format='png'),
          'label': tfds.features.ClassLabel(num_classes=3), **extra}


def plain_examples(n, **extra):
  return [{'image': _png(i), 'label': i % 3, **{k: f(i) for k, f in extra.items()}}
          for i in range(n)]


def read_eval(builder, info, split='train', pipelines=1):
  """{id: pixel value} over every record of `split`, read by `pipelines` input pipelines."""
  seen = []
  for pipeline in range(pipelines):
    config = data.InputConfig(split=split, global_batch_size=5 * pipelines, image_size=4,
                              is_training=False, num_views=1)
    context = tf.distribute.InputContext(num_input_pipelines=pipelines,
                                         input_pipeline_id=pipeline,
                                         num_replicas_in_sync=pipelines)
    for batch in data.build_input_fn(builder, info, config, 3)(context):
      views, labels, ids = batch['views'], batch['labels'], batch['ids']
      pixels = np.round(views[0].numpy()[:, 0, 0, 0] * 255).astype(int)
      seen += list(zip(ids.numpy().tolist(), pixels.tolist(), np.argmax(labels, 1).tolist(),
                    strict=True))
  return seen


def noise_dataset(data_dir, num_shards=1):
  """12 records of 40x48 noise PNGs (a fixed RandomState), 3 classes, in `num_shards` shards."""
  rng = np.random.RandomState(7)
  examples = [{'image': tf.io.encode_png(rng.randint(0, 256, [40, 48, 3]).astype(np.uint8))
               .numpy(), 'label': i % 3} for i in range(12)]
  features = {'image': tfds.features.Image(shape=(40, 48, 3), encoding_format='png'),
              'label': tfds.features.ClassLabel(num_classes=3)}
  return write_dataset(data_dir, f'noise{num_shards}', features, examples,
                       num_shards=num_shards)


def training_batches(builder, num_batches=2, **overrides):
  """The first batches of the deterministic training pipeline at 32 px (blur on), as numpy."""
  info = data.describe(builder, 'train', 'test')
  config = data.InputConfig(**{
      'split': 'train', 'global_batch_size': 4, 'image_size': 32, 'is_training': True,
      'use_blur': True, 'deterministic': True, **overrides})
  dataset = data.build_input_fn(builder, info, config, 3)(tf.distribute.InputContext())
  return [tf.nest.map_structure(lambda t: t.numpy(), batch)
          for batch in dataset.take(num_batches)]


@pytest.fixture(scope='module')
def plain(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  return write_dataset(data_dir, 'plain_images', plain_features(), plain_examples(NUM_TRAIN))


def test_ids_derived_from_tfds_ids_cover_a_multi_shard_split_exactly_once(plain):
  assert len(plain.info.splits['train'].shard_lengths) == 4
  info = data.describe(plain, 'train', 'test')
  assert info.id_key == '' and info.num_train_examples == NUM_TRAIN
  whole = read_eval(plain, info)
  assert sorted(i for i, _, _ in whole) == list(range(NUM_TRAIN))
  # Every record once (its pixel value is its original index), with its own label.
  assert sorted(p for _, p, _ in whole) == list(range(NUM_TRAIN))
  assert all(label == p % 3 for _, p, label in whole)
  # Two input pipelines read halves of the split, yet derive the ids of the full split.
  halves = read_eval(plain, info, pipelines=2)
  assert sorted(halves) == sorted(whole)


@pytest.mark.slow
def test_training_epoch_yields_each_id_once_with_two_distinct_views(plain):
  info = data.describe(plain, 'train', 'test')
  config = data.InputConfig(split='train', global_batch_size=6, image_size=4, is_training=True,
                            use_blur=False, deterministic=True)
  dataset = data.build_input_fn(plain, info, config, 3)(tf.distribute.InputContext())
  ids = []
  for batch in dataset.take(NUM_TRAIN // 6):
    views, labels, batch_ids = batch['views'], batch['labels'], batch['ids']
    assert len(views) == 2 and views[0].shape == (6, 4, 4, 3) and labels.shape == (6, 3)
    assert 0.0 <= float(tf.reduce_min(views[0])) and float(tf.reduce_max(views[1])) <= 1.0
    ids += batch_ids.numpy().tolist()
  assert len(ids) == len(set(ids)) == 36 and set(ids) <= set(range(NUM_TRAIN))
  # A pipeline resumed at step 2 yields exactly what the first pipeline yielded from step 2.
  resumed = data.build_input_fn(plain, info, data.InputConfig(
      split='train', global_batch_size=6, image_size=4, is_training=True, use_blur=False,
      deterministic=True, initial_step=2), 3)(tf.distribute.InputContext())
  for a, b in zip(dataset.skip(2).take(5), resumed.take(5), strict=True):
    np.testing.assert_array_equal(a['ids'], b['ids'])
    np.testing.assert_allclose(a['views'][0], b['views'][0])


def test_epoch_batches_count_whole_steps_of_the_pipelines_replicas():
  # Digits: 1,437 training images.
  assert data.epoch_batches(1437, 16, 1) == 89
  assert data.epoch_batches(1437, 8, 2) == 178  # 179 batches; the odd one would split a step
  assert data.epoch_batches(1437, 4, 4) == 356  # 359 batches -> 89 steps of 4
  assert data.epoch_batches(NUM_TRAIN, 6, 1) == 6
  assert data.epoch_batches(10, 16, 1) == 0


@pytest.mark.parametrize('initial_step, batches_per_epoch, replicas, expected', [
    (0, 89, 1, (0, 0)),       # a fresh run
    (5, 89, 1, (0, 5)),       # mid first epoch
    (95, 89, 1, (1, 6)),      # mid second epoch
    (88, 89, 1, (0, 88)),     # the last step of the first epoch
    (89, 89, 1, (1, 0)),      # exactly at an epoch boundary: nothing of epoch 1 is consumed
    (178, 89, 1, (2, 0)),
    (0, 178, 2, (0, 0)),      # two replicas per pipeline: 89 steps of 2 batches per epoch
    (95, 178, 2, (1, 12)),    # 6 steps into epoch 1, 2 batches each
    (89, 178, 2, (1, 0)),
    (88, 178, 2, (0, 176)),
    (95, 356, 4, (1, 24)),    # four replicas per pipeline
    (300, 356, 4, (3, 132)),  # 300 = 3 * 89 + 33
])
def test_resume_position_counts_whole_steps_within_one_epoch(
    initial_step, batches_per_epoch, replicas, expected):
  assert data.resume_position(initial_step, batches_per_epoch, replicas) == expected


@pytest.mark.slow  # 5-9 s each
@pytest.mark.parametrize('replicas, initial_step', [(1, 6), (2, 4), (2, 6)])
def test_resumed_pipeline_continues_the_uninterrupted_one(plain, replicas, initial_step):
  # 37 records, per-replica batches of 3: 12 batches, i.e. 12 // replicas steps, per epoch.
  info = data.describe(plain, 'train', 'test')
  context = tf.distribute.InputContext(num_replicas_in_sync=replicas)

  def batches(step):
    config = data.InputConfig(split='train', global_batch_size=3 * replicas, image_size=4,
                              is_training=True, use_blur=False, deterministic=True,
                              initial_step=step)
    return data.build_input_fn(plain, info, config, 3)(context)

  skipped = initial_step * replicas
  for a, b in zip(batches(0).skip(skipped).take(8), batches(initial_step).take(8),
                  strict=True):
    np.testing.assert_array_equal(a['ids'], b['ids'])
    np.testing.assert_array_equal(a['views'][1], b['views'][1])


@pytest.mark.slow
def test_training_order_depends_on_the_config_seed_not_the_global_seed(plain):
  info = data.describe(plain, 'train', 'test')

  def first_ids(seed):
    config = data.InputConfig(split='train', global_batch_size=6, image_size=4,
                              is_training=True, use_blur=False, deterministic=True, seed=seed)
    dataset = data.build_input_fn(plain, info, config, 3)(tf.distribute.InputContext())
    return [batch['ids'].numpy().tolist() for batch in dataset.take(3)]

  try:
    # A global seed of 0 once made tf.data reject the pipeline's tensor shuffle seeds.
    tf.random.set_seed(0)
    under_zero = first_ids(seed=0)
    tf.random.set_seed(12345)
    assert first_ids(seed=0) == under_zero
    assert first_ids(seed=1) != under_zero
  finally:
    tf.random.set_seed(None)


@pytest.mark.parametrize('random_flip', [True, False])
def test_random_flip_flag_mirrors_about_half_the_views_or_none(tmp_path, random_flip):
  # Images bright on the left half only: a mirrored view is bright on the right.
  left = np.zeros([4, 4, 3], np.uint8)
  left[:, :2] = 200
  examples = [{'image': tf.io.encode_png(left).numpy(), 'label': i % 3} for i in range(32)]
  builder = write_dataset(str(tmp_path), 'left_bright', plain_features(), examples)
  info = data.describe(builder, 'train', 'test')
  config = data.InputConfig(split='train', global_batch_size=32, image_size=4, is_training=True,
                            color_distort=False, crop_area_min=1.0, random_flip=random_flip,
                            use_blur=False)
  views = next(iter(data.build_input_fn(builder, info, config, 3)(
      tf.distribute.InputContext())))['views']
  columns = np.concatenate([v.numpy() for v in views]).mean(axis=(1, 3))  # [64, 4]
  mirrored = columns[:, 3] > columns[:, 0]
  if random_flip:
    assert 16 <= mirrored.sum() <= 48
  else:
    assert not mirrored.any()


def test_numeric_id_is_used_only_when_provably_dense(tmp_path):
  permutation = np.random.RandomState(0).permutation(NUM_TRAIN)
  dense = write_dataset(str(tmp_path), 'dense_ids', plain_features(id=np.int64),
                        plain_examples(NUM_TRAIN, id=lambda i: int(permutation[i])))
  info = data.describe(dense, 'train', 'test')
  assert info.id_key == 'id'
  assert sorted((i, p) for i, p, _ in read_eval(dense, info)) == sorted(
      (int(permutation[p]), p) for p in range(NUM_TRAIN))
  sparse = write_dataset(str(tmp_path), 'sparse_ids', plain_features(id=np.int64),
                         plain_examples(NUM_TRAIN, id=lambda i: 1000 + 2 * i))
  info = data.describe(sparse, 'train', 'test')
  assert info.id_key == ''
  assert sorted(i for i, _, _ in read_eval(sparse, info)) == list(range(NUM_TRAIN))


def first_error_line(builder, info, split='train', **config):
  config = data.InputConfig(split=split, global_batch_size=8, image_size=4, **config)
  with pytest.raises(tf.errors.InvalidArgumentError) as error:
    for _ in data.build_input_fn(builder, info, config, info.num_classes)(
        tf.distribute.InputContext()):
      pass
  return error.value.message.strip().splitlines()[0]


@pytest.mark.parametrize('bad_id', [NUM_TRAIN, -1])
def test_image_id_outside_the_split_stops_the_pipeline_naming_it(tmp_path, bad_id):
  ids = list(range(NUM_TRAIN))
  ids[5] = bad_id
  builder = write_dataset(str(tmp_path), 'bad_image_ids', plain_features(**{'image/ID': np.int64}),
                          plain_examples(NUM_TRAIN, **{'image/ID': lambda i: ids[i]}))
  info = data.describe(builder, 'train', 'test')
  assert info.id_key == 'image/ID'
  for mode in ({'is_training': False, 'num_views': 1}, {'is_training': True, 'use_blur': False}):
    line = first_error_line(builder, info, **mode)
    assert 'Dataset bad_image_ids split train: id outside [0, 37) in record' in line
    assert f'[id] [{bad_id}]' in line and 'bad_image_ids-train.tfrecord-' in line


def test_label_outside_num_classes_stops_the_pipeline_naming_it(plain):
  info = data.describe(plain, 'train', 'test', num_classes=2)
  line = first_error_line(plain, info, is_training=False, num_views=1)
  assert ('Dataset plain_images split train: label outside [0, 2) (set --num_classes, or '
          '--label_offset=1') in line
  assert '[label] [2]' in line


def test_dataset_without_labels_is_an_error_only_when_labels_are_needed(tmp_path):
  builder = write_dataset(str(tmp_path), 'unlabelled',
                          {'image': tfds.features.Image(shape=(4, 4, 3), encoding_format='png')},
                          [{'image': _png(i)} for i in range(12)])
  with pytest.raises(ValueError, match="Dataset 'unlabelled' has no class-label feature"):
    data.describe(builder, 'train', 'test')
  info = data.describe(builder, 'train', 'test', num_classes=3)
  config = data.InputConfig(split='train', global_batch_size=4, image_size=4, is_training=True,
                            use_blur=False)
  with pytest.raises(ValueError, match="Dataset 'unlabelled' split 'train' has no labels"):
    data.build_input_fn(builder, info, config, 3)
  config = data.InputConfig(split='train', global_batch_size=4, image_size=4, is_training=True,
                            use_blur=False, labels_required=False)
  batch = next(iter(data.build_input_fn(builder, info, config, 3)(
      tf.distribute.InputContext())))
  assert not batch['labels'].numpy().any() and len(set(batch['ids'].numpy())) == 4


def test_undecodable_image_stops_the_run_naming_the_record(tmp_path):
  examples = plain_examples(NUM_TRAIN)
  examples[11]['image'] = b'\xff\xd8 not really a JPEG'
  builder = write_dataset(str(tmp_path), 'broken_image', plain_features(), examples,
                          test=examples[:20])
  info = data.describe(builder, 'train', 'test')
  for split, mode in (('test', {'is_training': False, 'num_views': 1}),
                      ('train', {'is_training': True, 'use_blur': False})):
    line = first_error_line(builder, info, split, **mode)
    assert f'Dataset broken_image split {split}: undecodable image in record' in line
    assert f'broken_image-{split}.tfrecord-' in line and '[id]' in line
  # The first training images, computed eagerly for the summary of the views, say the same.
  config = data.InputConfig(split='train', global_batch_size=8, image_size=4, is_training=True,
                            use_blur=False)
  with pytest.raises(tf.errors.InvalidArgumentError) as in_pipeline:
    for _ in data.build_input_fn(builder, info, config, 3)(tf.distribute.InputContext()):
      pass
  with pytest.raises(ValueError) as eagerly:
    data.first_elements(builder, info, config, 3, NUM_TRAIN)
  assert str(eagerly.value) == errors.one_line_error(in_pipeline.value)


def test_first_elements_are_the_unshuffled_pipeline_s_first_batch_computed_eagerly(tmp_path):
  # One shard and a shuffle buffer of 1: the pipeline's first batch is the split's first records
  # in file order, each augmented with the seeds of its position in epoch 0.
  builder = write_dataset(str(tmp_path), 'one_shard', plain_features(), plain_examples(12),
                          num_shards=1)
  info = data.describe(builder, 'train', 'test')
  config = data.InputConfig(split='train', global_batch_size=4, image_size=4, is_training=True,
                            use_blur=False, shuffle_buffer=1, seed=5)
  expected = next(iter(data.build_input_fn(builder, info, config, 3)(
      tf.distribute.InputContext())))
  first = data.first_elements(builder, info, config, 3, 4)
  assert len(first['views']) == 2 and first['views'][0].shape == (4, 4, 4, 3)
  for view, pipeline_view in zip(first['views'], expected['views'], strict=True):
    np.testing.assert_allclose(view, pipeline_view, atol=1e-6)
  np.testing.assert_array_equal(first['ids'], expected['ids'])
  np.testing.assert_array_equal(first['labels'], expected['labels'])
  assert not np.allclose(first['views'][0], first['views'][1])  # two augmentations


def test_unknown_or_unprepared_dataset_is_an_error(tmp_path, plain):
  with pytest.raises(ValueError, match="'no_such_dataset' is neither a TFDS dataset name"):
    data.get_builder('no_such_dataset', str(tmp_path))
  with pytest.raises(ValueError, match=r"'mnist' is not prepared under --data_dir=.*tfds build"):
    data.get_builder('mnist', str(tmp_path))
  # The one split besides the training one is named (the default 'validation' is ImageNet's).
  with pytest.raises(ValueError, match=(r"^--eval_split='validation' is not a split of dataset "
                                        r"'plain_images'; it has \['test', 'train'\]: evaluate on "
                                        r"--eval_split=test$")):
    data.describe(plain, 'train[:50%]', 'validation')
  with pytest.raises(ValueError, match=r"^--train_split='eval' is not a split of dataset "
                                       r"'plain_images'; it has \['test', 'train'\]$"):
    data.describe(plain, 'eval', 'test')


@pytest.mark.slow
def test_training_batches_are_static_per_replica_halves_of_the_global_batch(two_replicas,
                                                                            data_dir):
  builder = data.get_builder('digits', data_dir)
  info = data.describe(builder, 'train', 'test')
  config = data.InputConfig(split='train', global_batch_size=32, image_size=16,
                            is_training=True, use_blur=False)
  dataset = data.build_distributed_dataset(two_replicas, builder, info, config, 10)
  # Fully defined shapes (TPUs compile the step for them): the remainder of an epoch is dropped.
  per_replica = tf.nest.flatten(dataset.element_spec, expand_composites=True)
  assert len(per_replica) == 2 * 4  # (view 1, view 2, labels, ids) on each replica
  assert set(dataset.element_spec) == {'views', 'labels', 'ids'}
  for spec in per_replica:
    assert spec.shape.is_fully_defined() and spec.shape[0] == 16, spec
  batch = next(iter(dataset))
  views, labels, ids = batch['views'], batch['labels'], batch['ids']
  for tensors in (views[0], views[1], labels, ids):
    assert [t.shape[0] for t in two_replicas.experimental_local_results(tensors)] == [16, 16]
  # The two replicas hold different images: one global batch of 32 distinct ids.
  assert len(set(np.concatenate(
      [t.numpy() for t in two_replicas.experimental_local_results(ids)]))) == 32


def test_labels_are_checked_only_when_something_needs_them(tmp_path):
  # STL-10's unlabelled split marks every label -1: pretraining without a linear head reads it.
  builder = write_dataset(str(tmp_path), 'minus_one_labels',
                          {'image': tfds.features.Image(shape=(4, 4, 3), encoding_format='png'),
                           'label': tfds.features.Scalar(dtype=np.int64)},
                          [{'image': _png(i), 'label': -1} for i in range(12)])
  info = data.describe(builder, 'train', 'test', num_classes=3)
  line = first_error_line(builder, info, is_training=True, use_blur=False)
  assert 'label outside [0, 3) (set --num_classes, or --label_offset=1' in line
  assert '[label] [-1]' in line
  config = data.InputConfig(split='train', global_batch_size=4, image_size=4, is_training=True,
                            use_blur=False, labels_required=False)
  batch = next(iter(data.build_input_fn(builder, info, config, 3)(
      tf.distribute.InputContext())))
  assert batch['labels'].shape == (4, 3) and not batch['labels'].numpy().any()
  assert len(set(batch['ids'].numpy())) == 4


@pytest.mark.slow
def test_an_id_shared_by_two_records_stops_training_naming_it_and_a_record(tmp_path, plain):
  ids = list(range(NUM_TRAIN))
  ids[20] = 7  # records 7 and 20 share id 7; id 20 is missing
  builder = write_dataset(str(tmp_path), 'shared_ids', plain_features(**{'image/ID': np.int64}),
                          plain_examples(NUM_TRAIN, **{'image/ID': lambda i: ids[i]}))
  info = data.describe(builder, 'train', 'test')
  line = first_error_line(builder, info, is_training=True, use_blur=False, unique_ids=True)
  assert 'Dataset shared_ids split train: id read twice in one epoch' in line
  assert '[id] [7]' in line and 'shared_ids-train.tfrecord-' in line
  # Only what indexes per-image tables (SogCLR) needs distinct ids.
  config = data.InputConfig(split='train', global_batch_size=8, image_size=4, is_training=True,
                            use_blur=False)
  assert len(list(data.build_input_fn(builder, info, config, 3)(
      tf.distribute.InputContext()).take(12))) == 12
  # Distinct ids pass the check epoch after epoch (4 batches of 8 per epoch: 3 epochs here).
  info = data.describe(plain, 'train', 'test')
  config = dataclasses.replace(config, unique_ids=True)
  epochs = [b['ids'].numpy() for b in data.build_input_fn(plain, info, config, 3)(
      tf.distribute.InputContext()).take(12)]
  for epoch in range(3):
    assert len(set(np.concatenate(epochs[4 * epoch:4 * epoch + 4]))) == 32


def test_a_slice_of_an_image_id_split_keeps_the_ids_of_the_whole_split(tmp_path):
  # SimCLR's 1%/10% protocol: --train_split=train[:10%] of ImageNet with the official image/ID.
  reverse = lambda i: NUM_TRAIN - 1 - i  # noqa: E731
  builder = write_dataset(str(tmp_path), 'sliced_ids', plain_features(**{'image/ID': np.int64}),
                          plain_examples(NUM_TRAIN, **{'image/ID': reverse}))
  info = data.describe(builder, 'train[:50%]', 'test')
  assert info.id_key == 'image/ID' and info.num_train_examples < NUM_TRAIN
  assert info.num_ids == NUM_TRAIN  # the u table holds every id of 'train'
  seen = read_eval(builder, info, 'train[:50%]')
  assert len(seen) == info.num_train_examples
  assert all(i == reverse(pixel) for i, pixel, _ in seen)  # each record keeps its own id
  config = data.InputConfig(split='train[:50%]', global_batch_size=6, image_size=4,
                            is_training=True, use_blur=False, unique_ids=True)
  ids = np.concatenate([b['ids'].numpy() for b in data.build_input_fn(builder, info, config, 3)(
      tf.distribute.InputContext()).take(3)])
  assert len(set(ids)) == 18 and set(ids) <= {reverse(p) for _, p, _ in seen}
  # Derived ids are the slice's own, dense; a union of splits derives them too (its splits'
  # own ids would collide).
  for split, size in (('train[50%:]', NUM_TRAIN - info.num_train_examples),
                      ('train+test', NUM_TRAIN + 5)):
    plain_info = data.describe(builder, split, 'test') if '+' in split else data.describe(
        write_dataset(str(tmp_path / 'plain'), 'plain_sliced', plain_features(),
                      plain_examples(NUM_TRAIN)), split, 'test')
    assert plain_info.id_key == '' and plain_info.num_ids == size


def test_a_union_of_slices_of_one_shard_derives_dense_ids(tmp_path):
  # Finding (red team): --train_split='train[:25%]+train[75%:]' of a one-shard split stopped
  # with 'HashTable has different value for same key': two slices of one shard file, two
  # offsets.
  builder = write_dataset(str(tmp_path), 'one_shard', plain_features(),
                          plain_examples(NUM_TRAIN), num_shards=1)
  union = 'train[:3]+train[5:8]'
  info = data.describe(builder, union, 'test')
  assert info.id_key == '' and info.num_ids == 6
  ids = {pixel: i for i, pixel, _ in read_eval(builder, info, union)}
  first = {pixel: i for i, pixel, _ in read_eval(builder, data.describe(
      builder, 'train[:3]', 'test'), 'train[:3]')}
  second = {pixel: i for i, pixel, _ in read_eval(builder, data.describe(
      builder, 'train[5:8]', 'test'), 'train[5:8]')}
  # Each record keeps its place: the first slice's ids, then the second's after them.
  assert ids == first | {pixel: 3 + i for pixel, i in second.items()}
  assert sorted(ids.values()) == list(range(6))


@pytest.mark.parametrize('batched', [True, False])
@pytest.mark.parametrize('first, second', [(3, 9), (3, 70), (0, 99)])
def test_the_distinct_id_check_finds_a_repeat_within_and_across_chunks(batched, first, second):
  ids = list(range(100))
  ids[second] = ids[first]
  records = tf.data.Dataset.from_tensor_slices(
      {'id': tf.constant(ids, tf.int32), 'record': [f'r{i}' for i in range(100)]})
  visits = data._EpochVisits('Dataset d split train:')
  with pytest.raises(tf.errors.InvalidArgumentError, match=rf'\[r{second}\] \[id\] \[{first}\]'):
    list(visits.checked(records, tf.constant(0, tf.int64), batched))
  # Distinct ids pass, epoch after epoch; the same id again in one epoch does not.
  visits = data._EpochVisits('Dataset d split train:')
  distinct = records.map(lambda ex: {**ex, 'id': tf.range(100)[tf.strings.to_number(
      tf.strings.substr(ex['record'], 1, 2), tf.int32)]})
  for epoch in range(2):
    out = [int(ex['id']) for ex in visits.checked(distinct, tf.constant(epoch, tf.int64),
                                                   batched)]
    assert out == list(range(100))
  with pytest.raises(tf.errors.InvalidArgumentError, match='read twice in one epoch'):
    list(visits.checked(distinct.take(1), tf.constant(1, tf.int64), batched))


# The host path's views of `noise_dataset` as the code before device augmentation and per-epoch
# shard orders (commit 03926d6) gives them: (ids, sum of each view) of the epoch's 3 batches.
HOST_VIEWS_BEFORE_ISSUE_16 = [
    ([3, 6, 4, 9], [8081.026777789928, 5085.336152813339]),
    ([0, 1, 11, 10], [7654.39497012645, 4195.847243779403]),
    ([5, 8, 2, 7], [6623.839654592026, 3931.7021126057953]),
]


def test_host_augmentation_keeps_the_views_of_the_code_before_it_could_run_on_the_device(
    tmp_path):
  # One shard: its order is that of before, so the published runs (the demo) stay valid.
  batches = training_batches(noise_dataset(str(tmp_path)), 3)
  for batch, (ids, sums) in zip(batches, HOST_VIEWS_BEFORE_ISSUE_16, strict=True):
    assert batch['ids'].tolist() == ids
    np.testing.assert_allclose([np.sum(v, dtype=np.float64) for v in batch['views']], sums,
                               rtol=1e-6)


@pytest.mark.parametrize('overrides', [{}, {'color_jitter_strength': 0.5, 'random_flip': False}])
def test_device_augmentation_gives_the_host_views_within_round_off(tmp_path, overrides):
  builder = noise_dataset(str(tmp_path), num_shards=2)
  host = training_batches(builder, 3, **overrides)
  device = training_batches(builder, 3, augment_on='device', **overrides)
  augment = data.InputConfig(split='train', global_batch_size=4, image_size=32,
                             is_training=True, augment_on='device', **overrides).pixel_augment()
  assert augment.blur and augment.color_distort
  for host_batch, device_batch in zip(host, device, strict=True):
    views, params = device_batch['views'], device_batch['pixel_params']
    assert 'pixel_params' not in host_batch
    np.testing.assert_array_equal(device_batch['ids'], host_batch['ids'])
    np.testing.assert_array_equal(device_batch['labels'], host_batch['labels'])
    assert len(params) == 2 and params[0].shape == (4, data_util.NUM_PARAMS)
    assert views[0].max() > 2  # uint8 scale: the step scales
    for host_view, view, view_params in zip(host_batch['views'], views, params, strict=True):
      np.testing.assert_allclose(data_util.distort_batch(view, view_params, augment), host_view,
                                 atol=1e-4)


def test_evaluation_views_are_the_same_unaugmented_ones_with_augment_on_device(tmp_path):
  builder = noise_dataset(str(tmp_path))
  info = data.describe(builder, 'train', 'test')
  elements = []
  for augment_on in ('host', 'device'):
    config = data.InputConfig(split='test', global_batch_size=5, image_size=32,
                              is_training=False, num_views=1, augment_on=augment_on)
    assert config.pixel_augment() is None
    elements.append(next(iter(data.build_input_fn(builder, info, config, 3)(
        tf.distribute.InputContext()))))
  assert set(elements[1]) == {'views', 'labels', 'ids'}  # nothing left for the step to do
  np.testing.assert_array_equal(elements[0]['views'][0], elements[1]['views'][0])
  images = [tf.io.decode_png(ex['image']) for ex in
            builder.as_dataset(split='test', shuffle_files=False,
                               decoders={'image': tfds.decode.SkipDecoding()}).take(5)]
  expected = np.stack([data_util.preprocess_for_eval(im, 32, 32, crop=False) for im in images])
  np.testing.assert_array_equal(elements[1]['views'][0], expected)


@pytest.mark.slow
def test_each_epoch_reads_the_shards_in_an_order_drawn_from_seed_and_epoch(plain):
  # A one-record shuffle buffer passes the read order through.
  info = data.describe(plain, 'train', 'test')
  shard_ends = np.cumsum(plain.info.splits['train'].shard_lengths)
  assert len(shard_ends) == 4

  def epochs(seed, initial_step=0):
    config = data.InputConfig(split='train', global_batch_size=1, image_size=4,
                              is_training=True, use_blur=False, deterministic=True, seed=seed,
                              shuffle_buffer=1, initial_step=initial_step)
    dataset = data.build_input_fn(plain, info, config, 3)(tf.distribute.InputContext())
    ids = [int(batch['ids'][0]) for batch in dataset.take(4 * NUM_TRAIN - initial_step)]
    return [ids[max(0, e * NUM_TRAIN - initial_step):(e + 1) * NUM_TRAIN - initial_step]
            for e in range(4)]

  orders = epochs(seed=0)
  for order in orders:
    assert sorted(order) == list(range(NUM_TRAIN))
    shards = np.searchsorted(shard_ends, order, side='right')
    # Read interleaved, record by record: the first four records come from the four shards.
    assert sorted(shards[:4]) == [0, 1, 2, 3]
  first_shards = [np.searchsorted(shard_ends, order[0], side='right') for order in orders]
  assert len(set(first_shards)) > 1, first_shards  # not the same shard opening every epoch
  assert len({tuple(order) for order in orders}) == 4
  assert epochs(seed=0) == orders
  assert epochs(seed=1) != orders
  # A run resumed mid-epoch 1 continues exactly where the uninterrupted one was.
  assert epochs(seed=0, initial_step=NUM_TRAIN + 5)[1:] == [orders[1][5:], *orders[2:]]


@pytest.mark.parametrize('ending', ['exhausted', 'broken off', 'raised'])
def test_a_loop_over_batches_releases_its_iterator_on_a_thread_of_its_own(ending, monkeypatch):
  # Deleting a tf.data iterator waits for its autotuning thread (measured: 10-16 s at the end
  # of a 25-31 s loop over a plain autotuned pipeline): evaluation loops must not wait.
  dataset = tf.data.Dataset.range(10).map(lambda x: x * 2, num_parallel_calls=tf.data.AUTOTUNE)
  deleted_on, release = [], data.release_in_background

  def watched(references):
    weakref.finalize(references[0], lambda: deleted_on.append(threading.current_thread().name))
    thread = release(references)
    thread.join()
    return thread

  monkeypatch.setattr(data, 'release_in_background', watched)
  seen = []
  with contextlib.suppress(KeyError):
    for value in data.batches(dataset):
      seen.append(int(value))
      if len(seen) == 4 and ending != 'exhausted':
        if ending == 'raised':
          raise KeyError(value)
        break
  assert seen == list(range(0, 20, 2))[:10 if ending == 'exhausted' else 4]
  assert deleted_on == ['release-input']


def test_a_watched_loop_over_batches_watches_each_batch_and_the_work_on_it():
  # trainer.CallWatchdog.watching bounds each evaluation batch of a multi-worker job: the batch's
  # reading and what the loop does with it (the collectives), then the read that ends the loop.
  events = []

  @contextlib.contextmanager
  def watching(what):
    events.append(('start', what))
    yield
    events.append(('end', what))

  for value in data.batches(tf.data.Dataset.range(2), watching, 'the test batch'):
    events.append(('work', int(value)))
  assert events == [('start', 'the test batch 1'), ('work', 0), ('end', 'the test batch 1'),
                    ('start', 'the test batch 2'), ('work', 1), ('end', 'the test batch 2'),
                    ('start', 'the test batch 3'), ('end', 'the test batch 3')]
