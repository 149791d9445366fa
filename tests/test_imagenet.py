"""imagenet.py builders on a miniature ILSVRC2012 layout, image folders, and the seed command on
miniature prepared directories (official SogCLR layout, TFDS's layout, ours)."""
import io
import os
import tarfile
import time

import numpy as np
from PIL import Image
import pytest
import scipy.io
import tensorflow as tf
import tensorflow_datasets as tfds

import data
import imagenet

IMAGENET100 = imagenet.read_class_list(imagenet.IMAGENET100_CLASSES)
IMAGENET1K = imagenet.imagenet1k_classes()
# Two classes of ImageNet-100 and one outside it.
CLASSES = [IMAGENET100[0], IMAGENET100[1], sorted(set(IMAGENET1K) - set(IMAGENET100))[0]]
TRAIN_PER_CLASS = 4
TINY_RUN = ['--image_size=16', '--resnet_depth=10', '--width_multiplier=0.125',
            '--num_proj_layers=2', '--proj_out_dim=16', '--train_steps=2', '--eval_batch_size=8',
            '--optimizer=adam', '--learning_rate=0.01', '--warmup_epochs=0', '--use_blur=False',
            '--probe_max_examples=0', '--log_every_seconds=0', '--mixed_precision=float32']
SEED_COMMAND = ['--train_mode=pretrain', '--train_batch_size=8', '--dataset=imagenet2012',
                '--eval_split=validation', '--num_classes=100', '--DCL_mode=True', '--gamma=0.9']


def jpeg(seed, mode='RGB', fmt='JPEG', size=(20, 24)):
  pixels = np.random.RandomState(seed).randint(0, 256, (*size, 3), np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).convert(mode).save(out, format=fmt)
  return out.getvalue()


def add_file(tar, name, payload):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def tar_bytes(files):
  out = io.BytesIO()
  with tarfile.open(fileobj=out, mode='w') as tar:
    for name, payload in files:
      add_file(tar, name, payload)
  return out.getvalue()


def train_files(wnid):
  files = [(f'{wnid}_{i}.JPEG', jpeg(hash((wnid, i)) % 1000)) for i in range(TRAIN_PER_CLASS)]
  # ILSVRC2012 holds a CMYK JPEG and a PNG named .JPEG: both come out as RGB JPEGs.
  files[1] = (files[1][0], jpeg(1, mode='CMYK'))
  files[2] = (files[2][0], jpeg(2, fmt='PNG'))
  return files


VAL_LABELS = [CLASSES[i] for i in (2, 0, 1, 0, 2, 1)]


@pytest.fixture(scope='module')
def ilsvrc_tars(tmp_path_factory):
  """The ILSVRC2012 train and validation tars and the devkit, in miniature."""
  manual_dir = tmp_path_factory.mktemp('manual')
  with open(manual_dir / imagenet.TRAIN_TAR, 'wb') as f:
    f.write(tar_bytes([(f'{w}.tar', tar_bytes(train_files(w))) for w in CLASSES]))
  with open(manual_dir / imagenet.VAL_TAR, 'wb') as f:
    f.write(tar_bytes([(f'ILSVRC2012_val_{i:08d}.JPEG', jpeg(100 + i))
                       for i in range(len(VAL_LABELS), 0, -1)]))
  # The devkit numbers classes in its own order (ILSVRC2012_ID), not the sorted one.
  ilsvrc_id = {w: 1000 - i for i, w in enumerate(IMAGENET1K)}
  synsets = np.array([(ilsvrc_id[w], w) for w in IMAGENET1K],
                     dtype=[('ILSVRC2012_ID', 'O'), ('WNID', 'O')])
  meta = io.BytesIO()
  scipy.io.savemat(meta, {'synsets': synsets})
  truth = ''.join(f'{ilsvrc_id[w]}\n' for w in VAL_LABELS).encode()
  with tarfile.open(manual_dir / f'{imagenet.DEVKIT}.tar.gz', 'w:gz') as tar:
    add_file(tar, f'{imagenet.DEVKIT}/data/meta.mat', meta.getvalue())
    add_file(tar, f'{imagenet.DEVKIT}/data/ILSVRC2012_validation_ground_truth.txt', truth)
  return str(manual_dir)


def read_split(builder, split):
  """[(id, label, filename, image shape)] of a whole split."""
  return [(int(ex['image/ID']), int(ex['image/class/label']), ex['image/filename'].decode(),
           ex['image/encoded'].shape)
          for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))]


def test_imagenet1k_and_imagenet_s_from_the_ilsvrc_tars(ilsvrc_tars, tmp_path, capsys):
  data_dir = str(tmp_path)
  imagenet.main(['--manual_dir', ilsvrc_tars, '--data_dir', data_dir, '--subset', '1k'])
  imagenet.main(['--manual_dir', ilsvrc_tars, '--data_dir', data_dir, '--subset', 's'])
  assert f'Wrote {tmp_path / "imagenet1k_ids" / "1.0.0"} (' in capsys.readouterr().out
  # Finding (red team): preparing again said "Wrote" of the data already there.
  imagenet.main(['--manual_dir', ilsvrc_tars, '--data_dir', data_dir, '--subset', 's'])
  assert capsys.readouterr().out == (
      f'Already prepared: {tmp_path / "imagenet_s" / "imagenet100" / "1.0.0"}; nothing read or '
      'written (remove that folder, or give another --name, to prepare it from --manual_dir '
      'again)\n')
  for name, class_names in (('imagenet1k_ids', IMAGENET1K), ('imagenet_s', IMAGENET100)):
    builder = data.get_builder(name, data_dir)
    assert builder.info.features['image/class/label'].names == class_names
    kept = [w for w in CLASSES if w in class_names]
    train = read_split(builder, 'train')
    assert sorted(i for i, _, _, _ in train) == list(range(len(kept) * TRAIN_PER_CLASS))
    for _, label, filename, shape in train:
      assert class_names[label] == filename.split('_')[0] and shape == (20, 24, 3)
    validation = read_split(builder, 'validation')
    assert sorted(i for i, _, _, _ in validation) == list(range(sum(
        w in class_names for w in VAL_LABELS)))
    for _, label, filename, _ in validation:
      # Labelled from the devkit's ground truth through meta.mat's class numbers.
      assert class_names[label] == VAL_LABELS[int(filename[-13:-5]) - 1]
    info = data.describe(builder, 'train', 'validation')
    assert info.id_key == 'image/ID' and info.num_classes == len(class_names)


def test_imagenet_s_from_class_folders_with_another_class_list(tmp_path):
  manual_dir = tmp_path / 'manual'
  for split, count in (('train', 3), ('val', 2)):
    for wnid in CLASSES:
      os.makedirs(manual_dir / split / wnid)
      for i in range(count):
        (manual_dir / split / wnid / f'{wnid}_{i}.JPEG').write_bytes(jpeg(i))
  class_list = tmp_path / 'two_classes.txt'
  class_list.write_text(f'# two classes\n{CLASSES[2]}\n{CLASSES[0]}\n')
  data_dir = str(tmp_path / 'tfds')
  imagenet.main(['--manual_dir', str(manual_dir), '--data_dir', data_dir, '--subset', 's',
                 '--class_list', str(class_list)])
  builder = data.get_builder('imagenet_s/two_classes', data_dir)
  assert builder.info.features['image/class/label'].names == sorted([CLASSES[0], CLASSES[2]])
  assert sorted(i for i, _, _, _ in read_split(builder, 'train')) == list(range(6))
  assert sorted(i for i, _, _, _ in read_split(builder, 'validation')) == list(range(4))
  # The only prepared config is found without naming it.
  assert data.get_builder('imagenet_s', data_dir).info.splits['train'].num_examples == 6


@pytest.mark.slow
def test_an_image_folder_becomes_an_id_tagged_dataset_to_train_on(tmp_path, run_main):
  root = tmp_path / 'shapes'
  for label in ('circle', 'square', 'triangle'):
    os.makedirs(root / label)
    for i in range(4):  # photographs of two sizes
      size = (20, 24) if i % 2 else (30, 18)
      (root / label / f'{i}.png').write_bytes(jpeg(i, fmt='PNG', size=size))
  (root / 'square' / 'notes.txt').write_text('not an image')
  data_dir = str(tmp_path / 'tfds')
  imagenet.main(['--folder', str(root), '--name', 'shapes', '--data_dir', data_dir])
  builder = data.get_builder('shapes', data_dir)
  train = read_split(builder, 'train')
  assert sorted(i for i, _, _, _ in train) == list(range(12))
  assert sorted(f for _, _, f, _ in train)[0] == os.path.join('circle', '0.png')
  # With the probe: images of several sizes have no raw-pixel baseline (a finding: the run
  # trained, then stopped with "all input arrays must have the same shape" and no results).
  results = run_main(*TINY_RUN, '--dataset=shapes', '--eval_split=train',
                     '--train_batch_size=4', f'--data_dir={data_dir}',
                     f'--model_dir={tmp_path / "run"}', '--probe_max_examples=100')
  assert results['global_step'] == 2 and results['eval/num_examples'] == 12
  assert results['probe/raw_pixels_skipped'] == 'images of varying size'
  assert 0 <= results['probe/top_1'] <= 1 and 'probe/random_network_top_1' in results


def miniature_imagenet2012(data_dir, version, features, example):
  """A prepared `imagenet2012` of 24 train and 8 validation images, written by TFDS's writer
  under the given version and features, without TFDS's or SogCLR's builder code."""
  splits = {split: [example(i, count, jpeg(i), i % 7) for i in range(count)]
            for split, count in (('train', 24), ('validation', 8))}
  imagenet.write_dataset('imagenet2012', tfds.features.FeaturesDict(features), splits, data_dir,
                         version=version, num_shards=3)


@pytest.mark.slow
def test_seed_command_trains_on_the_official_sogclr_layout(tmp_path, run_main):
  data_dir = str(tmp_path / 'tfds')
  # The official SogCLR imagenet.py: imagenet2012 5.2.0 with image/encoded, image/class/label
  # and image/ID (here in reverse record order, to tell them from derived ids).
  miniature_imagenet2012(data_dir, '5.2.0', {
      'image/encoded': tfds.features.Image(encoding_format='jpeg'),
      'image/class/label': tfds.features.ClassLabel(names=IMAGENET1K),
      'image/ID': np.int64,
  }, lambda i, count, image, label: {'image/encoded': image, 'image/class/label': label,
                                     'image/ID': count - 1 - i})
  builder = data.get_builder('imagenet2012', data_dir)
  assert builder.info.version == '5.2.0'
  info = data.describe(builder, 'train', 'validation', 100)
  assert info.id_key == 'image/ID' and info.num_classes == 100
  model_dir = str(tmp_path / 'run')
  results = run_main(*SEED_COMMAND, *TINY_RUN, f'--data_dir={data_dir}',
                     f'--model_dir={model_dir}')
  assert results['global_step'] == 2 and results['eval/num_examples'] == 8
  log_u = tf.train.load_variable(tf.train.latest_checkpoint(model_dir),
                                 'sogclr/log_u/.ATTRIBUTES/VARIABLE_VALUE')
  assert log_u.shape == (24,) and np.isfinite(log_u).sum() == 16  # two steps of 8 images


@pytest.mark.slow
def test_seed_command_trains_unchanged_on_imagenet_s_built_here(tmp_path, ilsvrc_tars, run_main):
  data_dir = str(tmp_path / 'tfds')
  # Our layout under the official name: the seed's command line runs as written.
  imagenet.main(['--manual_dir', ilsvrc_tars, '--data_dir', data_dir, '--subset', 's',
                 '--name', 'imagenet2012'])
  assert tf.io.gfile.exists(os.path.join(data_dir, 'imagenet2012', 'imagenet100', '1.0.0',
                                         'dataset_info.json'))
  builder = data.get_builder('imagenet2012', data_dir)
  info = data.describe(builder, 'train', 'validation', 100)
  assert info.id_key == 'image/ID' and info.num_train_examples == 2 * TRAIN_PER_CLASS
  model_dir = str(tmp_path / 'run')
  results = run_main(*SEED_COMMAND, *TINY_RUN, f'--data_dir={data_dir}',
                     f'--model_dir={model_dir}')
  assert results['global_step'] == 2 and results['eval/num_examples'] == 4
  log_u = tf.train.load_variable(tf.train.latest_checkpoint(model_dir),
                                 'sogclr/log_u/.ATTRIBUTES/VARIABLE_VALUE')
  # Two steps of 8 images: every one of the 8 training images visited twice.
  assert log_u.shape == (8,) and np.isfinite(log_u).all()


def test_imagenet_name_is_checked(tmp_path, ilsvrc_tars):
  with pytest.raises(ValueError, match='--name=.Image Net.'):
    imagenet.build_imagenet('1k', ilsvrc_tars, str(tmp_path), name='Image Net')


def test_tfds_own_imagenet2012_layout_gets_ids_derived_from_record_ids(tmp_path, run_main):
  # TFDS's imagenet2012 (5.1.0: image, label, file_name) has no ids: they come from tfds_id.
  data_dir = str(tmp_path / 'tfds')
  miniature_imagenet2012(data_dir, '5.1.0', {
      'image': tfds.features.Image(encoding_format='jpeg'),
      'label': tfds.features.ClassLabel(names=IMAGENET1K),
      'file_name': tfds.features.Text(),
  }, lambda i, count, image, label: {'image': image, 'label': label, 'file_name': f'{i}.JPEG'})
  builder = data.get_builder('imagenet2012', data_dir)
  info = data.describe(builder, 'train', 'validation', 100)
  assert info.id_key == '' and info.image_key == 'image' and info.num_train_examples == 24
  config = data.InputConfig(split='train', global_batch_size=8, image_size=16, is_training=True,
                            use_blur=False)
  ids = [i for batch in data.build_input_fn(builder, info, config, 100)(
      tf.distribute.InputContext()).take(3) for i in batch['ids'].numpy()]
  assert sorted(ids) == list(range(24))


def test_a_stopped_preparations_folder_is_removed_by_the_next_one(tmp_path):
  # Finding (issue 24, rerun): SIGTERM during the preparation of fashion_mnist left
  # data_dir/fashion_mnist/incomplete.<random>_1.0.0/ (an 11 MB half shard) for good.
  dataset_dir = tmp_path / 'tiny_set'
  stale, live = dataset_dir / 'incomplete.AbC_1.0.0', dataset_dir / 'incomplete.XyZ_1.0.0'
  for folder in (stale, live):
    folder.mkdir(parents=True)
    (folder / 'tiny_set-train.tfrecord-00000-of-00001').write_bytes(b'half')
  old = time.time() - imagenet.ABANDONED_AFTER_SECONDS - 60
  for path in (stale / 'tiny_set-train.tfrecord-00000-of-00001', stale):
    os.utime(path, (old, old))
  assert imagenet.remove_abandoned_preparations(str(dataset_dir)) == [str(stale)]
  assert live.exists()  # another preparation may still write that one ...
  features = tfds.features.FeaturesDict({'label': tfds.features.ClassLabel(num_classes=2)})
  imagenet.write_dataset('tiny_set', features, {'train': [{'label': 1}]}, str(tmp_path))
  assert not live.exists()  # ... but once this one is in place, it could not put its own
  assert data.get_builder('tiny_set', str(tmp_path)).info.splits['train'].num_examples == 1
  assert os.listdir(dataset_dir) == ['1.0.0']


def test_a_16_bit_grey_image_keeps_its_values_in_8_bits():
  # Finding (red team): PIL's RGB conversion clipped a 16-bit grey PNG to solid white.
  grey = np.random.RandomState(0).randint(0, 65536, (20, 24)).astype(np.uint16)
  out = io.BytesIO()
  Image.fromarray(grey).save(out, format='PNG')
  decoded = tf.io.decode_jpeg(imagenet.jpeg_bytes(out.getvalue(), 'g16.png')).numpy()
  assert decoded.shape == (20, 24, 3)
  # JPEG at quality 95 on random pixels: each within a few levels of value / 257.
  assert np.abs(decoded[..., 0].astype(float) - grey / 257.0).mean() < 6
  assert abs(decoded.mean() - grey.mean() / 257.0) < 1


def test_an_image_folder_names_what_it_leaves_out_and_bad_files_in_one_line(tmp_path, caplog,
                                                                          capsys):
  # Findings (red team): images in sub-folders of a class folder, and an empty class folder,
  # were left out without a word; preparing again said "Wrote" of the old data; a truncated
  # image was a 75-line traceback.
  root = tmp_path / 'folder'
  for label in ('cat', 'dog'):
    os.makedirs(root / label)
    for i in range(2):
      (root / label / f'{i}.png').write_bytes(jpeg(i, fmt='PNG'))
  os.makedirs(root / 'empty')
  os.makedirs(root / 'fish' / 'batch1')
  (root / 'fish' / 'batch1' / '0.png').write_bytes(jpeg(0, fmt='PNG'))
  flags = ['--folder', str(root), '--name', 'pets', '--data_dir', str(tmp_path / 'tfds')]
  with caplog.at_level('WARNING', logger='absl'):
    imagenet.main(flags)
  warnings = [r.getMessage() for r in caplog.records if r.name == 'absl']
  assert f"{root / 'empty'} holds no images" in warnings[0]
  assert warnings[1] == f"{root / 'fish'}: sub-folders ['batch1'] are not read (root/<class>/" \
                        '<image>: the images must be in the class folder itself)'
  assert f"{root / 'fish'} holds no images" in warnings[2]
  assert capsys.readouterr().out.endswith('(train: 4)\n')
  imagenet.main(flags)
  assert capsys.readouterr().out == (
      f"Already prepared: {tmp_path / 'tfds' / 'pets' / '1.0.0'}; nothing read or written "
      '(remove that folder, or give another --name, to prepare it from --folder again)\n')
  (root / 'dog' / '1.png').write_bytes(jpeg(1, fmt='PNG')[:60])
  with pytest.raises(SystemExit, match=r"^error: Image 'dog/1\.png' cannot be read \(.*\); "
                                       r'remove or replace it$'):
    imagenet.main(['--folder', str(root), '--name', 'pets2', '--data_dir', str(tmp_path / 'tfds')])
  assert not (tmp_path / 'tfds' / 'pets2').exists() or not list(
      (tmp_path / 'tfds' / 'pets2').rglob('dataset_info.json'))
