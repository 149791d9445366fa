"""Two worker processes on localhost (MultiWorkerMirroredStrategy from TF_CONFIG) train as one."""
import glob
import json
import os
import re
import socket
import subprocess
import sys

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


def test_two_workers_train_in_lockstep_and_only_the_chief_writes(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  # Prepare the demo data once, before two processes would race to write it.
  subprocess.run([sys.executable, '-c', f'import data; data.get_builder("digits", {data_dir!r})'],
                 cwd=REPO, check=True, capture_output=True, timeout=300)
  model_dir = str(tmp_path / 'run')
  outputs = finish(start_workers(model_dir, data_dir, str(tmp_path), '--train_steps=4',
                                 '--checkpoint_steps=2'))
  for index, output in enumerate(outputs):
    assert 'Strategy CollectiveAllReduceStrategy with 2 replica(s)' in output, output[-3000:]
    assert 'Result:' in output, f'worker {index} failed:\n{output[-3000:]}'

  fingerprints = [re.search(r'Final state at step 4: (.*)', o).group(1) for o in outputs]
  assert fingerprints[0] == fingerprints[1]  # identical weights and u on both workers

  # The chief (worker 0) wrote the real checkpoints and summaries; worker 1 cleaned up.
  assert tf.train.latest_checkpoint(model_dir).endswith('ckpt-4')
  assert not glob.glob(os.path.join(model_dir, '.worker_*'))
  # Both workers saved the export (saving is collective); only the chief's is kept.
  assert os.listdir(os.path.join(model_dir, 'saved_model')) == ['4']
  assert len(glob.glob(os.path.join(model_dir, 'events.out.tfevents.*'))) == 1
  assert os.path.exists(os.path.join(model_dir, 'flags.json'))

  # Each worker read its own shard: 4 steps x 16 images, no id seen twice.
  log_u = tf.train.load_variable(tf.train.latest_checkpoint(model_dir), U_KEY)
  assert np.isfinite(log_u).sum() == 4 * 16
  assert 'u visited 64' in fingerprints[0]
