"""A worker of a two-worker job killed mid-run; the job restarted resumes every worker from the last
checkpoint with the same u, and ends equal to an uninterrupted run (tests/test_distribution.py
checks the same, quietly). Two run.py processes on localhost with TF_CONFIG, the demo data.
Usage: python bench/killed_worker.py [--work_dir=DIR] (about 3-5 minutes on 2 CPU cores)."""
import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402  (after the environment set-up above)
import tensorflow as tf  # noqa: E402

# A tiny SogCLR run on the demo data, deterministic: restarts can be compared bit for bit.
RUN_FLAGS = ['--dataset=digits', '--image_size=16', '--resnet_depth=18', '--width_multiplier=0.125',
             '--train_batch_size=16', '--eval_batch_size=100', '--eval_split=test',
             '--optimizer=adam', '--learning_rate=0.01', '--warmup_epochs=0',
             '--num_proj_layers=2', '--proj_out_dim=16', '--use_blur=False',
             '--log_every_seconds=0', '--DCL_mode=True', '--deterministic']
U_KEY = 'sogclr/log_u/.ATTRIBUTES/VARIABLE_VALUE'


def free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(('localhost', 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def start_workers(args, model_dir, log_dir):
  """Two run.py workers of one job; each logs to log_dir/worker_<i>.log."""
  os.makedirs(log_dir, exist_ok=True)
  cluster = {'worker': [f'localhost:{p}' for p in free_ports(2)]}
  processes = []
  for index in range(2):
    env = dict(os.environ, TF_CONFIG=json.dumps({'cluster': cluster,
                                                 'task': {'type': 'worker', 'index': index}}))
    log = open(os.path.join(log_dir, f'worker_{index}.log'), 'w')
    processes.append(subprocess.Popen(
        [sys.executable, os.path.join(REPO, 'run.py'), *RUN_FLAGS,
         f'--data_dir={args.data_dir}', f'--model_dir={model_dir}',
         f'--train_steps={args.train_steps}', f'--checkpoint_steps={args.checkpoint_steps}'],
        env=env, stdout=log, stderr=subprocess.STDOUT))
    log.close()
  return processes


def read_logs(log_dir):
  return [open(os.path.join(log_dir, f'worker_{i}.log')).read() for i in range(2)]


def lines(pattern, text):
  return [line.split('] ', 1)[-1] for line in text.splitlines() if re.search(pattern, line)]


def saved_step(model_dir):
  """The step of the checkpoint model_dir's state file names (written after the checkpoint)."""
  latest = tf.train.latest_checkpoint(model_dir)
  return int(latest.rsplit('-', 1)[1]) if latest else None


def u_summary(log_u):
  visited = np.isfinite(log_u)
  return (f'u visited {int(visited.sum())}, '
          f'log u sum {np.sum(log_u[visited], dtype=np.float64):.10e}')


def run_job(args, model_dir, log_dir, timeout=900):
  processes = start_workers(args, model_dir, log_dir)
  try:
    for process in processes:
      process.wait(timeout=timeout)
  finally:
    for process in processes:
      process.kill()
  outputs = read_logs(log_dir)
  for index, (process, output) in enumerate(zip(processes, outputs)):
    if process.returncode:
      raise SystemExit(f'worker {index} failed ({process.returncode}):\n{output[-3000:]}')
  return outputs


def kill_worker_after_first_checkpoint(args, model_dir, log_dir):
  """Starts the job, SIGKILLs worker 1 once a checkpoint exists; the chief is killed too if it
  has not exited within --chief_grace_seconds (as a scheduler restarting the job would)."""
  chief, worker = start_workers(args, model_dir, log_dir)
  try:
    deadline = time.time() + 900
    while saved_step(model_dir) is None:
      if chief.poll() is not None or worker.poll() is not None:
        raise SystemExit('a worker ended before the first checkpoint:\n' +
                         '\n'.join(o[-2000:] for o in read_logs(log_dir)))
      if time.time() > deadline:
        raise SystemExit('no checkpoint in time')
      time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    killed_at = time.time()
    print(f'worker 1 killed (SIGKILL) once ckpt-{saved_step(model_dir)} existed')
    try:
      code = chief.wait(timeout=args.chief_grace_seconds)
      print(f'the chief exited by itself after {time.time() - killed_at:.1f} s, code {code}')
    except subprocess.TimeoutExpired:
      chief.send_signal(signal.SIGKILL)
      chief.wait()
      print(f'the chief was still running {args.chief_grace_seconds:.0f} s later: killed too')
  finally:
    chief.kill()
    worker.kill()
  chief_log = read_logs(log_dir)[0]
  errors = lines(r'Error|error', chief_log)
  if errors:
    print(f'  chief\'s last error line: {errors[-1][:300]}')
  progress = lines(r'step \d+/\d+', chief_log)
  if progress:
    print(f'  chief\'s last progress line: {progress[-1]}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--work_dir', default=None, help='Directory for runs and logs (default: a '
                      'new temporary directory).')
  parser.add_argument('--train_steps', type=int, default=6)
  parser.add_argument('--checkpoint_steps', type=int, default=2)
  parser.add_argument('--chief_grace_seconds', type=float, default=60,
                      help='Seconds the chief may take to exit by itself after worker 1 dies.')
  args = parser.parse_args()
  work_dir = args.work_dir or tempfile.mkdtemp(prefix='killed_worker_')
  args.data_dir = os.path.join(work_dir, 'tfds')
  sys.path.insert(0, REPO)
  import data  # pylint: disable=import-outside-toplevel
  data.get_builder('digits', args.data_dir)  # prepared once, before two processes race for it
  started = time.time()

  print(f'1. Uninterrupted two-worker run ({args.train_steps} steps, a checkpoint every '
        f'{args.checkpoint_steps}) in {work_dir}')
  straight = os.path.join(work_dir, 'uninterrupted')
  outputs = run_job(args, straight, os.path.join(work_dir, 'logs_uninterrupted'))
  reference = [lines('Final state at step', o)[0] for o in outputs]
  for index, line in enumerate(reference):
    print(f'  worker {index}: {line}')

  print('2. The same command; worker 1 killed mid-run')
  interrupted = os.path.join(work_dir, 'interrupted')
  kill_worker_after_first_checkpoint(args, interrupted, os.path.join(work_dir, 'logs_killed'))
  latest = tf.train.latest_checkpoint(interrupted)
  step = saved_step(interrupted)
  saved_u = tf.train.load_variable(latest, U_KEY)
  print(f'  latest checkpoint: {os.path.basename(latest)} (step {step}); its {u_summary(saved_u)}')

  print('3. The job restarted with the same command')
  outputs = run_job(args, interrupted, os.path.join(work_dir, 'logs_restarted'))
  finals = []
  for index, output in enumerate(outputs):
    print(f'  worker {index}: {lines("Resumed from", output)[0]}')
    finals.append(lines('Final state at step', output)[0])
    print(f'  worker {index}: {finals[-1]}')

  print('4. Restarted against uninterrupted')
  resumed_u = [re.search(r'u visited .*', lines('Resumed from', o)[0]).group(0) for o in outputs]
  print(f'  both workers resumed at step {step} with the checkpoint\'s u: '
        f'{all(u == u_summary(saved_u) for u in resumed_u)}')
  print(f'  final states equal across workers: {finals[0] == finals[1]}; equal to the '
        f'uninterrupted run: {finals[0] == reference[0]}')
  final, expected = (tf.train.latest_checkpoint(d) for d in (interrupted, straight))
  names = [n for n, _ in tf.train.list_variables(expected)
           if n not in ('_CHECKPOINTABLE_OBJECT_GRAPH', 'save_counter/.ATTRIBUTES/VARIABLE_VALUE')]
  differing = [n for n in names if not np.array_equal(tf.train.load_variable(final, n),
                                                      tf.train.load_variable(expected, n))]
  print(f'  checkpoint variables bit-identical to the uninterrupted run: '
        f'{len(names) - len(differing)}/{len(names)}' +
        (f' (differ: {differing[:5]})' if differing else ''))
  print(f'({time.time() - started:.0f} s)')


if __name__ == '__main__':
  main()
