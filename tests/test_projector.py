"""projector.py through the Evaluator: what TensorBoard's Projector reads (its config, tensor,
metadata and sprite) agrees row by row with the eval split's images, labels and features."""
import os

from google.protobuf import text_format
import numpy as np
import pytest
from tensorboard.plugins import projector as tb_projector
from tensorboard.plugins.projector import projector_plugin
import tensorflow as tf

import data as data_lib
import evaluation
import model as model_lib
import projector


def test_sprite_lays_images_out_in_rows_with_blank_cells_last():
  images = np.arange(1, 6, dtype=np.uint8)[:, None, None, None] * np.ones((5, 2, 3, 1), np.uint8)
  grid = projector.sprite(images)[..., 0]
  assert grid.shape == (6, 9)
  np.testing.assert_array_equal(grid[::2, ::3], [[1, 2, 3], [4, 5, 0], [0, 0, 0]])


def test_the_sample_is_fixed_sorted_and_at_most_the_cap():
  assert list(projector.sample_ids(5, 10)) == [0, 1, 2, 3, 4]
  sample = projector.sample_ids(60_000, 10_000)
  assert len(sample) == len(set(sample)) == 10_000 and np.all(np.diff(sample) > 0)
  np.testing.assert_array_equal(sample, projector.sample_ids(60_000, 10_000))
  # 100 thumbnails a row of 8192 px at most: 81 px.
  assert projector.thumbnail_size(224, 10_000) == 81
  assert projector.thumbnail_size(32, 10_000) == 32


def _images_by_id(builder, info, split):
  """{id: (eval-preprocessed image [16, 16, 3] float32, label)} of a split, read eagerly."""
  config = data_lib.InputConfig(split=split, global_batch_size=100, image_size=16,
                                is_training=False, num_views=1)
  dataset = data_lib.build_input_fn(builder, info, config, info.num_classes)(
      tf.distribute.InputContext())
  return {int(i): (image, int(np.argmax(label))) for batch in dataset
          for image, label, i in zip(batch['views'][0].numpy(), batch['labels'].numpy(),
                                     batch['ids'].numpy())}


def projecting_evaluator(strategy, data_dir, model, logdir, points):
  """An Evaluator of `model` on the digits' test split writing the Projector's files of up to
  `points` images to `logdir`."""
  builder = data_lib.get_builder('digits', data_dir)
  return evaluation.Evaluator(
      strategy, model, builder, data_lib.describe(builder, 'train', 'test'),
      evaluation.EvalConfig(eval_batch_size=100, projector_max_points=points),
      data=data_lib.DataConfig(dataset='digits', data_dir=data_dir, train_split='train',
                               eval_split='test', image_size=16),
      projector_dir=logdir)


@pytest.mark.slow
def test_each_evaluation_writes_an_embedding_whose_rows_match_metadata_and_sprite(
    tmp_path, one_replica, data_dir, tiny_model_config):
  with one_replica.scope():
    model = model_lib.build_model(tiny_model_config(), 16)
  logdir = str(tmp_path)
  evaluator = projecting_evaluator(one_replica, data_dir, model, logdir, 100)
  builder, info = evaluator.builder, evaluator.info
  evaluator.evaluate(1)
  sprite_path = os.path.join(logdir, read_config(logdir).embeddings[0].sprite.image_path)
  sprite_written = os.path.getmtime(sprite_path)
  model.set_weights([w * 1.5 for w in model.get_weights()])
  evaluator.evaluate(2)

  config = read_config(logdir)
  assert [e.tensor_name for e in config.embeddings] == ['trunk features, step 1',
                                                       'trunk features, step 2']
  assert len({e.metadata_path for e in config.embeddings}) == 1  # one sample, one set of files
  tensors = [projector_plugin._read_tensor_tsv_file(os.path.join(logdir, e.tensor_path))
             for e in config.embeddings]
  assert all(t.shape == (100, 64) == tuple(e.tensor_shape)
             for t, e in zip(tensors, config.embeddings))
  assert not np.allclose(tensors[0], tensors[1])  # each step its own weights
  assert os.path.getmtime(sprite_path) == sprite_written  # the sample's files, written once

  embedding = config.embeddings[1]
  with open(os.path.join(logdir, embedding.metadata_path)) as f:
    header, *rows = [line.split('\t') for line in f.read().splitlines()]
  assert header == ['id', 'label', 'class']
  ids = [int(r[0]) for r in rows]
  np.testing.assert_array_equal(ids, projector.sample_ids(360, 100))
  expected = _images_by_id(builder, info, 'test')
  assert [int(r[1]) for r in rows] == [expected[i][1] for i in ids]
  sprite = tf.io.decode_png(open(os.path.join(logdir, embedding.sprite.image_path),
                                 'rb').read()).numpy()
  assert list(embedding.sprite.single_image_dim) == [16, 16] and sprite.shape == (160, 160, 3)
  images = np.stack([expected[i][0] for i in ids])
  for n in (0, 37, 99):
    cell = sprite[n // 10 * 16:(n // 10 + 1) * 16, n % 10 * 16:(n % 10 + 1) * 16]
    np.testing.assert_allclose(cell / 255.0, images[n], atol=0.5 / 255 + 1e-6)
  # Row n of the tensor is the trunk features of image n, at the weights of its step.
  features = model(images, training=False)['features'].numpy()
  np.testing.assert_allclose(tensors[1], features, rtol=1e-4, atol=1e-4)


def read_config(logdir):
  config = tb_projector.ProjectorConfig()
  with open(os.path.join(logdir, 'projector_config.pbtxt')) as f:
    text_format.Parse(f.read(), config)
  return config


def embedding_sizes(logdir):
  """{tensor name: (tensor rows, metadata rows, sprite cells at least)} of each embedding."""
  sizes = {}
  for e in read_config(logdir).embeddings:
    tensor = projector_plugin._read_tensor_tsv_file(os.path.join(logdir, e.tensor_path))
    metadata = open(os.path.join(logdir, e.metadata_path)).read().splitlines()[1:]
    sprite = tf.io.decode_png(open(os.path.join(logdir, e.sprite.image_path), 'rb').read())
    cells = (sprite.shape[0] // e.sprite.single_image_dim[0]) ** 2
    assert tuple(e.tensor_shape) == tensor.shape
    sizes[e.tensor_name] = (len(tensor), len(metadata), cells)
  return sizes


@pytest.mark.slow
def test_another_sample_in_the_same_logdir_gets_its_own_metadata_and_sprite(
    tmp_path, one_replica, data_dir, tiny_model_config):
  # Finding (red team): metadata.tsv and sprite.png were written once per logdir, so a
  # --mode=eval with another --projector_max_points paired 100 feature rows with 360 labels.
  with one_replica.scope():
    model = model_lib.build_model(tiny_model_config(), 16)
  for step, points in ((1, 360), (2, 360), (2, 100), (3, 30)):
    projecting_evaluator(one_replica, data_dir, model, str(tmp_path), points).evaluate(step)
  # Step 2 re-evaluated on 100 points: its embedding is the new one, with the new sample's files.
  assert embedding_sizes(str(tmp_path)) == {'trunk features, step 1': (360, 360, 361),
                                            'trunk features, step 2': (100, 100, 100),
                                            'trunk features, step 3': (30, 30, 36)}
  assert len(os.listdir(tmp_path / 'projector')) == 3 + 2 * 3  # features, then metadata+sprite


def test_no_projector_when_its_cap_is_zero(tmp_path, one_replica, data_dir, tiny_model_config):
  with one_replica.scope():
    model = model_lib.build_model(tiny_model_config(), 16)
  projecting_evaluator(one_replica, data_dir, model, str(tmp_path), 0).evaluate(1)
  assert os.listdir(tmp_path) == []
