"""Two worker processes on localhost (MultiWorkerMirroredStrategy from TF_CONFIG) train as one,
and a job restarted after a worker was killed resumes where it left off."""
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from test_run import TINY, U_KEY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(('localhost', 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def start_workers(model_dir, data_dir, log_dir, *extra):
  """Starts two workers; each writes its log to a file (a pipe read only after the other
  worker ends would fill up and block the collectives of both)."""
  ports = free_ports(2)
  cluster = {'worker': [f'localhost:{p}' for p in ports]}
  processes = []
  for index in range(2):
    env = dict(os.environ, TF_CONFIG=json.dumps({'cluster': cluster,
                                                 'task': {'type': 'worker', 'index': index}}))
    log = open(os.path.join(log_dir, f'worker_{index}.log'), 'w')
    processes.append((subprocess.Popen(
        [sys.executable, os.path.join(REPO, 'run.py'), *TINY, f'--data_dir={data_dir}',
         f'--model_dir={model_dir}', '--DCL_mode=True', *extra],
        env=env, stdout=log, stderr=subprocess.STDOUT), log))
  return processes


def finish(processes, timeout=900):
  outputs = []
  try:
    for process, log in processes:
      process.wait(timeout=timeout)
      log.close()
      outputs.append(open(log.name).read())
  finally:
    for process, _ in processes:
      process.kill()
  return outputs


# One command for the uninterrupted run and the killed-and-restarted one; --deterministic makes
# them comparable bit for bit.
COMMAND = ('--train_steps=6', '--checkpoint_steps=2', '--deterministic')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  # Prepare the demo data once, before two processes would race to write it.
  subprocess.run([sys.executable, '-c', f'import data; data.get_builder("digits", {data_dir!r})'],
                 cwd=REPO, check=True, capture_output=True, timeout=300)
  return data_dir


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, data_dir):
  """(model_dir, worker logs) of a two-worker run of COMMAND."""
  run_dir = tmp_path_factory.mktemp('uninterrupted')
  model_dir = str(run_dir / 'run')
  return model_dir, finish(start_workers(model_dir, data_dir, str(run_dir), *COMMAND))


def final_state(output, step=6):
  match = re.search(rf'Final state at step {step}: (.*)', output)
  assert match, output[-3000:]
  return match.group(1)


def test_two_workers_train_in_lockstep_and_only_the_chief_writes(uninterrupted):
  model_dir, outputs = uninterrupted
  for index, output in enumerate(outputs):
    assert 'Strategy CollectiveAllReduceStrategy with 2 replica(s)' in output, output[-3000:]
    assert 'Result:' in output, f'worker {index} failed:\n{output[-3000:]}'

  fingerprints = [final_state(o) for o in outputs]
  assert fingerprints[0] == fingerprints[1]  # identical weights and u on both workers

  # The chief (worker 0) wrote the real checkpoints and summaries; worker 1 cleaned up.
  assert tf.train.latest_checkpoint(model_dir).endswith('ckpt-6')
  assert not glob.glob(os.path.join(model_dir, '.worker_*'))
  # Both workers saved the export (saving is collective); only the chief's is kept.
  assert os.listdir(os.path.join(model_dir, 'saved_model')) == ['6']
  assert len(glob.glob(os.path.join(model_dir, 'events.out.tfevents.*'))) == 1
  assert os.path.exists(os.path.join(model_dir, 'flags.json'))

  # Each worker read its own shard: 6 steps x 16 images, no id seen twice.
  log_u = tf.train.load_variable(tf.train.latest_checkpoint(model_dir), U_KEY)
  assert np.isfinite(log_u).sum() == 6 * 16
  assert 'u visited 96' in fingerprints[0]


def u_summary(log_u):
  """The u part of run.py's state fingerprint, from a checkpoint's table."""
  visited = np.isfinite(log_u)
  return (f'u visited {int(visited.sum())}, '
          f'log u sum {np.sum(log_u[visited], dtype=np.float64):.10e}')


def test_job_restarted_after_a_worker_is_killed_resumes_every_worker_with_the_same_u(
    tmp_path, data_dir, uninterrupted):
  model_dir = str(tmp_path / 'run')
  for name in ('killed', 'restarted'):
    os.makedirs(tmp_path / name)
  (chief, chief_log), (worker, worker_log) = start_workers(
      model_dir, data_dir, str(tmp_path / 'killed'), *COMMAND)
  try:
    # The checkpoint state file is written after the checkpoint itself: once it names one,
    # that checkpoint is complete.
    deadline = time.time() + 600
    while tf.train.latest_checkpoint(model_dir) is None:
      assert chief.poll() is None and worker.poll() is None, 'a worker ended before ckpt-2'
      assert time.time() < deadline, 'no checkpoint in time'
      time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    # The chief's next collective fails (or hangs): a scheduler would restart the whole job.
    try:
      chief.wait(timeout=60)
    except subprocess.TimeoutExpired:
      chief.send_signal(signal.SIGKILL)
      chief.wait()
  finally:
    for process, log in ((chief, chief_log), (worker, worker_log)):
      process.kill()
      log.close()
  assert chief.returncode != 0, 'the run finished before worker 1 was killed'
  latest = tf.train.latest_checkpoint(model_dir)
  step = int(latest.rsplit('-', 1)[1])
  assert step in (2, 4), latest
  saved_u = u_summary(tf.train.load_variable(latest, U_KEY))

  outputs = finish(start_workers(model_dir, data_dir, str(tmp_path / 'restarted'), *COMMAND))
  resumed = []
  for index, output in enumerate(outputs):
    assert 'Result:' in output, f'worker {index} failed:\n{output[-3000:]}'
    match = re.search(r'Resumed from (\S+) at step (\d+): (.*)', output)
    assert match, output[-3000:]
    assert (match.group(1), int(match.group(2))) == (latest, step)
    assert match.group(3).endswith(saved_u)  # the checkpoint's u table, on every worker
    resumed.append(match.group(3))
  assert resumed[0] == resumed[1]

  # Both workers end in the state of the run that was never interrupted, bit for bit.
  expected_dir, expected_outputs = uninterrupted
  assert final_state(outputs[0]) == final_state(outputs[1]) == final_state(expected_outputs[0])
  final, expected = (tf.train.latest_checkpoint(d) for d in (model_dir, expected_dir))
  assert final.endswith('ckpt-6') and expected.endswith('ckpt-6')
  names = [n for n, _ in tf.train.list_variables(expected)
           if n not in ('_CHECKPOINTABLE_OBJECT_GRAPH', 'save_counter/.ATTRIBUTES/VARIABLE_VALUE')]
  assert U_KEY in names and len(names) > 100
  for name in names:
    np.testing.assert_array_equal(tf.train.load_variable(final, name),
                                  tf.train.load_variable(expected, name), err_msg=name)
  assert not glob.glob(os.path.join(model_dir, '.worker_*'))
