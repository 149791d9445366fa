"""fashion_mnist.py: Fashion-MNIST prepared from idx files the tests write (the dataset's own
layout, gzipped or not), read back through data.py; bad files are errors naming the file."""
import gzip
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

import data as data_lib
import fashion_mnist
import imagenet

SIZES = {'train': 12, 'test': 5}


def _idx(array, magic):
  header = magic.to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def _write(path, payload, gz):
  if gz:
    with gzip.open(path + '.gz', 'wb') as f:
      f.write(payload)
  else:
    with open(path, 'wb') as f:
      f.write(payload)


def write_idx_files(folder, gz=True, seed=0):
  """The four idx files of a tiny Fashion-MNIST in `folder`; returns {split: (images, labels)}."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  arrays = {}
  for split, (images_stem, labels_stem) in fashion_mnist.FILES.items():
    images = rng.integers(0, 256, (SIZES[split], 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, SIZES[split], dtype=np.uint8)
    _write(os.path.join(folder, images_stem), _idx(images, 0x803), gz)
    _write(os.path.join(folder, labels_stem), _idx(labels, 0x801), gz)
    arrays[split] = images, labels
  return arrays


@pytest.mark.parametrize('gz', [True, False])
def test_prepared_on_first_use_with_dense_ids_labels_and_pixels(tmp_path, gz):
  source = str(tmp_path / 'idx')
  arrays = write_idx_files(source, gz=gz)
  data_dir = str(tmp_path / 'tfds')
  builder = data_lib.get_builder('fashion_mnist', data_dir, fashion_mnist_dir=source)
  info = data_lib.describe(builder, 'train', 'test')
  assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (12, 5, 10)
  assert info.id_key == 'image/ID' and info.label_key == 'label' and info.grey
  for split, (images, labels) in arrays.items():
    records = sorted(tfds.as_numpy(builder.as_dataset(split=split)),
                     key=lambda r: r['image/ID'])
    assert [r['image/ID'] for r in records] == list(range(SIZES[split]))
    np.testing.assert_array_equal(np.stack([r['image'][:, :, 0] for r in records]), images)
    np.testing.assert_array_equal([r['label'] for r in records], labels)
  # Prepared once: the next call reads it without the idx files.
  for name in os.listdir(source):
    os.remove(os.path.join(source, name))
  assert data_lib.get_builder('fashion_mnist', data_dir).info.splits['train'].num_examples == 12


@pytest.mark.slow  # 13 s
def test_a_data_dir_with_tfds_own_fashion_mnist_is_read_with_record_ids(tmp_path):
  # TFDS's builder writes image (28x28x1) and label, version 3.0.1, no ids.
  rng = np.random.default_rng(1)
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(28, 28, 1)),
      'label': tfds.features.ClassLabel(names=list(fashion_mnist.CLASS_NAMES))})
  examples = {split: [{'image': rng.integers(0, 256, (28, 28, 1), dtype=np.uint8),
                       'label': int(rng.integers(0, 10))} for _ in range(n)]
              for split, n in SIZES.items()}
  data_dir = str(tmp_path / 'tfds')
  imagenet.write_dataset('fashion_mnist', features, examples, data_dir, version='3.0.1')
  info = data_lib.describe(data_lib.get_builder('fashion_mnist', data_dir), 'train', 'test')
  assert info.id_key == '' and info.num_ids == 12 and info.grey


def _damage(source, stem, how):
  path = os.path.join(source, stem + '.gz')
  with gzip.open(path, 'rb') as f:
    payload = f.read()
  if how == 'magic':
    payload = (0x0803 if 'labels' in stem else 0x0801).to_bytes(4, 'big') + payload[4:]
  elif how == 'truncated':
    payload = payload[:-7]
  elif how == 'label':
    payload = payload[:-1] + bytes([10])
  elif how == 'empty':
    payload = payload[:4] + bytes(4) + payload[8:16]
  if how in ('gzip', 'deflate'):
    with open(path, 'rb') as f:
      compressed = bytearray(f.read())
    if how == 'gzip':
      compressed = compressed[:len(compressed) // 2]
    else:  # a damaged deflate stream: zlib.error, which gzip does not wrap
      compressed[30:60] = bytes(b ^ 0xFF for b in compressed[30:60])
    with open(path, 'wb') as f:
      f.write(compressed)
  else:
    with gzip.open(path, 'wb') as f:
      f.write(payload)
  return path


@pytest.mark.parametrize('stem, how, message', [
    ('train-images-idx3-ubyte', 'magic', 'is not an idx file of this kind'),
    ('t10k-labels-idx1-ubyte', 'magic', 'is not an idx file of this kind'),
    ('train-images-idx3-ubyte', 'truncated', 'is truncated'),
    ('t10k-images-idx3-ubyte', 'gzip', 'cannot be read'),
    ('train-images-idx3-ubyte', 'deflate', 'cannot be read (zlib.error: '),
    ('t10k-images-idx3-ubyte', 'empty', 'holds no images'),
    ('train-labels-idx1-ubyte', 'label', 'outside [0, 10)'),
])
def test_a_bad_idx_file_is_an_error_naming_it_and_writes_nothing(tmp_path, stem, how, message):
  source = str(tmp_path / 'idx')
  write_idx_files(source)
  path = _damage(source, stem, how)
  data_dir = tmp_path / 'tfds'
  with pytest.raises(fashion_mnist.IdxError) as error:
    data_lib.get_builder('fashion_mnist', str(data_dir), fashion_mnist_dir=source)
  assert path in str(error.value) and message in str(error.value)
  assert '\n' not in str(error.value)
  assert not (data_dir / 'fashion_mnist').exists()


def test_missing_files_and_disagreeing_counts_are_errors_naming_the_files(tmp_path):
  source = str(tmp_path / 'idx')
  write_idx_files(source)
  os.remove(os.path.join(source, 't10k-labels-idx1-ubyte.gz'))
  with pytest.raises(fashion_mnist.IdxError, match='t10k-labels-idx1-ubyte.*not found'):
    fashion_mnist.prepare(str(tmp_path / 'tfds'), source)
  _write(os.path.join(source, 't10k-labels-idx1-ubyte'), _idx(np.zeros(4), 0x801), gz=False)
  with pytest.raises(fashion_mnist.IdxError, match='disagree: 5 images, 4 labels'):
    fashion_mnist.prepare(str(tmp_path / 'tfds'), source)


def test_the_command_line_prepares_from_the_folder_run_py_names(tmp_path, capsys):
  # Its error told to give --fashion_mnist_dir, which only run.py took (the script: --source_dir).
  source = str(tmp_path / 'idx')
  with pytest.raises(SystemExit, match=r'^error: Fashion-MNIST file .*idx.train-images-idx3-ubyte'
                                       r'\[\.gz\] not found .*give --fashion_mnist_dir'):
    fashion_mnist.main([f'--data_dir={tmp_path / "tfds"}', f'--fashion_mnist_dir={source}'])
  write_idx_files(source)
  fashion_mnist.main([f'--data_dir={tmp_path / "tfds"}', f'--fashion_mnist_dir={source}'])
  assert capsys.readouterr().out.endswith('(test: 5, train: 12)\n')
  # Finding (red team): preparing again from other files said "Wrote" of the old data.
  write_idx_files(str(tmp_path / 'other'), seed=1)
  fashion_mnist.main([f'--data_dir={tmp_path / "tfds"}',
                      f'--fashion_mnist_dir={tmp_path / "other"}'])
  assert capsys.readouterr().out == (
      f'Already prepared: {tmp_path / "tfds" / "fashion_mnist" / "1.0.0"}; nothing read or written '
      '(remove that folder to prepare it again from other files)\n')
