"""The learned space in TensorBoard's Projector: trunk features of a fixed sample of the eval
split, with their labels as metadata and the images as a sprite (PCA, t-SNE, UMAP in the
browser: `tensorboard --logdir <model_dir>`, tab Projector).

Files, in `<logdir>/projector/`: `features_<step>.tsv` (one per evaluated step),
`metadata_<sample>.tsv` (id, label, class name) and `sprite_<sample>.png` (the sample's thumbnails
in rows, in metadata order), written once per sample: `<sample>` names the split, the ids and the
thumbnail size, so an evaluation of another sample in the same logdir (another
--projector_max_points, split or image size) never pairs its features with another sample's
labels. `<logdir>/projector_config.pbtxt` lists one embedding per step, each with its sample's
files.
"""
import collections
import hashlib
import io
import os

from google.protobuf import text_format
import numpy as np
import tensorflow as tf

import data as data_lib

CONFIG_FILE = 'projector_config.pbtxt'
FOLDER = 'projector'
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


# A sample's files, relative to the logdir, and the side of a sprite cell.
Sample = collections.namedtuple('Sample', ['metadata_path', 'sprite_path', 'thumbnail'])


def sample_files(split, ids, thumbnail):
  """The Sample of `ids` of `split` at `thumbnail` px: files named by a digest of all three."""
  digest = hashlib.sha256(f'{split}\t{thumbnail}\t'.encode() +
                          np.asarray(ids, np.int64).tobytes()).hexdigest()[:12]
  return Sample(f'{FOLDER}/metadata_{digest}.tsv', f'{FOLDER}/sprite_{digest}.png', thumbnail)


def write_sample(logdir, builder, info, split, ids, image_size):
  """The metadata and sprite of the sample `ids` of `split` in logdir/projector, unless already
  there (they do not change between steps); returns its Sample."""
  sample = sample_files(split, ids, thumbnail_size(image_size, len(ids)))
  sprite_path = os.path.join(logdir, sample.sprite_path)
  if tf.io.gfile.exists(sprite_path):
    return sample
  tf.io.gfile.makedirs(os.path.join(logdir, FOLDER))
  images, labels = _sample_images(builder, info, split, ids, sample.thumbnail)
  names = _class_names(builder, info)
  rows = ['id\tlabel\tclass'] + [f'{i}\t{label}\t{names[label] if label < len(names) else label}'
                                  for i, label in zip(ids, labels)]
  _write(os.path.join(logdir, sample.metadata_path), '\n'.join(rows) + '\n')
  # The sprite last, whole: its presence says the sample's files are complete.
  _write(sprite_path + '.tmp', tf.io.encode_png(sprite(images)).numpy())
  tf.io.gfile.rename(sprite_path + '.tmp', sprite_path, overwrite=True)
  return sample


def write_embedding(logdir, step, features, sample):
  """features [N, C] (rows in the order of `sample`'s metadata) as this step's embedding; the
  config lists every step written so far."""
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
  embedding.metadata_path = sample.metadata_path
  embedding.sprite.image_path = sample.sprite_path
  embedding.sprite.single_image_dim.extend([sample.thumbnail, sample.thumbnail])
  # Written whole, then renamed: TensorBoard may read it at any moment.
  _write(config_path + '.tmp', text_format.MessageToString(config))
  tf.io.gfile.rename(config_path + '.tmp', config_path, overwrite=True)
