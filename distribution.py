"""Where a run executes: the tf.distribute strategy, chief and workers, precision and XLA.

`strategy_plan` decides without touching a device (testable anywhere); `build_strategy` builds
what it decided. Nothing here reads flags: `DistributionConfig` carries the infrastructure flags.
"""
import dataclasses
import json
import os

from absl import logging
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class DistributionConfig:
  """The infrastructure flags (`run.py` fills it): TPU address, compute dtype, XLA."""
  use_tpu: bool | None = None
  tpu_name: str | None = None
  tpu_zone: str | None = None
  gcp_project: str | None = None
  master: str | None = None
  mixed_precision: str = 'auto'  # 'auto' | 'float32' | 'bfloat16' | 'float16'
  jit_compile: str = 'auto'      # 'auto' | 'true' | 'false'


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
  warnings: tuple = ()


def strategy_plan(use_tpu, tpu_name, master, tpu_zone, gcp_project, *, tpu_attached, tf_config,
                  num_gpus):
  """The strategy for the infrastructure flags and the machine, without touching a device.

  A TPU when --use_tpu=True, or when it is unset and a TPU is named or attached; its address is
  --tpu_name, else --master, else 'local' (a TPU VM's own TPU). Otherwise
  MultiWorkerMirroredStrategy when `tf_config` (TF_CONFIG, parsed) lists several chief/worker
  tasks, else MirroredStrategy over the local GPUs or the CPU.
  """
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


def build_strategy(config=DistributionConfig()):
  """The strategy of `strategy_plan` for `config`, TF_CONFIG and the local devices.

  Call it before any other TensorFlow work: multi-worker collectives must be configured first.
  """
  try:
    tf_config = json.loads(os.environ.get('TF_CONFIG') or '{}')
  except json.JSONDecodeError as e:
    raise ValueError(f'TF_CONFIG is not valid JSON ({e})') from None
  # Physical devices only: the runtime must not start before MultiWorkerMirroredStrategy.
  plan = strategy_plan(config.use_tpu, config.tpu_name, config.master, config.tpu_zone,
                       config.gcp_project,
                       tpu_attached=bool(tf.config.list_physical_devices('TPU')),
                       tf_config=tf_config, num_gpus=len(tf.config.list_physical_devices('GPU')))
  for warning in plan.warnings:
    logging.warning('%s', warning)
  if plan.kind == 'tpu':
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(**plan.tpu_resolver_kwargs)
    if plan.connect_to_cluster:
      tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
  if plan.kind == 'multi_worker':
    return tf.distribute.MultiWorkerMirroredStrategy()
  return tf.distribute.MirroredStrategy(plan.devices)


def num_workers(strategy):
  """Hosts taking part in the run (1 unless MultiWorkerMirroredStrategy)."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return 1
  cluster = strategy.cluster_resolver.cluster_spec().as_dict()
  return len(cluster.get('chief', [])) + len(cluster.get('worker', []))


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
