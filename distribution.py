"""Where a run executes: the tf.distribute strategy, chief and workers, precision and XLA.

`strategy_plan` decides without touching a device (testable anywhere); `build_strategy` builds
what it decided. Nothing here reads flags: `DistributionConfig` carries the infrastructure flags.
"""
import dataclasses
import json
import os
import socket
import threading
import time

from absl import logging
import tensorflow as tf

import errors
import interrupts
import schema


@dataclasses.dataclass(frozen=True)
class DistributionConfig:
  """The infrastructure flags (`run.py` fills it): TPU address, compute dtype, XLA."""
  use_tpu: bool | None = None
  tpu_name: str | None = None
  tpu_zone: str | None = None
  gcp_project: str | None = None
  master: str | None = None
  # 'auto' | 'float32' | 'bfloat16' | 'float16'
  mixed_precision: str = schema.setting('auto', eval_inherits=True)
  jit_compile: str = 'auto'      # 'auto' | 'true' | 'false'
  # Seconds to wait at start-up for TF_CONFIG's other tasks or a TPU to answer (0: forever).
  startup_timeout_seconds: float = schema.setting(900, allowed=schema.at_least(0))
  # Replicas on a host without GPUs or TPU: its CPU split into this many logical devices.
  cpu_replicas: int = schema.setting(1, allowed=schema.at_least(1))


@dataclasses.dataclass(frozen=True)
class StrategyPlan:
  """Which tf.distribute strategy `build_strategy` builds (decided by `strategy_plan`)."""
  kind: str  # 'tpu', 'multi_worker' or 'mirrored'
  # TPUClusterResolver keyword arguments ('tpu', 'zone', 'project') when kind is 'tpu'.
  tpu_resolver_kwargs: dict | None = None
  # A TPU reached over the network (by name or grpc:// address) is connected to first.
  connect_to_cluster: bool = False
  # MirroredStrategy devices; None = every local GPU.
  devices: tuple | None = None
  # Logical CPU devices to make of the host's CPU first (--cpu_replicas; 1: none).
  split_cpu: int = 1
  warnings: tuple = ()


def strategy_plan(use_tpu, tpu_name, master, tpu_zone, gcp_project, *, tpu_attached, tf_config,
                  num_gpus, cpu_replicas=1):
  """The strategy for the infrastructure flags and the machine, without touching a device.

  A TPU when --use_tpu=True, or when it is unset and a TPU is named or attached; its address is
  --tpu_name, else --master, else 'local' (a TPU VM's own TPU). Otherwise
  MultiWorkerMirroredStrategy when `tf_config` (TF_CONFIG, parsed) lists several chief/worker
  tasks, else MirroredStrategy over the local GPUs or the CPU (`cpu_replicas` logical devices
  of it: the multi-replica path without an accelerator).
  """
  plan = _accelerator_plan(use_tpu, tpu_name, master, tpu_zone, gcp_project,
                           tpu_attached=tpu_attached, tf_config=tf_config, num_gpus=num_gpus)
  if cpu_replicas == 1:
    return plan
  if plan.kind != 'mirrored' or num_gpus:
    runs_on = {'tpu': 'a TPU', 'multi_worker': "TF_CONFIG's workers"}.get(
        plan.kind, f'the {num_gpus} local GPU(s)')
    return dataclasses.replace(plan, warnings=plan.warnings + (
        f'--cpu_replicas={cpu_replicas} ignored: the run is on {runs_on}',))
  return dataclasses.replace(plan, devices=tuple(f'/cpu:{i}' for i in range(cpu_replicas)),
                             split_cpu=cpu_replicas)


def _accelerator_plan(use_tpu, tpu_name, master, tpu_zone, gcp_project, *, tpu_attached,
                      tf_config, num_gpus):
  """strategy_plan with the CPU whole."""
  warnings = []
  named = {'tpu_name': tpu_name, 'master': master, 'tpu_zone': tpu_zone,
           'gcp_project': gcp_project}
  if use_tpu is False:
    given = [f'--{k}' for k, v in named.items() if v]
    if given:
      warnings.append(f'--use_tpu=False: ignoring {", ".join(given)}')
  else:
    # The Cloud TPU API looks a TPU name up in a zone and project; an address needs neither.
    for flag in ('tpu_zone', 'gcp_project'):
      if named[flag] and not tpu_name:
        raise ValueError(f'--{flag}={named[flag]!r} locates a Cloud TPU by --tpu_name, which is '
                         'not set; set --tpu_name or drop the flag')
    address = tpu_name or master or ('local' if tpu_attached else None)
    if use_tpu and address is None:
      raise ValueError('--use_tpu=True but no TPU is attached to this machine; set --tpu_name '
                       '(a Cloud TPU name or grpc:// address) or --master, or unset --use_tpu')
    if address is not None:
      if tpu_name and master and master != tpu_name:
        warnings.append(f'--master={master!r} ignored: --tpu_name={tpu_name!r} names the TPU')
      if _num_tasks(tf_config) > 1:
        warnings.append('TF_CONFIG ignored: a TPU (or pod slice) runs as one TPUStrategy job')
      return StrategyPlan(
          kind='tpu', tpu_resolver_kwargs={'tpu': address, 'zone': tpu_zone,
                                           'project': gcp_project},
          connect_to_cluster=address != 'local', warnings=tuple(warnings))
  if _num_tasks(tf_config) > 1:
    return StrategyPlan(kind='multi_worker', warnings=tuple(warnings))
  return StrategyPlan(kind='mirrored', devices=None if num_gpus else ('/cpu:0',),
                      warnings=tuple(warnings))


def _num_tasks(tf_config):
  cluster = tf_config.get('cluster', {})
  return len(cluster.get('chief', [])) + len(cluster.get('worker', []))


def parse_tf_config(text):
  """TF_CONFIG (a json text; '' for none) as a dict; ValueError naming TF_CONFIG and what is
  wrong when it is not a cluster description."""
  try:
    tf_config = json.loads(text or '{}')
  except json.JSONDecodeError as e:
    raise ValueError(f'TF_CONFIG is not valid JSON ({e})') from None
  expected = ('expected {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", '
              '"index": i}}')
  if not isinstance(tf_config, dict):
    raise ValueError(f'TF_CONFIG is {json.dumps(tf_config)[:60]}, not a json object; {expected}')
  cluster = tf_config.get('cluster', {})
  if not isinstance(cluster, dict):
    raise ValueError(f'TF_CONFIG\'s "cluster" is {json.dumps(cluster)[:60]}; {expected}')
  for kind, addresses in cluster.items():
    if not (isinstance(addresses, list) and all(isinstance(a, str) for a in addresses)):
      raise ValueError(f'TF_CONFIG\'s cluster "{kind}" is {json.dumps(addresses)[:60]}, not a '
                       f'list of "host:port" addresses; {expected}')
  task = tf_config.get('task', {})
  if not isinstance(task, dict):
    raise ValueError(f'TF_CONFIG\'s "task" is {json.dumps(task)[:60]}; {expected}')
  return tf_config


def _tasks(tf_config):
  """[(type, index, address)] of TF_CONFIG's chief and worker tasks."""
  cluster = tf_config.get('cluster', {})
  return [(kind, index, address) for kind in ('chief', 'worker')
          for index, address in enumerate(cluster.get(kind, []))]


def _host_port(address):
  host, _, port = address.rpartition(':')
  return host.strip('[]'), int(port)


HELLO = b'sogclr-task '


def _listen(address, name, poll_seconds):
  """A socket listening at `address`'s port (a ValueError naming the task when it is taken)."""
  listener = socket.socket(socket.AF_INET6 if ':' in _host_port(address)[0] else socket.AF_INET)
  listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    listener.bind(('', _host_port(address)[1]))
  except OSError as e:
    listener.close()
    raise ValueError(f'this task ({name} of TF_CONFIG) cannot listen at {address} ({e}): the '
                     'port is taken by another program; free it or give the task another '
                     'address in TF_CONFIG (the same on every task)') from None
  listener.listen(16)
  listener.settimeout(poll_seconds)
  return listener


def _answer_peers(listener, stop, greetings, me, seen_by):
  """Until `stop`: greets back every task that connects and greets with its name (into
  `seen_by`); another client (a peer's TensorFlow, early) gets nothing."""
  while not stop.is_set():
    try:
      peer, _ = listener.accept()
    except OSError:  # the poll timed out
      continue
    with peer:
      try:
        peer.settimeout(2.0)
        line = peer.makefile('rb').readline()
        task = next((t for t, hello in greetings.items() if t != me and line == hello), None)
        if task is not None:
          peer.sendall(greetings[me])
          seen_by.add(task)
      except OSError:
        continue


def _greet(address, greeting, poll_seconds):
  """The first line `address` answers to `greeting`: b'' when it takes the connection but
  answers nothing, None when nothing takes it."""
  try:
    connection = socket.create_connection(_host_port(address), timeout=poll_seconds)
  except OSError:
    return None
  with connection:
    try:
      connection.settimeout(2.0)
      connection.sendall(greeting)
      return connection.makefile('rb').readline()
    except OSError:
      return b''


def _heard(answer):
  """What a task's address gave instead of its greeting (None: no connection)."""
  if answer is None:
    return 'nothing answers'
  if not answer:
    return 'a program takes connections there but does not answer (another program on its port?)'
  return 'something else answers there'


def _startup_error(names, addresses, others, seen, seen_by, strangers, timeout_seconds):
  silent = [t for t in others if t not in seen]
  if silent:
    what = '; '.join(
        f'{names[t]} at {addresses[t]}: ' + _heard(strangers.get(t)) for t in silent)
    advice = 'start every task TF_CONFIG lists, each with its own task index'
  else:
    what = ', '.join(f'{names[t]} has not reached this task' for t in others
                     if t not in seen_by)
    advice = 'check that every task runs the same TF_CONFIG cluster'
  return ValueError(f'the tasks of TF_CONFIG did not all start within '
                    f'--startup_timeout_seconds={timeout_seconds:g} ({what}); {advice}')


def rendezvous(tasks, me, timeout_seconds, poll_seconds=0.2):
  """Waits until every task of TF_CONFIG has started, before TensorFlow's runtime does.

  TensorFlow's own start-up waits for the other tasks inside one call that holds the
  interpreter: a missing task (or a port taken by another program) blocks it forever, deaf to
  SIGTERM. Here each task listens at its own address (the port its TensorFlow server takes
  next), greets every peer that connects with its name, and connects to every other task until
  each one has greeted it and been greeted by it; then all start TensorFlow. The wait is plain
  Python: SIGTERM ends it, and past `timeout_seconds` (0: never) it is a ValueError naming the
  tasks that did not answer, or where something else answers.

  tasks: [(type, index, 'host:port')]; me: this task's (type, index).
  """
  names = {(kind, index): f'{kind} {index}' for kind, index, _ in tasks}
  addresses = {(kind, index): address for kind, index, address in tasks}
  listener = _listen(addresses[me], names[me], poll_seconds)
  greetings = {task: HELLO + name.encode() + b'\n' for task, name in names.items()}
  others = [t for t in addresses if t != me]
  seen, seen_by, strangers = set(), set(), {}
  stop = threading.Event()
  # Answering apart from connecting: two tasks may connect to each other at once.
  answerer = threading.Thread(target=_answer_peers, args=(listener, stop, greetings, me, seen_by),
                              daemon=True, name='tf-config-rendezvous')
  answerer.start()
  deadline = time.time() + timeout_seconds if timeout_seconds else None
  try:
    while len(seen) < len(others) or len(seen_by) < len(others):
      for task in (t for t in others if t not in seen):
        answer = _greet(addresses[task], greetings[me], poll_seconds)
        if answer == greetings[task]:
          seen.add(task)
        elif answer is not None:
          strangers[task] = answer[:40]
      if deadline is not None and time.time() > deadline:
        if len(seen) < len(others) or len(seen_by) < len(others):
          raise _startup_error(names, addresses, others, seen, seen_by, strangers,
                               timeout_seconds)
      time.sleep(poll_seconds)
  finally:
    stop.set()
    answerer.join()
    listener.close()
  # Peers still greeting this task find its TensorFlow server at the port in a moment.


def wait_for_address(address, timeout_seconds, poll_seconds=1.0):
  """Waits until something accepts connections at `address` ('host:port'); past
  `timeout_seconds` (0: never) a ValueError. Plain Python: SIGTERM ends the wait."""
  deadline = time.time() + timeout_seconds if timeout_seconds else None
  while True:
    try:
      with socket.create_connection(_host_port(address), timeout=poll_seconds):
        return
    except (OSError, ValueError) as e:
      reason = e
    if deadline is not None and time.time() > deadline:
      raise ValueError(f'nothing answered at the TPU address {address} within '
                       f'--startup_timeout_seconds={timeout_seconds:g} ({reason}); check '
                       '--tpu_name/--master')
    time.sleep(poll_seconds)


def build_strategy(config=DistributionConfig()):
  """The strategy of `strategy_plan` for `config`, TF_CONFIG and the local devices.

  Call it before any other TensorFlow work: multi-worker collectives must be configured first.
  Waiting for TF_CONFIG's other tasks, or for a TPU at a grpc:// address, is bounded by
  config.startup_timeout_seconds (`rendezvous`, `wait_for_address`).
  """
  tf_config = parse_tf_config(os.environ.get('TF_CONFIG'))
  # Physical devices only: the runtime must not start before MultiWorkerMirroredStrategy.
  plan = strategy_plan(config.use_tpu, config.tpu_name, config.master, config.tpu_zone,
                       config.gcp_project,
                       tpu_attached=bool(tf.config.list_physical_devices('TPU')),
                       tf_config=tf_config, num_gpus=len(tf.config.list_physical_devices('GPU')),
                       cpu_replicas=config.cpu_replicas)
  for warning in plan.warnings:
    logging.warning('%s', warning)
  timeout = config.startup_timeout_seconds
  if plan.kind == 'tpu':
    address = plan.tpu_resolver_kwargs['tpu']
    if address.startswith('grpc://'):
      logging.info('Waiting for the TPU at %s (up to --startup_timeout_seconds=%g).', address,
                   timeout)
      wait_for_address(address[len('grpc://'):], timeout)
    # Inside TensorFlow's calls: a program that accepts connections but is no TPU server keeps
    # them waiting for ever.
    with interrupts.deadline(timeout, f'the TPU at {address} did not connect and initialize '
                             f'within --startup_timeout_seconds={timeout:g} (is a TPU serving '
                             'there?); check --tpu_name/--master'):
      try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(**plan.tpu_resolver_kwargs)
        if plan.connect_to_cluster:
          tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
      except tf.errors.OpError as e:  # another gRPC server there, a proxy's answer
        raise ValueError(f'the TPU at {address} could not be connected to and initialized '
                         f'({errors.one_line_error(e)}; is a TPU serving there?); check '
                         '--tpu_name/--master') from None
    return tf.distribute.TPUStrategy(resolver)
  if plan.kind == 'multi_worker':
    task = tf_config.get('task', {})
    me = (task.get('type'), task.get('index'))
    tasks = _tasks(tf_config)
    if me not in {(kind, index) for kind, index, _ in tasks}:
      raise ValueError(f'TF_CONFIG\'s task {task} is not one of its cluster\'s tasks')
    logging.info('Waiting for the tasks of TF_CONFIG: %s (up to --startup_timeout_seconds=%g).',
                 ', '.join(f'{kind} {index} at {address}' for kind, index, address in tasks),
                 timeout)
    rendezvous(tasks, me, timeout)
    return tf.distribute.MultiWorkerMirroredStrategy()
  if plan.split_cpu > 1:
    split_cpu(plan.split_cpu)
  return tf.distribute.MirroredStrategy(plan.devices)


def split_cpu(count):
  """Makes the host's CPU `count` logical devices (/cpu:0 ...), which must happen before the
  TensorFlow runtime starts; a process that started it with at least as many keeps them."""
  cpu = tf.config.list_physical_devices('CPU')[0]
  made = len(tf.config.get_logical_device_configuration(cpu) or ())
  if made >= count:
    return
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * count)
  except RuntimeError:  # the runtime started already (a notebook that ran TensorFlow before)
    raise ValueError(f'--cpu_replicas={count}: TensorFlow already started in this process with '
                     f'{max(made, 1)} CPU device(s), and devices cannot be added once it has; '
                     'run it in a new process') from None


def num_workers(strategy):
  """Hosts taking part in the run (1 unless MultiWorkerMirroredStrategy)."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return 1
  cluster = strategy.cluster_resolver.cluster_spec().as_dict()
  return len(cluster.get('chief', [])) + len(cluster.get('worker', []))


def num_hosts(strategy):
  """Hosts the run's replicas (and each split an evaluation reads) are spread over: the workers
  of a MultiWorkerMirroredStrategy, the hosts of a TPU pod slice, else 1. What one host's
  replicas extract is the whole split only when this is 1."""
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return strategy.extended.num_hosts
  return num_workers(strategy)


def is_chief(strategy):
  """True on the one host that writes model_dir (the chief, else worker 0)."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
    return True
  return resolver.task_type in (None, 'chief') or (
      resolver.task_type == 'worker' and resolver.task_id == 0 and
      'chief' not in resolver.cluster_spec().as_dict())


def task_id(strategy):
  """This host's task index in a multi-worker run (0 otherwise)."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  return getattr(resolver, 'task_id', None) or 0


def device_kind(strategy):
  """'TPU', 'GPU' or 'CPU': the devices the strategy computes on."""
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return 'TPU'
  return 'GPU' if tf.config.list_logical_devices('GPU') else 'CPU'


def resolve_augment_on(strategy, augment_on='auto'):
  """'host' or 'device' for --augment_on: `auto` is the device on TPUs and GPUs, where the host's
  cores run out first and per-pixel arithmetic is cheap, and the host on a CPU, where both are
  the same cores and the host path keeps the pixels of the runs the README reports."""
  if augment_on == 'auto':
    return 'host' if device_kind(strategy) == 'CPU' else 'device'
  return augment_on


def cpu_supports_bfloat16(cpuinfo_path='/proc/cpuinfo'):
  """True when the CPU computes bfloat16 dot products natively (AVX512_BF16 or AMX); without
  them TensorFlow emulates bfloat16 and it is slower than float32."""
  try:
    with open(cpuinfo_path) as f:
      flags = set(next((line.split(':', 1)[1].split() for line in f
                        if line.startswith('flags')), []))
  except OSError:
    return False
  return bool(flags & {'avx512_bf16', 'amx_bf16'})


def resolve_precision_and_jit(strategy, mixed_precision='auto', jit_compile='auto'):
  """(Keras dtype policy name, jit_compile) for --mixed_precision, --jit_compile and the device.

  On this project's reference CPU (2 AVX-512 cores with bfloat16 dot products) XLA made the
  step 1.4-4x slower and bfloat16 1.2-1.4x faster (bench/train_step.py), so a CPU with native
  bfloat16 defaults to it (the loss, u and the softmax math stay float32); other CPUs run
  float32. Accelerators get their usual fast settings.
  """
  kind = device_kind(strategy)
  precision = mixed_precision
  if precision == 'auto':
    precision = {'TPU': 'bfloat16', 'GPU': 'float16',
                 'CPU': 'bfloat16' if cpu_supports_bfloat16() else 'float32'}[kind]
  policy = 'float32' if precision == 'float32' else f'mixed_{precision}'
  jit = jit_compile == 'true' or (jit_compile == 'auto' and kind != 'CPU')
  return policy, jit
