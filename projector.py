"""The learned space in TensorBoard's Projector: trunk features of a fixed sample of the eval
split, with their labels as metadata and the images as a sprite (PCA, t-SNE, UMAP in the
browser: `tensorboard --logdir <model_dir>`, tab Projector).

Files, in `<logdir>/projector/`: `features_<step>.tsv` (one per evaluated step), `metadata.tsv`
(id, label, class name) and `sprite.png` (the sample's thumbnails in rows, in metadata order),
both written once per run; `<logdir>/projector_config.pbtxt` lists one embedding per step.
"""
import io
import os

from google.protobuf import text_format
import numpy as np
import tensorflow as tf

import data as data_lib

CONFIG_FILE = 'projector_config.pbtxt'
FOLDER = 'projector'
METADATA_FILE = 'metadata.tsv'
SPRITE_FILE = 'sprite.png'
# TensorBoard's Projector reads sprites of at most 8192 px a side.
MAX_SPRITE_SIDE = 8192


def sample_ids(num_examples, max_points, seed=0):
  """The ids (sorted) of a fixed sample of up to `max_points` of a split's `num_examples`."""
  if num_examples <= max_points:
    return np.arange(num_examples)
  return np.sort(np.random.default_rng(seed).choice(num_examples, max_points, replace=False))


def thumbnail_size(image_size, num_points):
  """The side of a sprite cell: the eval image size, smaller when the grid would not fit."""
  per_row = int(np.ceil(np.sqrt(num_points)))
  return max(1, min(image_size, MAX_SPRITE_SIDE // per_row))


def sprite(images):
  """[N, h, w, 3] uint8 -> one [rows * h, rows * w, 3] uint8 image, row-major, blank cells last."""
  count, height, width, channels = images.shape
  per_row = int(np.ceil(np.sqrt(count)))
  grid = np.zeros((per_row * per_row, height, width, channels), np.uint8)
  grid[:count] = images
  grid = grid.reshape(per_row, per_row, height, width, channels)
  return grid.transpose(0, 2, 1, 3, 4).reshape(per_row * height, per_row * width, channels)


def _sample_images(builder, info, split, ids, size):
  """(thumbnails [len(ids), size, size, 3] uint8, labels) of the records with `ids`, in their
  order; the eval preprocessing at `size` px."""
  config = data_lib.InputConfig(split=split, global_batch_size=256, image_size=size,
                                is_training=False, num_views=1, deterministic=True)
  dataset = data_lib.build_input_fn(builder, info, config, info.num_classes)(
      tf.distribute.InputContext())
  position = {int(i): n for n, i in enumerate(ids)}
  images = np.zeros((len(ids), size, size, 3), np.uint8)
  labels = np.zeros(len(ids), np.int64)
  for batch in data_lib.batches(dataset):
    for image, label, record_id in zip(batch['views'][0].numpy(), batch['labels'].numpy(),
                                       batch['ids'].numpy()):
      n = position.get(int(record_id))
      if n is not None:
        images[n] = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
        labels[n] = np.argmax(label)
  return images, labels


def _write(path, payload):
  with tf.io.gfile.GFile(path, 'wb' if isinstance(payload, bytes) else 'w') as f:
    f.write(payload)


def _class_names(builder, info):
  feature = builder.info.features[info.label_key] if info.label_key else None
  names = getattr(feature, 'names', None)
  return list(names) if names else [str(i) for i in range(info.num_classes)]


def write_sample(logdir, builder, info, split, ids, image_size):
  """metadata.tsv and sprite.png of the sample `ids` of `split` in logdir/projector, unless
  already there (they do not change between steps); returns the thumbnail side."""
  folder = os.path.join(logdir, FOLDER)
  size = thumbnail_size(image_size, len(ids))
  if tf.io.gfile.exists(os.path.join(folder, SPRITE_FILE)):
    return size
  tf.io.gfile.makedirs(folder)
  images, labels = _sample_images(builder, info, split, ids, size)
  names = _class_names(builder, info)
  rows = ['id\tlabel\tclass'] + [f'{i}\t{label}\t{names[label] if label < len(names) else label}'
                                  for i, label in zip(ids, labels)]
  _write(os.path.join(folder, METADATA_FILE), '\n'.join(rows) + '\n')
  _write(os.path.join(folder, SPRITE_FILE), tf.io.encode_png(sprite(images)).numpy())
  return size


def write_embedding(logdir, step, features, thumbnail):
  """features [N, C] (rows in the sample's order, as metadata.tsv) as this step's embedding;
  the config lists every step written so far."""
  from tensorboard.plugins import projector  # pylint: disable=import-outside-toplevel
  folder = os.path.join(logdir, FOLDER)
  tensor_file = f'features_{step}.tsv'
  buffer = io.StringIO()
  np.savetxt(buffer, features, fmt='%.6g', delimiter='\t')
  _write(os.path.join(folder, tensor_file), buffer.getvalue())
  config_path = os.path.join(logdir, CONFIG_FILE)
  config = projector.ProjectorConfig()
  if tf.io.gfile.exists(config_path):
    with tf.io.gfile.GFile(config_path) as f:
      text_format.Parse(f.read(), config)
  name = f'trunk features, step {step}'
  kept = [e for e in config.embeddings if e.tensor_name != name]
  del config.embeddings[:]
  config.embeddings.extend(kept)
  embedding = config.embeddings.add()
  embedding.tensor_name = name
  embedding.tensor_path = f'{FOLDER}/{tensor_file}'
  embedding.tensor_shape.extend(features.shape)
  embedding.metadata_path = f'{FOLDER}/{METADATA_FILE}'
  embedding.sprite.image_path = f'{FOLDER}/{SPRITE_FILE}'
  embedding.sprite.single_image_dim.extend([thumbnail, thumbnail])
  # Written whole, then renamed: TensorBoard may read it at any moment.
  _write(config_path + '.tmp', text_format.MessageToString(config))
  tf.io.gfile.rename(config_path + '.tmp', config_path, overwrite=True)
