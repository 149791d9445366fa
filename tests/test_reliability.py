"""Bad input, divergence, preemption and kills: clear errors, and nothing already written is lost."""
import glob
import os
import random
import re
import signal
import subprocess
import sys
import time

from absl import flags
import numpy as np
import pytest
import tensorflow as tf

import run
from test_run import TINY, U_KEY, run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def trained_dir(tmp_path_factory, data_dir):
  """A model_dir holding a 2-step checkpoint and flags.json, to check errors leave it intact."""
  model_dir = str(tmp_path_factory.mktemp('trained'))
  run_main(*TINY, f'--data_dir={data_dir}', f'--model_dir={model_dir}', '--train_steps=2',
           '--probe_max_examples=0')
  return model_dir


def snapshot(directory):
  return {path: open(path, 'rb').read() for path in glob.glob(os.path.join(directory, '*'))
          if os.path.isfile(path)}


def run_cli(capsys, *args):
  """run.cli as the command line runs it: returns (exit code, stderr)."""
  run.FLAGS.unparse_flags()
  run.FLAGS(['run.py', *args])
  with pytest.raises(SystemExit) as exit_info:
    run.cli([])
  return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize('args, message', [
    (['--dataset=no_such_dataset'], "--dataset='no_such_dataset' is neither a TFDS dataset"),
    (['--dataset=mnist', '--data_dir=/nonexistent/tfds'], 'is not prepared under'),
    (['--eval_split=validation'], "--eval_split='validation' is not a split"),
    (['--train_split=unlabeled'], "--train_split='unlabeled' is not a split"),
    (['--train_batch_size=5000'], 'is larger than split'),
    (['--image_size=4'], '--image_size=4 is too small'),
    (['--gamma=0'], '--gamma must be in (0, 1]'),
    (['--gamma=1.5'], '--gamma must be in (0, 1]'),
    (['--temperature=0'], '--temperature must be positive'),
    (['--DCL_mode=True', '--BI_mode=False'], 'Conflicting loss flags'),
    (['--DCL_mode=False', '--GCL_mode=True'], 'Conflicting loss flags'),
    (['--train_mode=finetune', '--checkpoint=/nonexistent/ckpt-1'], 'does not exist'),
    (['--train_mode=finetune', '--width_multiplier=0.25', '--checkpoint=TRAINED'],
     'holds another architecture'),
    (['--model_dir=TRAINED', '--optimizer=lars'], 'holds a checkpoint of another configuration'),
])
def test_bad_input_is_a_one_line_error_and_keeps_what_was_written(
    capsys, args, message, data_dir, trained_dir):
  before = snapshot(trained_dir)
  args = [a.replace('TRAINED', trained_dir) for a in args]
  # Bad input aimed at an existing run directory must not touch it.
  target = trained_dir if '--train_mode=finetune' not in args else trained_dir + '_ft'
  code, err = run_cli(capsys, *TINY, f'--data_dir={data_dir}', f'--model_dir={target}',
                      '--train_steps=4', '--probe_max_examples=0', *args)
  assert code == 1
  lines = [l for l in err.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and message in lines[0], err[-2000:]
  assert snapshot(trained_dir) == before


def test_unwritable_model_dir_is_an_error(capsys, tmp_path, data_dir):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  code, err = run_cli(capsys, *TINY, f'--data_dir={data_dir}',
                      f'--model_dir={blocker}/run', '--train_steps=1')
  assert code == 1 and 'is not writable' in err


def test_batch_size_must_divide_over_replicas():
  with pytest.raises(ValueError, match='not divisible by the 2 replicas'):
    run.check_batch_size(15, 2, 100, 'train')
  run.check_batch_size(16, 2, 100, 'train')


def test_unknown_enum_value_names_the_flag():
  run.FLAGS.unparse_flags()
  with pytest.raises(flags.IllegalFlagValueError, match='optimizer'):
    run.FLAGS(['run.py', '--optimizer=sgd'])
  run.FLAGS.unparse_flags()


def test_divergence_stops_with_the_step_range_and_keeps_the_last_good_checkpoint(
    capsys, tmp_path, data_dir):
  model_dir = str(tmp_path / 'run')
  common = [*TINY, f'--data_dir={data_dir}', f'--model_dir={model_dir}',
            '--probe_max_examples=0', '--checkpoint_steps=1', '--optimizer=momentum']
  run_main(*common, '--train_steps=2')
  good = snapshot(model_dir)
  code, err = run_cli(capsys, *common, '--train_steps=8', '--learning_rate=1e30')
  assert code == 1
  first_bad = int(re.search(r'Non-finite .* between steps (\d+) and \d+', err).group(1))
  assert first_bad >= 3
  latest = tf.train.latest_checkpoint(model_dir)
  assert int(latest.rsplit('-', 1)[1]) < first_bad  # nothing saved from the bad steps on
  for name, _ in tf.train.list_variables(latest):
    if name != '_CHECKPOINTABLE_OBJECT_GRAPH':
      value = tf.train.load_variable(latest, name)
      if name == U_KEY:  # -inf marks a never-visited image
        value = np.where(np.isneginf(value), 0.0, value)
      assert np.all(np.isfinite(value)), name
  for path, content in good.items():  # the checkpoints of the good steps are untouched
    if os.path.basename(path).startswith('ckpt-'):
      assert open(path, 'rb').read() == content, path


def _command(model_dir, data_dir, *extra):
  return [sys.executable, os.path.join(REPO, 'run.py'), *TINY, f'--data_dir={data_dir}',
          f'--model_dir={model_dir}', '--probe_max_examples=0', '--DCL_mode=True', *extra]


def _wait_for_progress(process, timeout=120):
  """Reads the process' stderr until a progress line appears (training is under way)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    line = process.stderr.readline()
    if not line and process.poll() is not None:
      raise AssertionError(f'process ended early with code {process.returncode}')
    if re.search(r'run\.py:\d+\] step \d+/\d+', line):
      return line
  raise AssertionError('no progress line in time')


def test_sigterm_saves_a_checkpoint_and_exits_then_resumes(tmp_path, data_dir):
  model_dir = str(tmp_path / 'run')
  process = subprocess.Popen(
      _command(model_dir, data_dir, '--train_steps=100000', '--checkpoint_steps=100000'),
      stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
  try:
    _wait_for_progress(process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == run.PREEMPTED_EXIT_CODE, err[-2000:]
  assert 'preempted: Stopped at step' in err
  latest = tf.train.latest_checkpoint(model_dir)
  step = int(latest.rsplit('-', 1)[1])
  assert 0 < step < 100000
  run_main(*TINY, f'--data_dir={data_dir}', f'--model_dir={model_dir}', '--probe_max_examples=0',
           '--DCL_mode=True', f'--train_steps={step + 2}', '--checkpoint_steps=100000')
  assert tf.train.latest_checkpoint(model_dir).endswith(f'ckpt-{step + 2}')


def test_sigkilled_deterministic_run_ends_equal_to_an_uninterrupted_one(tmp_path, data_dir):
  extra = ['--deterministic', '--train_steps=240', '--checkpoint_steps=10']
  straight = str(tmp_path / 'straight')
  run_main(*TINY, f'--data_dir={data_dir}', f'--model_dir={straight}', '--probe_max_examples=0',
           '--DCL_mode=True', *extra)
  killed = str(tmp_path / 'killed')
  rng = random.Random(0)
  kills = 0
  while kills < 3:
    process = subprocess.Popen(_command(killed, data_dir, *extra), stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True)
    try:
      _wait_for_progress(process)
      time.sleep(rng.uniform(0.0, 1.5))  # a random point of the run
      if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        kills += 1
      process.wait(timeout=60)
    finally:
      process.kill()
  subprocess.run(_command(killed, data_dir, *extra), check=True, capture_output=True,
                 timeout=300)
  final, expected = (tf.train.latest_checkpoint(d) for d in (killed, straight))
  assert final.endswith('ckpt-240') and expected.endswith('ckpt-240')
  names = [n for n, _ in tf.train.list_variables(expected)
           if n not in ('_CHECKPOINTABLE_OBJECT_GRAPH', 'save_counter/.ATTRIBUTES/VARIABLE_VALUE')]
  assert U_KEY in names and len(names) > 100
  for name in names:
    np.testing.assert_allclose(tf.train.load_variable(final, name),
                               tf.train.load_variable(expected, name), rtol=1e-5, atol=1e-6,
                               err_msg=name)


@pytest.mark.parametrize('precision', ['float32', 'bfloat16'])
def test_sogclr_trains_finite_at_temperature_001(tmp_path, data_dir, precision):
  # exp(1/0.01) overflows float32: the log-domain u table and float32 loss math must not.
  model_dir = str(tmp_path / precision)
  results = run_main(*TINY, f'--data_dir={data_dir}', f'--model_dir={model_dir}',
                     '--probe_max_examples=0', '--DCL_mode=True', '--temperature=0.01',
                     f'--mixed_precision={precision}', '--train_steps=4')
  assert np.isfinite(results['eval/top_1'])
  latest = tf.train.latest_checkpoint(model_dir)
  log_u = tf.train.load_variable(latest, U_KEY)
  visited = np.isfinite(log_u)
  assert visited.sum() == 4 * 16  # every visited image has a real u, never -inf or NaN
  assert not np.any(np.isnan(log_u)) and np.all(log_u[visited] > 20)
  # Some u exceed what float32 holds: a linear-domain table would have overflowed.
  assert np.max(log_u[visited]) > np.log(np.finfo(np.float32).max)
  tf.keras.mixed_precision.set_global_policy('float32')
