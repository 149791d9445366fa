"""Fashion-MNIST (Zalando; 60,000 training and 10,000 test images, 28x28 grey, 10 classes of
clothing) prepared offline from its four original idx files, with dense ids.

The files are the ones the dataset's repository publishes and Debian's `dataset-fashion-mnist`
installs under `/usr/share/datasets/fashion-mnist/` (gzipped or not):

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

They are written as the TFDS dataset `fashion_mnist` (version 1.0.0) into a data_dir, splits
`train` and `test`, features `image` (28x28x1 PNG), `label` (the 10 class names) and `image/ID`
(0..N-1 per split, in file order). `run.py --dataset=fashion_mnist` prepares it on first use;
or, once for a data_dir:

    python fashion_mnist.py --data_dir=~/tensorflow_datasets \
        [--fashion_mnist_dir=/usr/share/datasets/fashion-mnist]

A data_dir where TFDS's own `fashion_mnist` (3.0.1, no ids: they are derived from the record ids)
is prepared is read as it is.
"""
import gzip
import os
import zlib

import numpy as np

DEFAULT_SOURCE_DIR = '/usr/share/datasets/fashion-mnist'
NAME = 'fashion_mnist'
VERSION = '1.0.0'
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
               'Sneaker', 'Bag', 'Ankle boot')
# {split: (images file, labels file)}, without the .gz the published files carry.
FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
         'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
IMAGE_SHAPE = (28, 28)
# idx magic numbers: two zero bytes, the type (0x08: unsigned byte), the number of dimensions.
_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801


class IdxError(ValueError):
  """A missing, malformed or truncated idx file (the message names it)."""


def _find(source_dir, stem):
  """The path of `stem` or `stem.gz` in source_dir."""
  for name in (stem + '.gz', stem):
    path = os.path.join(source_dir, name)
    if os.path.isfile(path):
      return path
  raise IdxError(f'Fashion-MNIST file {os.path.join(source_dir, stem)}[.gz] not found (install '
                 'Debian\'s dataset-fashion-mnist, or give --fashion_mnist_dir, a folder of the '
                 'four idx files)')


def _read_bytes(path):
  try:
    if path.endswith('.gz'):
      with gzip.open(path, 'rb') as f:
        return f.read()
    with open(path, 'rb') as f:
      return f.read()
  except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
    kind = 'zlib.error' if isinstance(e, zlib.error) else type(e).__name__
    raise IdxError(f'Fashion-MNIST file {path} cannot be read ({kind}: {e})') from None


def read_idx(path, magic, shape=()):
  """The array stored in the idx file at `path`: uint8 [N, *shape], checked against its header.

  magic: the expected magic number (0x803 images, 0x801 labels); shape: the expected shape of
  one item. A wrong magic number or item shape, or fewer bytes than the header promises, is an
  IdxError naming the file.
  """
  raw = _read_bytes(path)
  dims = magic & 0xFF
  header = 4 + 4 * dims
  if len(raw) < header:
    raise IdxError(f'Fashion-MNIST file {path} is truncated: {len(raw)} bytes, shorter than its '
                   'header')
  found = int.from_bytes(raw[:4], 'big')
  if found != magic:
    raise IdxError(f'Fashion-MNIST file {path} is not an idx file of this kind: magic number '
                   f'{found:#010x}, expected {magic:#010x}')
  sizes = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(dims)]
  if tuple(sizes[1:]) != tuple(shape):
    raise IdxError(f'Fashion-MNIST file {path} holds items of shape {tuple(sizes[1:])}, '
                   f'expected {tuple(shape)}')
  expected = header + int(np.prod(sizes))
  if len(raw) != expected:
    what = 'truncated' if len(raw) < expected else 'longer than its header says'
    raise IdxError(f'Fashion-MNIST file {path} is {what}: {len(raw)} bytes, the header promises '
                   f'{sizes[0]} items ({expected} bytes)')
  return np.frombuffer(raw, np.uint8, offset=header).reshape(sizes)


def read_split(source_dir, split):
  """(images uint8 [N, 28, 28], labels uint8 [N]) of `split` ('train' or 'test')."""
  images_stem, labels_stem = FILES[split]
  images_path, labels_path = _find(source_dir, images_stem), _find(source_dir, labels_stem)
  images = read_idx(images_path, _IMAGES_MAGIC, IMAGE_SHAPE)
  labels = read_idx(labels_path, _LABELS_MAGIC)
  if not len(images):
    raise IdxError(f'Fashion-MNIST file {images_path} holds no images')
  if len(images) != len(labels):
    raise IdxError(f'Fashion-MNIST files {images_path} and {labels_path} disagree: '
                   f'{len(images)} images, {len(labels)} labels')
  if len(labels) and labels.max() >= len(CLASS_NAMES):
    bad = int(np.argmax(labels >= len(CLASS_NAMES)))
    raise IdxError(f'Fashion-MNIST file {labels_path}: label {labels[bad]} of item {bad} is '
                   f'outside [0, {len(CLASS_NAMES)})')
  return images, labels


def _examples(images, labels):
  for dense_id, (image, label) in enumerate(zip(images, labels)):
    yield {'image': image[:, :, None], 'label': int(label), 'image/ID': dense_id}


def prepare(data_dir, source_dir=None):
  """Writes `fashion_mnist` into `data_dir` from the idx files in `source_dir` (default: the
  Debian package's folder); returns the builder. Every file is read and checked first, so a
  bad file leaves `data_dir` as it was."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  import imagenet  # pylint: disable=import-outside-toplevel  (its TFDS writer)
  source_dir = os.path.expanduser(source_dir or DEFAULT_SOURCE_DIR)
  splits = {split: read_split(source_dir, split) for split in FILES}
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(*IMAGE_SHAPE, 1)),
      'label': tfds.features.ClassLabel(names=list(CLASS_NAMES)),
      'image/ID': tfds.features.Scalar(dtype=np.int64),
  })
  return imagenet.write_dataset(
      NAME, features, {split: _examples(*arrays) for split, arrays in splits.items()},
      os.path.expanduser(data_dir), version=VERSION,
      description=f'Fashion-MNIST from the idx files in {source_dir}, with dense ids.')


def main(argv=None):
  """Command line: prepare fashion_mnist in --data_dir from the idx files."""
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data_dir', required=True, help='TFDS data directory to write into.')
  # run.py's flag name (its errors name it); --source_dir as well.
  parser.add_argument('--fashion_mnist_dir', '--source_dir', dest='source_dir',
                      default=DEFAULT_SOURCE_DIR,
                      help='Folder of the four idx files (gzipped or not).')
  args = parser.parse_args(argv)
  import imagenet  # pylint: disable=import-outside-toplevel  (its TFDS writer)
  prepared = imagenet.prepared_dir(args.data_dir, NAME, VERSION)
  if prepared:
    print(f'Already prepared: {prepared}; nothing read or written (remove that folder to prepare '
          'it again from other files)')
    return
  try:
    builder = prepare(args.data_dir, args.source_dir)
  except IdxError as e:
    raise SystemExit(f'error: {e}') from None
  splits = ', '.join(f'{k}: {v.num_examples}' for k, v in sorted(builder.info.splits.items()))
  print(f'Wrote {builder.data_dir} ({splits})')


if __name__ == '__main__':
  main()
