"""TFDS builders writing ImageNet-1K, ImageNet-S (a class subset) and image folders with dense ids.

Every record holds `image/encoded` (JPEG), `image/class/label`, `image/ID` (dense 0..N-1 per split)
and `image/filename`. Importing this module registers `imagenet1k_ids` and `imagenet_s` with TFDS.
"""
import io
import os
import re
import tarfile
import time

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

IMAGENET100_CLASSES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                   'imagenet100_classes.txt')
IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
TRAIN_TAR = 'ILSVRC2012_img_train.tar'
VAL_TAR = 'ILSVRC2012_img_val.tar'
DEVKIT = 'ILSVRC2012_devkit_t12'
NUM_IMAGENET_VAL = 50_000

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
manual_dir holds the ILSVRC2012 files from https://image-net.org (registration needed):
  training images: {TRAIN_TAR} (a tar of one tar per class), or train/<wnid>/<image>;
  validation images: {VAL_TAR}, or val/<image>, or val/<wnid>/<image>;
  validation labels (unless val/ has class folders): {DEVKIT}.tar.gz or its extracted folder
  (data/ILSVRC2012_validation_ground_truth.txt and data/meta.mat); without it the standard
  50,000 validation images are labelled from TFDS's bundled list.
"""


def read_class_list(path):
  """WordNet ids, one a line ('#' comments and blank lines ignored), sorted and de-duplicated."""
  with tf.io.gfile.GFile(path) as f:
    wnids = [line.split('#')[0].strip() for line in f]
  wnids = sorted(set(w for w in wnids if w))
  if not wnids:
    raise ValueError(f'Class list {path!r} holds no class ids (one WordNet id a line)')
  return wnids


def imagenet1k_classes():
  """The 1,000 ILSVRC2012 WordNet ids in label order (sorted, as in TFDS's imagenet2012)."""
  return read_class_list(os.fspath(tfds.core.tfds_path('datasets/imagenet2012/labels.txt')))


def jpeg_bytes(data, name):
  """`data` as RGB or grayscale JPEG bytes: other formats and CMYK JPEGs are re-encoded (TF's
  decoder rejects CMYK); 16-bit grey images are scaled to 8 bits (PIL's RGB conversion would
  clip them to white); an unreadable file is an error naming it."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    image = Image.open(io.BytesIO(data))
    if image.format == 'JPEG' and image.mode in ('RGB', 'L'):
      return data
    if image.mode.startswith('I'):  # 'I;16', 'I;16B', 'I': 16-bit grey (0..65535)
      pixels = np.clip(np.asarray(image, np.float64), 0, 65535) / 257.0
      image = Image.fromarray(np.round(pixels).astype(np.uint8))
    out = io.BytesIO()
    image.convert('RGB').save(out, format='JPEG', quality=95)
    return out.getvalue()
  except Exception as e:  # PIL raises many types on bad files.
    raise ValueError(f'Image {name!r} cannot be read ({e}); remove or replace it') from e


def _is_image(name):
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _folder_images(root):
  """[(class, path)] of root/<class>/<image>, sorted by class then file name. A class folder
  with sub-folders (not read) or without images is named in a warning."""
  items = []
  for label in sorted(tf.io.gfile.listdir(root)):
    label = label.rstrip('/')
    directory = os.path.join(root, label)
    if not tf.io.gfile.isdir(directory):
      continue
    entries = sorted(e.rstrip('/') for e in tf.io.gfile.listdir(directory))
    images = [(label, os.path.join(directory, f)) for f in entries if _is_image(f)]
    nested = [e for e in entries if tf.io.gfile.isdir(os.path.join(directory, e))]
    if nested:
      logging.warning('%s: sub-folders %s are not read (root/<class>/<image>: the images must be '
                      'in the class folder itself)', directory, nested[:3])
    if not images:
      logging.warning('%s holds no images (%s); class %r left out', directory,
                      ', '.join(IMAGE_EXTENSIONS), label)
    items += images
  return items


def _read(path):
  with tf.io.gfile.GFile(path, 'rb') as f:
    return f.read()


def _train_images(manual_dir, wnids):
  """Yields (wnid, file name, bytes) of the training images of classes `wnids`."""
  folder = os.path.join(manual_dir, 'train')
  if tf.io.gfile.isdir(folder):
    for wnid, path in _folder_images(folder):
      if wnid in wnids:
        yield wnid, os.path.basename(path), _read(path)
    return
  path = os.path.join(manual_dir, TRAIN_TAR)
  if not tf.io.gfile.exists(path):
    raise ValueError(f'No training images in --manual_dir={manual_dir!r}: expected {TRAIN_TAR} '
                     'or train/<wnid>/<image>')
  with tf.io.gfile.GFile(path, 'rb') as f, tarfile.open(fileobj=f, mode='r:') as outer:
    # Random access: the class tars left out of a subset are skipped, not read.
    for member in sorted(outer.getmembers(), key=lambda m: m.name):
      wnid = os.path.basename(member.name)[:-len('.tar')]
      if not member.isfile() or wnid not in wnids:
        continue
      with tarfile.open(fileobj=outer.extractfile(member), mode='r:') as inner:
        for image in sorted(inner.getmembers(), key=lambda m: m.name):
          if image.isfile() and _is_image(image.name):
            yield wnid, os.path.basename(image.name), inner.extractfile(image).read()


def _devkit_labels(manual_dir):
  """{validation file name: wnid} from the devkit, or None when it is absent."""
  import scipy.io  # pylint: disable=import-outside-toplevel
  folder = os.path.join(manual_dir, DEVKIT)
  archive = os.path.join(manual_dir, DEVKIT + '.tar.gz')
  truth_name = f'{DEVKIT}/data/ILSVRC2012_validation_ground_truth.txt'
  meta_name = f'{DEVKIT}/data/meta.mat'
  if tf.io.gfile.isdir(folder):
    truth = _read(os.path.join(manual_dir, truth_name))
    meta = _read(os.path.join(manual_dir, meta_name))
  elif tf.io.gfile.exists(archive):
    with tf.io.gfile.GFile(archive, 'rb') as f, tarfile.open(fileobj=f, mode='r:gz') as tar:
      truth = tar.extractfile(truth_name).read()
      meta = tar.extractfile(meta_name).read()
  else:
    return None
  synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)['synsets']
  wnid_of = {int(s['ILSVRC2012_ID']): str(s['WNID']) for s in synsets}
  # Line i of the ground truth labels ILSVRC2012_val_<i:08d>.JPEG (1-based).
  return {f'ILSVRC2012_val_{i:08d}.JPEG': wnid_of[int(line)]
          for i, line in enumerate(truth.decode().split(), start=1)}


def _validation_images(manual_dir, wnids):
  """Yields (wnid, file name, bytes) of the validation images of classes `wnids`."""
  folder = os.path.join(manual_dir, 'val')
  if tf.io.gfile.isdir(folder):
    entries = [e.rstrip('/') for e in tf.io.gfile.listdir(folder)]
    if any(tf.io.gfile.isdir(os.path.join(folder, e)) for e in entries):
      for wnid, path in _folder_images(folder):
        if wnid in wnids:
          yield wnid, os.path.basename(path), _read(path)
      return
    images = [(e, lambda e=e: _read(os.path.join(folder, e))) for e in sorted(entries)
              if _is_image(e)]
    yield from _labelled(manual_dir, images, wnids)
    return
  path = os.path.join(manual_dir, VAL_TAR)
  if not tf.io.gfile.exists(path):
    raise ValueError(f'No validation images in --manual_dir={manual_dir!r}: expected {VAL_TAR}, '
                     'val/<image> or val/<wnid>/<image>')
  with tf.io.gfile.GFile(path, 'rb') as f, tarfile.open(fileobj=f, mode='r:') as tar:
    members = sorted((m for m in tar.getmembers() if m.isfile() and _is_image(m.name)),
                     key=lambda m: m.name)
    images = [(os.path.basename(m.name), lambda m=m: tar.extractfile(m).read()) for m in members]
    yield from _labelled(manual_dir, images, wnids)


def _labelled(manual_dir, images, wnids):
  """Labels flat validation images [(file name, read_fn)] from the devkit or TFDS's list."""
  labels = _devkit_labels(manual_dir)
  if labels is None:
    if len(images) != NUM_IMAGENET_VAL:
      raise ValueError(
          f'Validation images in --manual_dir={manual_dir!r} have no labels: add {DEVKIT}.tar.gz '
          f'(or its folder), or sort them into val/<wnid>/ folders ({len(images)} images, not '
          f'the standard {NUM_IMAGENET_VAL} that TFDS has a label list for)')
    path = tfds.core.tfds_path('datasets/imagenet2012/validation_labels.txt')
    standard = path.read_text().split()
    labels = dict(zip(sorted(name for name, _ in images), standard))
  for name, read_fn in images:
    if name not in labels:
      raise ValueError(f'Validation image {name!r} has no label in the devkit ground truth')
    if labels[name] in wnids:
      yield labels[name], name, read_fn()


def _examples(images, class_names):
  """(key, example) with dense ids in the order of `images` [(class, file name, bytes)]."""
  index = {name: i for i, name in enumerate(class_names)}
  for dense_id, (label, name, data) in enumerate(images):
    yield name, {
        'image/encoded': jpeg_bytes(data, name),
        'image/class/label': index[label],
        'image/ID': dense_id,
        'image/filename': name,
    }


def _features(class_names):
  return tfds.features.FeaturesDict({
      'image/encoded': tfds.features.Image(encoding_format='jpeg'),
      'image/class/label': tfds.features.ClassLabel(names=class_names),
      'image/ID': tfds.features.Scalar(dtype=np.int64),
      'image/filename': tfds.features.Text(),
  })


class _LocalImagenet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """ImageNet from local ILSVRC2012 files, restricted to `_class_names()`."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def _class_names(self):
    raise NotImplementedError

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__, features=_features(self._class_names()),
        supervised_keys=('image/encoded', 'image/class/label'), homepage='https://image-net.org/')

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    wnids = set(self._class_names())
    return {'train': self._generate(_train_images(manual_dir, wnids), 'train'),
            'validation': self._generate(_validation_images(manual_dir, wnids), 'validation')}

  def _generate(self, images, split):
    count = 0
    classes = set()
    for key, example in _examples(images, self._class_names()):
      count += 1
      classes.add(example['image/class/label'])
      yield key, example
    if count == 0:
      raise ValueError(f'Dataset {self.name!r} split {split!r}: no image of its '
                       f'{len(self._class_names())} classes found in the manual directory')
    if len(classes) < len(self._class_names()):
      logging.warning('Dataset %r split %r: %d images of %d of its %d classes.', self.name,
                      split, count, len(classes), len(self._class_names()))

  def _generate_examples(self):  # Splits are generated by `_generate`.
    raise NotImplementedError


class Imagenet1kIds(_LocalImagenet):
  """ImageNet-1K (ILSVRC2012) with dense ids, from local files; labels in TFDS's order."""

  name = 'imagenet1k_ids'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'JPEG images, labels, dense ids and file names.'}

  def _class_names(self):
    return imagenet1k_classes()


class ImagenetSConfig(tfds.core.BuilderConfig):
  """A class subset of ImageNet-1K given by a list file of WordNet ids."""

  def __init__(self, *, class_list, **kwargs):
    super().__init__(**kwargs)
    self.class_list = class_list


class ImagenetS(_LocalImagenet):
  """ImageNet-S: a class subset of ImageNet-1K (default: the 100 classes of ImageNet-100), with
  dense ids; labels are positions in the subset's sorted WordNet ids."""

  name = 'imagenet_s'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'JPEG images, labels, dense ids and file names.'}
  BUILDER_CONFIGS = [ImagenetSConfig(name='imagenet100', class_list=IMAGENET100_CLASSES,
                                     description='The 100 classes of ImageNet-100 (CMC).')]

  def _class_names(self):
    return read_class_list(self.builder_config.class_list)


def imagenet_s_config(class_list):
  """A config of `imagenet_s` for another class list; its name is the file's stem."""
  name = os.path.splitext(os.path.basename(class_list))[0]
  return ImagenetSConfig(name=name, class_list=class_list,
                         description=f'Classes listed in {os.path.basename(class_list)}.')


def build_imagenet(subset, manual_dir, data_dir, class_list=None, name=None):
  """Writes ImageNet-1K (subset '1k') or ImageNet-S ('s') into `data_dir` (imagenet_builder);
  returns the builder."""
  builder = imagenet_builder(subset, data_dir, class_list, name)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def imagenet_builder(subset, data_dir, class_list=None, name=None):
  """The builder of ImageNet-1K (subset '1k') or ImageNet-S ('s') in `data_dir`, prepared there
  or not.

  `name` writes the same records under another dataset name, e.g. 'imagenet2012' so that the
  official SogCLR command lines (`--dataset=imagenet2012`) run unchanged on them; the name need
  not be registered (prepared directories are read from their own metadata).
  """
  if subset == '1k':
    builder_cls, config = Imagenet1kIds, None
  elif subset == 's':
    builder_cls = ImagenetS
    config = imagenet_s_config(class_list) if class_list else None
  else:
    raise ValueError(f"--subset={subset!r}: expected '1k' (ImageNet-1K) or 's' (ImageNet-S)")
  if name and name != builder_cls.name:
    if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
      raise ValueError(f'--name={name!r}: a dataset name is lower case letters, digits and _')
    builder_cls = type(builder_cls.__name__, (builder_cls,), {'name': name},
                       skip_registration=True)
  return builder_cls(data_dir=data_dir, config=config)


def build_image_folder(root, name, data_dir, version='1.0.0'):
  """Writes the image folder `root` as dataset `name` with dense ids; returns its builder.

  root/<class>/<image> gives one split 'train'; root/<split>/<class>/<image> (when root/train
  exists) gives one split per sub-folder. Labels are positions in the training classes' sorted
  names.
  """
  try:
    tfds.builder_cls(name)
    raise ValueError(f'--name={name!r} is a TFDS dataset already; choose another name')
  except tfds.core.registered.DatasetNotFoundError:
    pass
  if tf.io.gfile.isdir(os.path.join(root, 'train')):
    splits = {s.rstrip('/'): os.path.join(root, s.rstrip('/'))
              for s in sorted(tf.io.gfile.listdir(root))
              if tf.io.gfile.isdir(os.path.join(root, s.rstrip('/')))}
  else:
    splits = {'train': root}
  images = {split: _folder_images(path) for split, path in splits.items()}
  class_names = sorted({label for label, _ in images['train']})
  if not class_names:
    raise ValueError(f'--folder={root!r} holds no images in class folders '
                     f'(<class>/<image> with one of {IMAGE_EXTENSIONS})')
  for split, items in images.items():
    unknown = sorted({label for label, _ in items} - set(class_names))
    if unknown:
      raise ValueError(f'--folder={root!r} split {split!r} has classes {unknown} that train lacks')

  def split_examples(items):
    for _, example in _examples(((label, os.path.relpath(path, root), _read(path))
                                 for label, path in items), class_names):
      yield example

  return write_dataset(name, _features(class_names),
                       {split: split_examples(items) for split, items in images.items()},
                       data_dir, version=version, description=f'Images of {root} with dense ids.')


def prepared_dir(data_dir, name, version='1.0.0'):
  """data_dir/name/version when a dataset is prepared there (its dataset_info.json), else None:
  the preparation scripts leave a prepared dataset as it is."""
  folder = os.path.join(os.path.expanduser(data_dir), name, version)
  return folder if tf.io.gfile.exists(os.path.join(folder, 'dataset_info.json')) else None


def write_dataset(name, features, split_examples, data_dir, *, version='1.0.0', description='',
                  num_shards=None):
  """Writes `{split: iterable of example dicts}` as the TFDS dataset `name` into `data_dir`
  (data_dir/name/version) with TFDS's own writer; returns the builder.

  The builder class is made here, unregistered, so any name works (TFDS's AdhocBuilder needs
  importlib_resources, which TFDS 4.9 does not install).
  """

  builder_name = name

  class Writer(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = builder_name
    VERSION = tfds.core.Version(version)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, description=description, features=features)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(examples)
              for split, examples in split_examples.items()}

    def _generate_examples(self, examples):
      for index, example in enumerate(examples):
        yield index, example

  remove_abandoned_preparations(os.path.join(data_dir, name))
  builder = Writer(data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=num_shards))
  # Prepared: another preparation of it still writing could not put its copy in place either.
  remove_abandoned_preparations(os.path.join(data_dir, name), untouched_seconds=0)
  return builder


# A preparation writes its shards continuously: one untouched this long was stopped.
ABANDONED_AFTER_SECONDS = 600


def remove_abandoned_preparations(dataset_dir, untouched_seconds=ABANDONED_AFTER_SECONDS):
  """Removes the `incomplete.*` folders TFDS left in `dataset_dir` (data_dir/<name>) when a
  preparation was stopped (SIGTERM, a kill), once nothing in them changed for
  `untouched_seconds`; a preparation running meanwhile keeps its own. Returns the paths."""
  removed = []
  for path in tf.io.gfile.glob(os.path.join(dataset_dir, 'incomplete.*')):
    times = [tf.io.gfile.stat(os.path.join(root, n)).mtime_nsec / 1e9
             for root, _, names in tf.io.gfile.walk(path) for n in names]
    times.append(tf.io.gfile.stat(path).mtime_nsec / 1e9)
    if time.time() - max(times) >= untouched_seconds:
      logging.warning('Removing %s, left by a preparation that was stopped.', path)
      tf.io.gfile.rmtree(path)
      removed.append(path)
  return removed


def main(argv=None):
  """Command line: build ImageNet-1K / ImageNet-S from local files, or an image folder."""
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--data_dir', required=True, help='TFDS data directory to write into.')
  parser.add_argument('--manual_dir', help='Folder of the ILSVRC2012 files (ImageNet).')
  parser.add_argument('--subset', choices=['1k', 's'], default='1k',
                      help='1k: ImageNet-1K (imagenet1k_ids); s: ImageNet-S (imagenet_s).')
  parser.add_argument('--class_list', default=None,
                      help='ImageNet-S class list (WordNet ids, one a line); default: '
                           'imagenet100_classes.txt (dataset imagenet_s/<file stem> otherwise).')
  parser.add_argument('--folder', help='Image folder root/<class>/<image> to convert instead.')
  parser.add_argument('--name', help='Dataset name of the converted --folder (required), or '
                                     'of ImageNet (default imagenet1k_ids / imagenet_s; '
                                     'imagenet2012 suits the official SogCLR command lines).')
  args = parser.parse_args(argv)
  try:
    if args.folder:
      if not args.name:
        raise ValueError('--folder needs --name, the dataset name to train on (--dataset=<name>)')
      prepared = prepared_dir(args.data_dir, args.name)
      if prepared:
        print(f'Already prepared: {prepared}; nothing read or written (remove that folder, or '
              'give another --name, to prepare it from --folder again)')
        return
      builder = build_image_folder(args.folder, args.name, args.data_dir)
    elif args.manual_dir:
      builder = imagenet_builder(args.subset, args.data_dir, args.class_list, args.name)
      if tf.io.gfile.exists(os.path.join(builder.data_dir, 'dataset_info.json')):
        print(f'Already prepared: {builder.data_dir}; nothing read or written (remove that '
              'folder, or give another --name, to prepare it from --manual_dir again)')
        return
      builder = build_imagenet(args.subset, args.manual_dir, args.data_dir, args.class_list,
                               args.name)
    else:
      raise ValueError('Give --manual_dir (ImageNet from ILSVRC2012 files) or --folder and '
                       '--name')
  except ValueError as e:  # a bad file or argument: one line, as run.py's errors
    raise SystemExit(f'error: {e}') from None
  splits = ', '.join(f'{k}: {v.num_examples}' for k, v in sorted(builder.info.splits.items()))
  print(f'Wrote {builder.data_dir} ({splits})')


if __name__ == '__main__':
  main()
