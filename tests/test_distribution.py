"""distribution.py: the strategy plan (TPU flags, TF_CONFIG, GPUs), the TPU resolver for an
address, the CPU's bfloat16 default, and two worker processes on localhost (TF_CONFIG) that
train as one, resume together after a worker is killed, and stop with one line when a worker
stalls while alive."""
import concurrent.futures
import dataclasses
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

import checkpoints
from conftest import wait_for_a_checkpoint
import data as data_lib
import distribution
import model as model_lib
import probe

TPU_NAME = 'my-tpu'
TPU_ADDRESS = 'grpc://10.0.0.2:8470'
ONE_TASK = {'cluster': {'worker': ['host0:2222']}, 'task': {'type': 'worker', 'index': 0}}
TWO_TASKS = {'cluster': {'worker': ['host0:2222', 'host1:2222']},
             'task': {'type': 'worker', 'index': 1}}
# How the machine offers a TPU: flags naming one, a TPU VM's attached TPU, or nothing.
TPU_SOURCES = {
    'tpu_name': dict(tpu_name=TPU_NAME, master=None, tpu_zone='us-central2-b',
                     gcp_project='my-project', tpu_attached=False),
    'master': dict(tpu_name=None, master=TPU_ADDRESS, tpu_zone=None, gcp_project=None,
                   tpu_attached=False),
    'tpu_vm': dict(tpu_name=None, master=None, tpu_zone=None, gcp_project=None,
                   tpu_attached=True),
    'none': dict(tpu_name=None, master=None, tpu_zone=None, gcp_project=None,
                 tpu_attached=False),
}
# The TPUClusterResolver arguments each source leads to, and whether the address is remote.
EXPECTED_TPU = {
    'tpu_name': ({'tpu': TPU_NAME, 'zone': 'us-central2-b', 'project': 'my-project'}, True),
    'master': ({'tpu': TPU_ADDRESS, 'zone': None, 'project': None}, True),
    'tpu_vm': ({'tpu': 'local', 'zone': None, 'project': None}, False),
}


def plan(use_tpu=None, tpu_name=None, master=None, tpu_zone=None, gcp_project=None,
         tpu_attached=False, tf_config=None, num_gpus=0):
  return distribution.strategy_plan(use_tpu, tpu_name, master, tpu_zone, gcp_project,
                                    tpu_attached=tpu_attached, tf_config=tf_config or {},
                                    num_gpus=num_gpus)


@pytest.mark.parametrize('num_gpus', [0, 2])
@pytest.mark.parametrize('tf_config', [{}, ONE_TASK, TWO_TASKS], ids=['none', '1task', '2tasks'])
@pytest.mark.parametrize('source', list(TPU_SOURCES))
@pytest.mark.parametrize('use_tpu', [None, True, False])
def test_strategy_plan_for_every_combination(use_tpu, source, tf_config, num_gpus):
  kwargs = TPU_SOURCES[source]
  if use_tpu and source == 'none':
    with pytest.raises(ValueError, match=r'^--use_tpu=True but no TPU is attached'):
      plan(use_tpu, **kwargs, tf_config=tf_config, num_gpus=num_gpus)
    return
  result = plan(use_tpu, **kwargs, tf_config=tf_config, num_gpus=num_gpus)
  if use_tpu is not False and source != 'none':
    # A TPU wins over TF_CONFIG and GPUs.
    resolver_kwargs, remote = EXPECTED_TPU[source]
    assert result.kind == 'tpu'
    assert result.tpu_resolver_kwargs == resolver_kwargs
    assert result.connect_to_cluster == remote
    assert result.devices is None
    assert any('TF_CONFIG ignored' in w for w in result.warnings) == (tf_config is TWO_TASKS)
    return
  assert result.tpu_resolver_kwargs is None and not result.connect_to_cluster
  if tf_config is TWO_TASKS:
    assert result.kind == 'multi_worker' and result.devices is None
  else:  # No TF_CONFIG, or one of a single task: this host alone.
    assert result.kind == 'mirrored'
    assert result.devices == (None if num_gpus else ('/cpu:0',))
  # --use_tpu=False with TPU flags runs without a TPU and says which flags it ignored.
  ignored = [w for w in result.warnings if w.startswith('--use_tpu=False: ignoring')]
  assert bool(ignored) == (use_tpu is False and source in ('tpu_name', 'master'))
  if source == 'tpu_name' and ignored:
    assert ignored[0].endswith('--tpu_name, --tpu_zone, --gcp_project')


def test_tpu_name_wins_over_master_with_a_warning():
  result = plan(tpu_name=TPU_NAME, master=TPU_ADDRESS)
  assert result.tpu_resolver_kwargs['tpu'] == TPU_NAME
  assert result.warnings == (f"--master='{TPU_ADDRESS}' ignored: --tpu_name='{TPU_NAME}' names "
                             'the TPU',)
  # A grpc:// address given as --tpu_name is remote too; an attached TPU does not override it.
  result = plan(tpu_name=TPU_ADDRESS, tpu_attached=True)
  assert result.tpu_resolver_kwargs['tpu'] == TPU_ADDRESS and result.connect_to_cluster


@pytest.mark.parametrize('setting, ignored_for', [
    (dict(), None), (dict(num_gpus=2), 'the 2 local GPU(s)'),
    (dict(tf_config=TWO_TASKS), "TF_CONFIG's workers"), (dict(tpu_attached=True), 'a TPU')])
def test_cpu_replicas_split_only_a_cpu_running_alone(setting, ignored_for):
  result = distribution.strategy_plan(None, None, None, None, None, cpu_replicas=3,
                                      **{'tpu_attached': False, 'tf_config': {}, 'num_gpus': 0,
                                         **setting})
  if ignored_for is None:
    assert result.devices == ('/cpu:0', '/cpu:1', '/cpu:2') and result.split_cpu == 3
  else:
    assert result.split_cpu == 1 and result.devices != ('/cpu:0', '/cpu:1', '/cpu:2')
    assert result.warnings == (f'--cpu_replicas=3 ignored: the run is on {ignored_for}',)


def test_cpu_replicas_use_the_logical_cpus_made_before_tensorflow_started():
  # This process made 2 logical CPUs before TensorFlow started (conftest.py): 2 replicas run,
  # 3 cannot be made any more.
  config = distribution.DistributionConfig(cpu_replicas=2)
  assert distribution.build_strategy(config).num_replicas_in_sync == 2
  with pytest.raises(ValueError, match=r'^--cpu_replicas=3: TensorFlow already started in '
                                       r'this process with 2 CPU device\(s\), .*new process$'):
    distribution.build_strategy(dataclasses.replace(config, cpu_replicas=3))


@pytest.mark.slow
def test_cpu_replicas_from_the_command_line_train_on_that_many_replicas(run_command, tiny,
                                                                         tmp_path):
  result = run_command(*tiny, f'--model_dir={tmp_path}', '--train_steps=2', '--cpu_replicas=2',
                       '--keep_hub_module_max=0', '--probe_max_examples=0')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'Strategy MirroredStrategy with 2 replica(s)' in result.stderr
  # TensorFlow's per-variable INFO lines of its cross-replica sums: 120 before the first step.
  assert 'then broadcast to' not in result.stderr
  assert tf.train.latest_checkpoint(str(tmp_path)).endswith('ckpt-2')


@pytest.mark.parametrize('use_tpu', [None, True])
@pytest.mark.parametrize('flag, kwargs', [
    ('tpu_zone', dict(tpu_zone='us-central2-b')),
    ('gcp_project', dict(gcp_project='my-project')),
    ('tpu_zone', dict(tpu_zone='us-central2-b', master=TPU_ADDRESS)),
    ('gcp_project', dict(gcp_project='my-project', tpu_attached=True)),
])
def test_zone_or_project_without_tpu_name_is_an_error(use_tpu, flag, kwargs):
  # They only locate a TPU by name: given alone they are a mistake, not a hint to ignore.
  with pytest.raises(ValueError, match=rf'^--{flag}=.* locates a Cloud TPU by --tpu_name'):
    plan(use_tpu, **kwargs)


def test_use_tpu_without_a_tpu_is_a_one_line_error_from_the_command_line(run_cli, tmp_path):
  code, err = run_cli('--use_tpu=True', '--dataset=digits', f'--model_dir={tmp_path}')
  assert code == 1
  lines = [line for line in err.splitlines() if line.startswith('error:')]
  assert len(lines) == 1 and lines[0].startswith('error: --use_tpu=True but no TPU'), err[-2000:]


@pytest.mark.parametrize('text, message', [
    ('[1, 2]', 'TF_CONFIG is [1, 2], not a json object'),
    ('{"cluster": {"worker": "localhost:1,localhost:2"}}',
     'TF_CONFIG\'s cluster "worker" is "localhost:1,localhost:2", not a list'),
    ('{"cluster": [1]}', 'TF_CONFIG\'s "cluster" is [1]'),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": 3}', 'TF_CONFIG\'s "task" is 3'),
])
def test_a_tf_config_that_is_no_cluster_is_an_error_naming_it(text, message):
  # Finding (issue 24): TF_CONFIG='[1,2]' or workers given as a string were tracebacks.
  with pytest.raises(ValueError, match=f'^{re.escape(message)}'):
    distribution.parse_tf_config(text)


@pytest.fixture
def no_network(monkeypatch):
  """Any attempt to resolve a host name or open a connection fails the test."""

  def refuse(*args, **kwargs):
    raise AssertionError(f'network access: {args}')

  for name in ('create_connection', 'getaddrinfo', 'gethostbyname'):
    monkeypatch.setattr(socket, name, refuse)
  monkeypatch.setattr(socket.socket, 'connect', refuse)


@pytest.mark.parametrize('source', ['master', 'tpu_vm'])
def test_tpu_resolver_for_an_address_or_a_tpu_vm_is_built_offline(source, no_network):
  # A Cloud TPU *name* is looked up through the Cloud TPU API (network, cloud-tpu-client): not
  # constructed here. connect_to_cluster and initialize_tpu_system need the TPU itself.
  planned = plan(**TPU_SOURCES[source])
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver(**planned.tpu_resolver_kwargs)
  if source == 'master':
    assert resolver.master() == TPU_ADDRESS
    assert resolver.cluster_spec().as_dict() == {'worker': ['10.0.0.2:8470']}
  else:
    assert resolver.master() == '' and resolver.cluster_spec().as_dict() == {}


def test_cpu_bfloat16_detection_reads_the_cpu_flags(tmp_path):
  with_bf16 = tmp_path / 'with'
  with_bf16.write_text('processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n')
  without = tmp_path / 'without'
  without.write_text('processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n')
  assert distribution.cpu_supports_bfloat16(str(with_bf16))
  assert not distribution.cpu_supports_bfloat16(str(without))
  assert not distribution.cpu_supports_bfloat16(str(tmp_path / 'missing'))


@pytest.mark.parametrize('native, flag, expected', [
    (True, 'auto', 'mixed_bfloat16'), (False, 'auto', 'float32'),
    (True, 'float32', 'float32'), (False, 'bfloat16', 'mixed_bfloat16')])
def test_cpu_precision_default_follows_native_bfloat16(monkeypatch, one_replica, native, flag,
                                                       expected):
  monkeypatch.setattr(distribution, 'cpu_supports_bfloat16', lambda: native)
  # --jit_compile's default, 'auto', leaves XLA off on a CPU.
  assert distribution.resolve_precision_and_jit(one_replica, flag) == (expected, False)


@pytest.mark.parametrize('flag, expected', [('auto', 'host'), ('host', 'host'),
                                            ('device', 'device')])
def test_augment_on_auto_keeps_the_pixel_augmentations_on_the_host_of_a_cpu(one_replica, flag,
                                                                            expected):
  assert distribution.resolve_augment_on(one_replica, flag) == expected


# Two worker processes on localhost (MultiWorkerMirroredStrategy from TF_CONFIG).


def free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(('localhost', 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def test_the_start_up_wait_says_what_is_at_an_address_instead_of_the_task():
  # Finding (issue 24, rerun): a port held by another program that takes connections but says
  # nothing was reported as 'nothing answers'.
  ports = free_ports(3)
  tasks = [('worker', i, f'localhost:{port}') for i, port in enumerate(ports)]
  squatter = socket.socket()
  squatter.bind(('localhost', ports[1]))
  squatter.listen(8)
  try:
    with pytest.raises(ValueError, match=(
        rf'within --startup_timeout_seconds=3 \(worker 1 at localhost:{ports[1]}: a program '
        r'takes connections there but does not answer \(another program on its port\?\); '
        rf'worker 2 at localhost:{ports[2]}: nothing answers\); start every task')):
      distribution.rendezvous(tasks, ('worker', 0), timeout_seconds=3)
  finally:
    squatter.close()


def start_workers(repo, flags, model_dir, log_dir, *extra, prefixes=((), ()), own=((), ())):
  """Starts two workers of run.py with `flags` (worker i's command after prefixes[i], e.g.
  `nice`, and with its own flags own[i] last); each writes its log to a file (a pipe read only
  after the other worker ends would fill up and block the collectives of both)."""
  ports = free_ports(2)
  cluster = {'worker': [f'localhost:{p}' for p in ports]}
  processes = []
  for index in range(2):
    env = dict(os.environ, TF_CONFIG=json.dumps({'cluster': cluster,
                                                 'task': {'type': 'worker', 'index': index}}))
    log = open(os.path.join(log_dir, f'worker_{index}.log'), 'w')
    processes.append((subprocess.Popen(
        [*prefixes[index], sys.executable, os.path.join(repo, 'run.py'), *flags,
         f'--model_dir={model_dir}',
         '--DCL_mode=True', *extra, *own[index]],
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
COMMAND = ('--train_steps=30', '--checkpoint_steps=7', '--deterministic')
# The uninterrupted run also evaluates while training (with the kNN monitor) and exports: the
# killed-and-restarted run, which does neither, ends in its state all the same.
MONITORED = ('--eval_every_steps=14', '--knn_monitor', '--knn_k=20', '--keep_hub_module_max=1')


@pytest.fixture(scope='module')
def workers(repo, data_dir, tiny):
  """start_workers(model_dir, log_dir, *flags) of the tiny run, once the demo data is ready."""
  # Prepare the demo data once, before two processes would race to write it.
  subprocess.run([sys.executable, '-c', f'import data; data.get_builder("digits", {data_dir!r})'],
                 cwd=repo, check=True, capture_output=True, timeout=300)
  return lambda model_dir, log_dir, *extra, **kwargs: start_workers(
      repo, tiny, model_dir, log_dir, *extra, **kwargs)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, workers):
  """(model_dir, worker logs) of a two-worker run of COMMAND, monitored, with worker 1 at a
  lower priority on the same 2 cores (its clock sees other call times: left alone, the two
  would size calls differently and wait for each other forever; not the lowest priority,
  at which, beside another test's processes, it would barely run)."""
  run_dir = tmp_path_factory.mktemp('uninterrupted')
  model_dir = str(run_dir / 'run')
  return model_dir, finish(workers(model_dir, str(run_dir), *COMMAND, *MONITORED,
                                   prefixes=((), ('nice', '-n', '5'))))


def final_state(output, step=30):
  match = re.search(rf'Final state at step {step}: (.*)', output)
  assert match, output[-3000:]
  return match.group(1)


@pytest.mark.slow
def test_two_workers_of_unequal_speed_train_in_lockstep_and_only_the_chief_writes(uninterrupted):
  model_dir, outputs = uninterrupted
  steps = []
  for index, output in enumerate(outputs):
    assert 'Strategy CollectiveAllReduceStrategy with 2 replica(s)' in output, output[-3000:]
    assert 'Result:' in output, f'worker {index} failed:\n{output[-3000:]}'
    steps.append([int(s) for s in re.findall(r'\] step (\d+)/30', output)])
  assert steps[0] == steps[1]  # the same calls on both workers
  assert steps[0][-1] == 30 and len(steps[0]) > 5  # many calls, every checkpoint a boundary
  assert {7, 14, 21, 28} <= set(steps[0])

  fingerprints = [final_state(o) for o in outputs]
  assert fingerprints[0] == fingerprints[1]  # identical weights and u on both workers

  # The chief (worker 0) wrote the real checkpoints and summaries; worker 1 cleaned up.
  assert tf.train.latest_checkpoint(model_dir).endswith('ckpt-30')
  assert not glob.glob(os.path.join(model_dir, '.worker_*'))
  # Both workers saved the export (saving is collective); only the chief's is kept.
  assert os.listdir(os.path.join(model_dir, 'saved_model')) == ['30']
  assert len(glob.glob(os.path.join(model_dir, 'events.out.tfevents.*'))) == 1
  assert os.path.exists(os.path.join(model_dir, 'flags.json'))

  # Each worker read its own shard: 30 steps x 16 images, no id seen twice.
  log_u = tf.train.load_variable(tf.train.latest_checkpoint(model_dir), checkpoints.LOG_U_KEY)
  assert np.isfinite(log_u).sum() == 30 * 16
  assert 'u visited 480' in fingerprints[0]


def u_summary(log_u):
  """The u part of the state fingerprint (checkpoints.state_fingerprint), from a checkpoint's
  table."""
  visited = np.isfinite(log_u)
  return (f'u visited {int(visited.sum())}, '
          f'log u sum {np.sum(log_u[visited], dtype=np.float64):.10e}')


@pytest.mark.slow
def test_job_restarted_after_a_worker_is_killed_resumes_every_worker_with_the_same_u(
    tmp_path, workers, uninterrupted):
  model_dir = str(tmp_path / 'run')
  for name in ('killed', 'restarted'):
    os.makedirs(tmp_path / name)
  (chief, chief_log), (worker, worker_log) = workers(model_dir, str(tmp_path / 'killed'),
                                                     *COMMAND)
  try:
    wait_for_a_checkpoint(model_dir, chief, worker)
    worker.send_signal(signal.SIGKILL)
    # The coordination service misses the dead worker's heartbeats and aborts the chief's
    # collectives: the chief ends by itself, with one line saying what to do.
    chief.wait(timeout=300)
  finally:
    for process, log in ((chief, chief_log), (worker, worker_log)):
      process.kill()
      log.close()
  chief_output = open(chief_log.name).read()
  assert chief.returncode == 1, chief_output[-3000:]
  error_lines = [x for x in chief_output.splitlines() if x.startswith('error:')]
  assert len(error_lines) == 1, chief_output[-3000:]
  # The coordination service names the task; a collective that saw the socket close first
  # says 'recvmsg:Connection reset by peer'.
  assert re.fullmatch(r'error: UnavailableError: Collective ops is aborted by: .*; a worker of '
                      r'this job stopped: '
                      r'restart every worker with the same command \(each resumes from the '
                      r'newest checkpoint\)', error_lines[0]), error_lines[0]
  assert 'File "' not in error_lines[0]
  latest = tf.train.latest_checkpoint(model_dir)
  step = int(latest.rsplit('-', 1)[1])
  assert step in (7, 14, 21, 28), latest
  saved_u = u_summary(tf.train.load_variable(latest, checkpoints.LOG_U_KEY))

  outputs = finish(workers(model_dir, str(tmp_path / 'restarted'), *COMMAND))
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
  assert final.endswith('ckpt-30') and expected.endswith('ckpt-30')
  names = [n for n, _ in tf.train.list_variables(expected)
           if n not in ('_CHECKPOINTABLE_OBJECT_GRAPH', 'save_counter/.ATTRIBUTES/VARIABLE_VALUE')]
  assert checkpoints.LOG_U_KEY in names and len(names) > 100
  for name in names:
    np.testing.assert_array_equal(tf.train.load_variable(final, name),
                                  tf.train.load_variable(expected, name), err_msg=name)
  assert not glob.glob(os.path.join(model_dir, '.worker_*'))


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_every_worker_at_one_step_with_a_checkpoint(tmp_path,
                                                                               workers):
  # A preemption notice reaches one VM of the job: worker 1, not the chief, which saves.
  model_dir = str(tmp_path / 'run')
  processes = workers(model_dir, str(tmp_path), '--train_steps=400', '--checkpoint_steps=20')
  (chief, _), (worker, _) = processes
  try:
    wait_for_a_checkpoint(model_dir, chief, worker)
    worker.send_signal(signal.SIGTERM)
    chief.wait(timeout=300)
    worker.wait(timeout=300)
  finally:
    for process, log in processes:
      process.kill()
      log.close()
  outputs = [open(log.name).read() for _, log in processes]
  stopped = []
  for process, output, cause in zip((chief, worker), outputs,
                                    ("at another worker's request", 'by SIGTERM')):
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    match = re.search(rf'^preempted: Stopped at step (\d+)/400 {cause};', output, re.M)
    assert match, output[-3000:]
    stopped.append(int(match.group(1)))
  assert stopped[0] == stopped[1] and 20 < stopped[0] < 400  # the same step on both
  assert tf.train.latest_checkpoint(model_dir).endswith(f'ckpt-{stopped[0]}')
  assert not glob.glob(os.path.join(model_dir, '.worker_*'))


def stalled_job_error_line(model_dir, processes):
  """Once model_dir has a checkpoint, stalls worker 1 (stopped but for 5 ms every 2 s: its
  heartbeats go on, so the coordination service sees it alive, and it makes no progress, as a
  host swapping or stuck on a network disk) until the chief ends; returns the chief's one
  `error:` line, after checking it ended with exit code 1 within 60 s of the stall."""
  (chief, _), (worker, _) = processes
  try:
    wait_for_a_checkpoint(model_dir, chief, worker)
    stalled = time.time()
    while chief.poll() is None and time.time() < stalled + 120:
      worker.send_signal(signal.SIGSTOP)
      time.sleep(2)
      worker.send_signal(signal.SIGCONT)
      time.sleep(0.005)
    worker.send_signal(signal.SIGSTOP)
    stall_seconds = time.time() - stalled
  finally:
    for process, log in processes:
      process.kill()
      log.close()
  chief_output = open(processes[0][1].name).read()
  assert chief.returncode == 1 and stall_seconds < 60, chief_output[-3000:]
  error_lines = [x for x in chief_output.splitlines() if x.startswith('error:')]
  assert len(error_lines) == 1, chief_output[-3000:]
  return error_lines[0]


@pytest.mark.slow
def test_a_worker_stalled_while_alive_ends_the_job_with_one_line_within_the_step_timeout(
    tmp_path, workers):
  # The chief waits inside a collective, where before --step_timeout_seconds it waited for as
  # long as the stall lasted (150 s seen, no line, SIGTERM ignored).
  model_dir = str(tmp_path / 'run')
  line = stalled_job_error_line(model_dir, workers(
      model_dir, str(tmp_path), '--train_steps=400', '--checkpoint_steps=10',
      '--step_timeout_seconds=8'))
  # Stuck in its next steps or in the agreement after them, whichever the stall caught.
  assert re.fullmatch(r"error: (train steps \d+-(\d+)|the workers' agreement after step (\d+)) "
                      r'did not finish within --step_timeout_seconds=8: a worker of this job is '
                      r'hung or far slower than the others; restart every worker with the same '
                      r'command \(each resumes from the newest checkpoint\)', line), line
  assert int(re.findall(r'\d+', line.split(' within ')[0])[-1]) > 10
  assert tf.train.latest_checkpoint(model_dir).endswith('ckpt-10')


@pytest.mark.slow
def test_a_worker_stalled_during_the_evaluation_ends_the_job_within_the_step_timeout(
    tmp_path, workers):
  # Finding: the watchdog bounded train calls only; a peer stalled while the workers evaluated
  # (the head's metrics and the kNN are collectives) left the chief waiting without a bound.
  # Worker 1 stalls once the final checkpoint is written: what is left is the export and the
  # evaluation.
  model_dir = str(tmp_path / 'run')
  line = stalled_job_error_line(model_dir, workers(
      model_dir, str(tmp_path), '--train_steps=4', '--checkpoint_steps=100', '--knn_monitor',
      '--keep_hub_module_max=1', '--step_timeout_seconds=8'))
  assert re.fullmatch(r"error: (the head's evaluation at step 4, batch \d+|the kNN evaluation at "
                      r'step 4: (eval|train) split, batch \d+) did not finish within '
                      r'--step_timeout_seconds=8: a worker of this job is hung .*', line), line
  assert tf.train.latest_checkpoint(model_dir).endswith('ckpt-4')


def eager_features(model, data_dir, split):
  """(trunk features, labels) of a digits split, computed eagerly on one pipeline here."""
  builder = data_lib.get_builder('digits', data_dir)
  info = data_lib.describe(builder, 'train', 'test')
  config = data_lib.InputConfig(split=split, global_batch_size=100, image_size=16,
                                is_training=False, num_views=1)
  features, labels = [], []
  for batch in data_lib.build_input_fn(builder, info, config, 10)(
      tf.distribute.InputContext()):
    features.append(model(batch['views'][0], training=False)['features'].numpy())
    labels.append(np.argmax(batch['labels'].numpy(), 1))
  return np.concatenate(features), np.concatenate(labels)


@pytest.mark.slow
def test_two_workers_evaluate_while_training_and_their_knn_equals_one_host(
    uninterrupted, data_dir, tiny_model_config):
  model_dir, outputs = uninterrupted
  for output in outputs:
    assert 'knn_monitor skipped' not in output
    assert re.search(r'Eval at step 14 .*kNN top-1 0\.\d{4}', output), output[-3000:]
  results = json.load(open(os.path.join(model_dir, 'result_30.json')))
  assert [r['global_step'] for r in results['monitor']] == [14, 28, 30]
  # The workers' shards of the eval split make it whole, each image once.
  assert results['eval/num_examples'] == 360
  # The kNN of the two workers (each streaming its shard of the train split) is the one of
  # NumPy on one host, on the final checkpoint's features.
  model = model_lib.build_model(tiny_model_config(), 16)
  tf.train.Checkpoint(model=model).restore(tf.train.latest_checkpoint(model_dir)).expect_partial()
  expected = probe.knn_accuracy(*eager_features(model, data_dir, 'train'),
                                *eager_features(model, data_dir, 'test'), k=20, temperature=0.1)
  assert results['eval/knn_top_1'] == expected


def start_tasks(repo, tiny, model_dir, log_dir, addresses, indices, *extra):
  """Starts the workers `indices` of a cluster of `addresses` (run.py with the tiny flags); each
  logs to a file."""
  cluster = {'worker': addresses}
  processes = []
  for index in indices:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', TF_CONFIG=json.dumps(
        {'cluster': cluster, 'task': {'type': 'worker', 'index': index}}))
    log = open(os.path.join(log_dir, f'worker_{index}.log'), 'w')
    processes.append((subprocess.Popen(
        [sys.executable, os.path.join(repo, 'run.py'), *tiny, f'--model_dir={model_dir}',
         '--train_steps=2', *extra], env=env, stdout=log, stderr=subprocess.STDOUT), log))
  return processes


@pytest.mark.slow
def test_a_task_of_tf_config_never_started_ends_the_others_with_one_line_in_time(
    repo, tiny, tmp_path, workers):
  # Finding (issue 24): with 3 workers listed and 2 started, both printed nothing for 300 s and
  # SIGTERM did not end them: TensorFlow's start-up waited for the third forever.
  del workers  # the demo data, prepared once
  addresses = [f'localhost:{p}' for p in free_ports(3)]
  model_dir = str(tmp_path / 'run')
  outputs = finish(start_tasks(repo, tiny, model_dir, str(tmp_path), addresses, (0, 1),
                               '--startup_timeout_seconds=10'), timeout=300)
  for output in outputs:
    assert re.search(r'^error: the tasks of TF_CONFIG did not all start within '
                     rf'--startup_timeout_seconds=10 \(worker 2 at {addresses[2]}: nothing '
                     r'answers\); start every task TF_CONFIG lists', output, re.M), output[-2000:]
  assert not os.path.exists(model_dir)


@pytest.mark.slow
def test_a_taken_port_is_named_and_a_worker_waiting_for_it_honours_sigterm(
    repo, tiny, tmp_path, workers):
  # Finding (issue 24): worker 1, its port taken, said 'UnknownError: Could not start gRPC
  # server' (no port, no TF_CONFIG); worker 0 waited silently and ignored SIGTERM.
  del workers
  addresses = [f'localhost:{p}' for p in free_ports(2)]
  squatter = socket.socket()
  squatter.bind(('localhost', int(addresses[1].split(':')[1])))
  squatter.listen(1)
  try:
    (waiting, log), taken = start_tasks(repo, tiny, str(tmp_path / 'run'), str(tmp_path),
                                        addresses, (0, 1))
    output, = finish([taken], timeout=300)
    assert re.search(rf'^error: this task \(worker 1 of TF_CONFIG\) cannot listen at '
                     rf'{addresses[1]} \(\[Errno 98\] Address already in use\): the port is '
                     'taken by another program', output, re.M), output[-2000:]
    deadline = time.time() + 300
    while 'Waiting for the tasks of TF_CONFIG' not in open(log.name).read():
      assert waiting.poll() is None and time.time() < deadline
      time.sleep(0.2)
    waiting.send_signal(signal.SIGTERM)
    assert waiting.wait(timeout=60) == 128 + signal.SIGTERM
    assert open(log.name).read().strip().splitlines()[-1].startswith(
        'preempted: stopped by SIGTERM outside the training loop, at once')
  finally:
    squatter.close()
    waiting.kill()


@pytest.mark.slow
def test_a_tpu_address_that_accepts_but_is_no_tpu_is_an_error_within_the_start_timeout(
    run_command, tiny, tmp_path):
  # Finding: a program that accepts connections at the address but is no TPU server (here a
  # silent one; a proxy answering HTTP 404 alike) kept the connection in TensorFlow for ever:
  # still running, without a line, after 120 s.
  listener = socket.socket()
  listener.bind(('127.0.0.1', 0))
  listener.listen(8)
  port = listener.getsockname()[1]
  try:
    result = run_command(*tiny, f'--model_dir={tmp_path / "run"}',
                         f'--tpu_name=grpc://127.0.0.1:{port}', '--startup_timeout_seconds=3',
                         timeout=300)
  finally:
    listener.close()
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: the TPU at grpc://127.0.0.1:{port} did not connect and initialize within '
      '--startup_timeout_seconds=3 (is a TPU serving there?); check --tpu_name/--master')
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.slow
def test_a_grpc_server_that_is_no_tpu_is_an_error_naming_the_address(run_command, tiny, tmp_path):
  # Finding (issue 24 rerun): another gRPC server at the address (here one with no services; a
  # proxy answering HTTP 404 alike) ended the run with `error: UnimplementedError: Method not
  # found!`, naming neither the address nor the flag.
  import grpc  # noqa: PLC0415  (TensorFlow's own dependency)
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
  port = server.add_insecure_port('127.0.0.1:0')
  server.start()
  try:
    result = run_command(*tiny, f'--model_dir={tmp_path / "run"}',
                         f'--tpu_name=grpc://127.0.0.1:{port}', '--startup_timeout_seconds=60',
                         timeout=300)
  finally:
    server.stop(None)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: the TPU at grpc://127.0.0.1:{port} could not be connected to and initialized '
      '(UnimplementedError: Method not found!; is a TPU serving there?); check '
      '--tpu_name/--master')
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.slow
def test_a_tpu_address_that_does_not_answer_is_an_error_within_the_start_timeout(
    run_command, tiny, tmp_path):
  # Finding (issue 24): --tpu_name=grpc://127.0.0.1:1 hung for 300 s without a line.
  port, = free_ports(1)
  result = run_command(*tiny, f'--model_dir={tmp_path / "run"}',
                       f'--tpu_name=grpc://127.0.0.1:{port}', '--startup_timeout_seconds=3',
                       timeout=300)
  assert result.returncode == 1
  assert re.search(rf'^error: nothing answered at the TPU address 127\.0\.0\.1:{port} within '
                   r'--startup_timeout_seconds=3 \(.*Connection refused.*\); check '
                   '--tpu_name/--master', result.stderr, re.M), result.stderr[-2000:]
  assert not os.path.exists(tmp_path / 'run')
