"""Shared set-up and fixtures.

Two logical CPU devices, so MirroredStrategy runs the cross-replica code for real; the demo data
prepared once per session; a tiny run's flags; and the three ways to run the command line:
`run_main` (in-process, returns the results), `run_cli` (in-process, returns exit code and
stderr) and `run_command` (a real `python run.py` subprocess, as a user runs it).
"""
import glob
import logging
import os
import subprocess
import sys
import time
import types

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import tensorflow as tf  # noqa: E402  (must follow the environment set-up above)

_cpus = tf.config.list_physical_devices('CPU')
# Logical devices can be configured only before TensorFlow initializes its runtime.
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import pytest  # noqa: E402

# A run small enough for a test: ResNet-10 at 1/8 width on 16x16 digits, a few steps.
TINY = ('--dataset=digits', '--image_size=16', '--resnet_depth=10', '--width_multiplier=0.125',
        '--train_batch_size=16', '--eval_batch_size=100', '--eval_split=test',
        '--optimizer=adam', '--learning_rate=0.01', '--warmup_epochs=0', '--num_proj_layers=2',
        '--proj_out_dim=16', '--use_blur=False', '--log_every_seconds=0',
        # Exact comparisons: the CPU default is bfloat16 where the CPU has it natively.
        '--mixed_precision=float32',
        # No end-of-run probe and no SavedModel export (a third of a tiny run's time): a test of
        # those adds --probe_max_examples=100000 or --keep_hub_module_max=1 (a later flag wins).
        '--probe_max_examples=0', '--keep_hub_module_max=0')


# Fixtures that train or write a run, in order of precedence: the tests using one run one after
# another (on one pytest-xdist worker under `-n 2`, README), so it is built once (the first
# listed wins where a test uses several: `pretrained` reads `pretrained_run`). Module-scoped but
# for SESSION_RUNS, defined here and shared by several test modules.
SHARED_RUNS = ('uninterrupted', 'pretrained_run', 'monitored_run', 'pretraining', 'pretrained',
               'trained', 'ten_and_twenty', 'tiny_training', 'plain', 'ilsvrc_tars',
               'sk_se_resnet50')
SESSION_RUNS = ('pretrained_run',)
# The pretrained run's evaluation flags (test_experiment.py's runs compared with it use them).
MONITORS = ('--knn_monitor', '--knn_k=20', '--weight_decay=1e-3')


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
  """Puts each test of a shared run in that run's xdist group, next to the others, and the
  groups holding a slow test first: under xdist the long ones start early instead of ending the
  run on one worker while the other waits."""
  groups = {}
  for item in items:
    shared = [name for name in SHARED_RUNS if name in item.fixturenames]
    group = (shared[0] if shared and shared[0] in SESSION_RUNS else
             f'{item.module.__name__}.{shared[0]}' if shared else item.nodeid)
    if shared:
      item.add_marker(pytest.mark.xdist_group(group))
    groups.setdefault(group, []).append(item)
  ordered = sorted(groups.values(),
                   key=lambda tests: all(t.get_closest_marker('slow') is None for t in tests))
  items[:] = [item for tests in ordered for item in tests]


@pytest.fixture(scope='session')
def one_replica():
  return tf.distribute.MirroredStrategy(['/cpu:0'])


@pytest.fixture(scope='session')
def two_replicas():
  # One strategy object for the whole session: two MirroredStrategy objects over the same
  # devices draw colliding collective instance keys and abort each other's collectives.
  return tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])


@pytest.fixture(scope='session')
def repo():
  """The repository's root directory."""
  return REPO


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A TFDS data_dir holding the demo data (prepared on first use by the first run)."""
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='session')
def tiny(data_dir):
  """The flags of a tiny run on the demo data (a list; add --model_dir and the rest)."""
  return [*TINY, f'--data_dir={data_dir}']


def _parse(args):
  import run  # noqa: PLC0415  (imported late: it tunes malloc and defines the flags)
  run.FLAGS.unparse_flags()
  run.FLAGS(['run.py', *args])
  return run


@pytest.fixture(scope='session')
def pretrained_run(tmp_path_factory, tiny, run_main):
  """(model_dir, results) of 3 SogCLR steps with LARS, evaluated with the monitors and the
  probe, checkpointed at the end and exported (read by test_experiment.py and
  test_checkpoints.py; tests copy it before writing)."""
  model_dir = str(tmp_path_factory.mktemp('pretrained'))
  # The default --optimizer (LARS) and --loss (SogCLR), which --mode=eval is not told.
  results = run_main(*tiny, *MONITORS, f'--model_dir={model_dir}', '--train_steps=3',
                     '--probe_max_examples=100000', '--probe_baselines=False',
                     '--keep_hub_module_max=1', '--DCL_mode=True', '--optimizer=lars',
                     '--learning_rate=1.0')
  return model_dir, results


@pytest.fixture(scope='session')
def run_main():
  """run_main(*flags) -> results: `run.main` in this process, with these flags parsed."""
  return lambda *args: _parse(args).main([])


@pytest.fixture
def run_cli(capsys):
  """run_cli(*flags) -> (exit code, stderr): `run.cli` in this process, as the command line
  calls it."""

  def call(*args):
    run = _parse(args)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
      run.cli([])
    return exit_info.value.code, capsys.readouterr().err

  return call


@pytest.fixture
def run_in_process(capsys, caplog):
  """run_in_process(*flags) -> (returncode, stdout, stderr) like run_command's, but `run.cli` in
  this process (no interpreter start, TensorFlow imported once): stderr holds the error lines
  and then the run's log. For what is not about the process itself (signals, hangs, exit on a
  dead worker: run_command)."""

  def call(*args):
    run = _parse(args)
    capsys.readouterr()
    caplog.clear()
    code = 0
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger='absl'):
      try:
        run.cli([])
      except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=captured.out,
                                 stderr=captured.err + '\n' + caplog.text)

  return call


@pytest.fixture(scope='session')
def run_command():
  """run_command(*flags, timeout=600, env=None) -> CompletedProcess: `python run.py` in a
  subprocess with TF_CPP_MIN_LOG_LEVEL=2, as CI runs it (text stdout and stderr)."""

  def call(*args, timeout=600, env=None):
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', **(env or {}))
    return subprocess.run([sys.executable, os.path.join(REPO, 'run.py'), *args],
                          capture_output=True, text=True, timeout=timeout, env=environment,
                          cwd=REPO)

  return call


@pytest.fixture(scope='session')
def snapshot():
  """snapshot(directory) -> {path: bytes} of the files directly in it, to check none changed."""

  def take(directory):
    return {path: open(path, 'rb').read() for path in glob.glob(os.path.join(directory, '*'))
            if os.path.isfile(path)}

  return take


@pytest.fixture(scope='session')
def tiny_model_config():
  """tiny_model_config(**overrides) -> the ModelConfig of the tiny runs (10 classes, 16 px)."""
  import model as model_lib  # noqa: PLC0415

  def make(**overrides):
    settings = dict(resnet_depth=10, width_multiplier=0.125, cifar_stem=True, num_proj_layers=2,
                    proj_out_dim=16, num_classes=10)
    return model_lib.ModelConfig(**(settings | overrides))

  return make


@pytest.fixture(scope='session')
def official_layout():
  """official_layout(data_dir, ids=..., labels=..., num_train=24, num_validation=8): writes the
  official SogCLR imagenet2012 5.2.0 layout (`image/encoded`, `image/class/label` with 1,000
  names, `image/ID`) with TFDS's writer, 16x16 JPEGs, 3 shards; `ids(i, count)` and
  `labels(i)` give record i's values (default: ids in reverse record order, labels i % 7)."""
  import io  # noqa: PLC0415

  import numpy as np  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415
  import tensorflow_datasets as tfds  # noqa: PLC0415

  import imagenet  # noqa: PLC0415

  def jpeg(seed):
    pixels = np.random.RandomState(seed).randint(0, 256, (16, 16, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format='JPEG')
    return out.getvalue()

  def write(data_dir, ids=lambda i, count: count - 1 - i, labels=lambda i: i % 7,
            num_train=24, num_validation=8):
    features = tfds.features.FeaturesDict({
        'image/encoded': tfds.features.Image(encoding_format='jpeg'),
        'image/class/label': tfds.features.ClassLabel(num_classes=1000),
        'image/ID': np.int64,
    })
    splits = {split: [{'image/encoded': jpeg(i), 'image/class/label': labels(i),
                       'image/ID': ids(i, count)} for i in range(count)]
              for split, count in (('train', num_train), ('validation', num_validation))}
    imagenet.write_dataset('imagenet2012', features, splits, str(data_dir), version='5.2.0',
                           num_shards=3)
    return str(data_dir)

  return write


def _tmpfs(mount_point, size):
  """Mounts a tmpfs of `size` at `mount_point` (a new directory), or skips the test where this
  machine gives no mount rights."""
  os.mkdir(mount_point)
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', mount_point],
                           capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {mounted.stderr.strip()}')


@pytest.fixture
def small_disk(tmp_path):
  """A 3 MB tmpfs (a disk that fills at the tiny run's second checkpoint); needs mount rights."""
  mount_point = str(tmp_path / 'small')
  _tmpfs(mount_point, '3M')
  yield mount_point
  subprocess.run(['umount', mount_point], check=True)


@pytest.fixture
def filling_disk(tmp_path):
  """(directory on a 64 KB tmpfs, fill()): fill() writes a file there until no byte is left (a
  disk that fills while a run writes to it); needs mount rights."""
  mount_point = str(tmp_path / 'filling')
  _tmpfs(mount_point, '64k')

  def fill():
    with open(os.path.join(mount_point, 'filler'), 'wb', buffering=0) as f:
      try:
        while True:
          f.write(b'x' * 512)
      except OSError:  # No space left on device
        pass

  yield mount_point, fill
  subprocess.run(['umount', '--lazy', mount_point], check=True)  # a writer may hold a file


def wait_for_a_checkpoint(model_dir, *processes, timeout=600):
  """Returns once model_dir's checkpoint state file names a checkpoint (written after the
  checkpoint itself: that checkpoint is complete); every process must still run. Imported by
  the tests that signal a run once it has saved."""
  deadline = time.time() + timeout
  while tf.train.latest_checkpoint(model_dir) is None:
    assert all(p.poll() is None for p in processes), 'a worker ended before the checkpoint'
    assert time.time() < deadline, 'no checkpoint in time'
    time.sleep(0.02)
