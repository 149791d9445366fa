r"""SimCLR and SogCLR pretraining, linear evaluation and fine-tuning: flags, strategy and loops.

The only module that reads flags. Example (the embedded demo data, a CPU):

  python run.py --train_mode=pretrain --DCL_mode=True --gamma=0.9 --model_dir=runs/sogclr \
      --dataset=digits --image_size=16 --resnet_depth=18 --width_multiplier=0.25 ...
"""
import collections
import dataclasses
import json
import math
import os
import re
import signal
import sys
import threading
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

import host_memory

host_memory.tune()  # before TensorFlow allocates anything

import tensorflow as tf  # noqa: E402  (after the malloc tuning above)

import data as data_lib
import lars_optimizer
import model as model_lib
import objective as obj_lib
import probe

FLAGS = flags.FLAGS

# -- Data ------------------------------------------------------------------------------------------
flags.DEFINE_string('dataset', 'imagenet2012',
                    "TFDS dataset name, 'name/config' or 'name:version', prepared under "
                    "--data_dir (read without its builder code); 'digits' is the embedded demo "
                    "data; see README 'Datasets'.")
flags.DEFINE_string('data_dir', None,
                    'TFDS data directory (local or gs://); default: TFDS\'s own (~/tensorflow_datasets).')
flags.DEFINE_string('train_split', 'train', 'Split to train on.')
flags.DEFINE_string('eval_split', 'validation', 'Split to evaluate on.')
flags.DEFINE_integer('num_classes', 0,
                     'Number of classes of the supervised head; 0 = read from the dataset.')
flags.DEFINE_integer('image_size', 224, 'Side of the square input images, in pixels.')
flags.DEFINE_integer('shuffle_buffer', 50_000,
                     'Encoded training images held by the per-epoch shuffle; lower it for large '
                     'images (ImageNet JPEGs are about 110 KB each).')
flags.DEFINE_bool('cache_dataset', False,
                  'Cache the encoded split in memory (good for small datasets, not ImageNet).')
flags.DEFINE_float('color_jitter_strength', 1.0,
                   'Strength s of color jitter (brightness/contrast/saturation 0.8s, hue 0.2s).')
flags.DEFINE_float('crop_area_min', 0.08,
                   'Smallest random crop, as a fraction of the image area (0, 1].')
flags.DEFINE_bool('random_flip', True,
                  'Random horizontal flips in training (pretraining and fine-tuning); turn off '
                  'where a mirror image is another class or none (digits, text).')
flags.DEFINE_bool('use_blur', True,
                  'Gaussian blur of views when pretraining (skipped for images under 32 px).')

# -- Model -----------------------------------------------------------------------------------------
flags.DEFINE_integer('resnet_depth', 50, 'ResNet depth: 18, 34, 50, 101, 152 or 200.')
flags.DEFINE_float('width_multiplier', 1.0,
                   'Width multiplier of the ResNet (fractions such as 0.25 allowed).')
flags.DEFINE_float('sk_ratio', 0.0, 'Selective-kernel ratio; > 0 enables SK (SimCLR v2: 0.0625).')
flags.DEFINE_float('se_ratio', 0.0, 'Squeeze-excitation ratio; > 0 enables SE.')
flags.DEFINE_float('batch_norm_decay', 0.9, 'Momentum of BN moving statistics.')
flags.DEFINE_bool('global_bn', True, 'Synchronize BN statistics across replicas.')
flags.DEFINE_enum('proj_head_mode', 'nonlinear', ['none', 'linear', 'nonlinear'],
                  'Projection head type.')
flags.DEFINE_integer('num_proj_layers', 3, 'Layers of the nonlinear projection head.')
flags.DEFINE_integer('proj_out_dim', 128, 'Output dimension of the projection head.')
flags.DEFINE_integer('ft_proj_selector', 0,
                     'Projection-head layer whose output feeds the linear head when fine-tuning: '
                     '0 = trunk features, -1 = the last layer.')
flags.DEFINE_bool('lineareval_while_pretraining', True,
                  'Train a linear head on stop-gradient trunk features while pretraining.')
flags.DEFINE_integer('fine_tune_after_block', -1,
                     'Fine-tune only after this trunk block: -1 everything, 0 after the stem, '
                     '1-3 after that block group, 4 only the linear head.')
flags.DEFINE_bool('zero_init_logits_layer', False, 'Initialize the linear head to zeros.')
flags.DEFINE_bool('supervised_head_bn', True,
                  'Batch-normalize (no scale or offset) the features of the linear head, as MAE '
                  'and MoCo v3 do for linear probing; still a linear classifier at inference.')

# -- Objective -------------------------------------------------------------------------------------
flags.DEFINE_enum('loss', None, ['simclr', 'sogclr'],
                  'Contrastive loss; unset = SogCLR unless an alias below says otherwise.')
flags.DEFINE_bool('DCL_mode', None, 'Alias of --loss: True = sogclr, False = simclr.')
flags.DEFINE_bool('GCL_mode', None, 'Alias of --loss: True = sogclr, False = simclr.')
flags.DEFINE_bool('BI_mode', None,
                  'Alias of --loss ("batch-independent"): True = sogclr, False = simclr.')
flags.DEFINE_float('temperature', 0.1, 'Temperature tau of the contrastive loss (> 0).')
flags.DEFINE_float('gamma', 0.9,
                   "SogCLR's moving-average weight of the new estimate of u, in (0, 1].")
flags.DEFINE_bool('hidden_norm', True, 'L2-normalise projections (cosine similarity).')

# -- Optimization ----------------------------------------------------------------------------------
flags.DEFINE_enum('optimizer', 'lars', ['lars', 'momentum', 'adam'],
                  "Optimizer. SogCLR's gradient carries a factor tau: with plain momentum SGD "
                  'scale the learning rate by 1/temperature to compare with SimCLR.')
flags.DEFINE_float('learning_rate', 0.3,
                   'Base learning rate, scaled by --learning_rate_scaling.')
flags.DEFINE_enum('learning_rate_scaling', 'linear', ['linear', 'sqrt'],
                  'Peak lr = learning_rate * batch/256 (linear) or * sqrt(batch) (sqrt).')
flags.DEFINE_float('warmup_epochs', 10, 'Linear warm-up, in epochs; then cosine decay to 0.')
flags.DEFINE_float('weight_decay', 1e-6,
                   'L2 weight decay (per unit of 0.5*||w||^2); BN and biases excluded. Also '
                   "the factor of eval/regularization_loss: --mode=eval takes the training "
                   "run's from model_dir/flags.json unless given.")
flags.DEFINE_float('momentum', 0.9, 'Momentum of LARS and SGD.')

# -- Loop ------------------------------------------------------------------------------------------
flags.DEFINE_enum('train_mode', 'pretrain', ['pretrain', 'finetune'],
                  'pretrain: contrastive learning; finetune: supervised, from --checkpoint.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'train_then_eval'],
                  'Train (evaluating at the end), evaluate, or both. eval restores only the '
                  'model of each checkpoint in --model_dir and takes the model, data, '
                  "--weight_decay and training-length flags not given from the training run's "
                  'flags.json (README "Evaluate and fine-tune").')
flags.DEFINE_integer('train_batch_size', 512, 'Global training batch size, in images.')
flags.DEFINE_integer('train_epochs', 100, 'Training length, in epochs.')
flags.DEFINE_integer('train_steps', 0, 'Training length, in steps; > 0 overrides train_epochs.')
flags.DEFINE_integer('eval_batch_size', 256, 'Global evaluation batch size, in images.')
flags.DEFINE_integer('eval_steps', 0, 'Evaluation steps; 0 = the whole eval split.')
flags.DEFINE_integer('eval_timeout_seconds', 3600,
                     '--mode=eval: seconds to wait for a new checkpoint before exiting.')
flags.DEFINE_integer('checkpoint_epochs', 1, 'Epochs between checkpoints.')
flags.DEFINE_integer('checkpoint_steps', 0,
                     'Steps between checkpoints; > 0 overrides checkpoint_epochs.')
flags.DEFINE_integer('keep_checkpoint_max', 5, 'Checkpoints kept in model_dir.')
flags.DEFINE_integer('keep_hub_module_max', 1,
                     'SavedModel exports kept in model_dir/saved_model/<step>, written at the '
                     'end of training and after each checkpoint --mode=eval evaluates '
                     '(0 = no export).')
flags.DEFINE_string('model_dir', None, 'Directory for checkpoints, summaries and flags.json.')
flags.DEFINE_string('checkpoint', None,
                    'Checkpoint (prefix or directory) or SavedModel export '
                    '(model_dir/saved_model/<step>) to initialize from when model_dir has none.')
flags.DEFINE_integer('seed', 0, 'Seed of initialization, data order and augmentations.')
flags.DEFINE_bool('deterministic', False,
                  'Deterministic ops and input order (slower): the same run twice gives the '
                  'same weights.')
flags.DEFINE_float('log_every_seconds', 5.0, 'Seconds of training between progress lines.')
flags.DEFINE_integer('probe_max_examples', 20_000,
                     'After pretraining, fit a logistic-regression probe on frozen features when '
                     'the train split has at most this many images (0 = never).')
flags.DEFINE_bool('probe_baselines', True,
                  'With the probe, also report raw-pixel and random-network probes.')
flags.DEFINE_bool('knn_monitor', False,
                  'Every evaluation also reports the top-1 of a weighted kNN classifier on '
                  'trunk features, eval split against train split (holds the train split\'s '
                  'features in host memory: images x feature size floats).')
flags.DEFINE_integer('knn_k', 200, 'Neighbours voting in the kNN monitor.')
flags.DEFINE_float('knn_temperature', 0.1,
                   'Temperature T of the kNN monitor: votes weigh exp(cosine similarity / T).')

flags.DEFINE_enum('mixed_precision', 'auto', ['auto', 'float32', 'bfloat16', 'float16'],
                  'Compute dtype of the network (variables, loss, u and softmax stay float32); '
                  'float16 adds loss scaling. auto: bfloat16 on TPU and on CPUs with native '
                  'bfloat16 (AVX512_BF16/AMX), float16 on GPU, float32 on other CPUs.')
flags.DEFINE_enum('jit_compile', 'auto', ['auto', 'true', 'false'],
                  'Compile the train step with XLA. auto: on for TPU and GPU, off on CPU.')

# -- Infrastructure --------------------------------------------------------------------------------
flags.DEFINE_bool('use_tpu', None,
                  'Run on a TPU; unset = a TPU if one is named (--tpu_name, --master) or attached, '
                  'else all local GPUs, else CPU.')
flags.DEFINE_string('tpu_name', None, 'Cloud TPU name or grpc:// address.')
flags.DEFINE_string('tpu_zone', None,
                    'GCE zone of the Cloud TPU named by --tpu_name (default: detected).')
flags.DEFINE_string('gcp_project', None,
                    'GCP project of the Cloud TPU named by --tpu_name (default: detected).')
flags.DEFINE_string('master', None,
                    'TensorFlow master address (a TPU grpc:// address), when --tpu_name is unset.')


def resolve_loss(loss, aliases):
  """The canonical loss from --loss and the alias flags; disagreeing flags are an error.

  aliases: {flag name: True/False/None}, True meaning SogCLR.
  """
  chosen = {}
  if loss is not None:
    chosen['loss'] = loss
  for name, value in aliases.items():
    if value is not None:
      chosen[name] = 'sogclr' if value else 'simclr'
  if len(set(chosen.values())) > 1:
    given = ', '.join(f'--{k}={v}' for k, v in chosen.items())
    raise ValueError(f'Conflicting loss flags ({given}); set them to agree or keep only one')
  return next(iter(chosen.values()), 'sogclr')


def validate_flags():
  """Cross-flag checks, before anything is built."""
  if not FLAGS.model_dir:
    raise ValueError('--model_dir is required (checkpoints, summaries and flags.json go there)')
  if FLAGS.temperature <= 0:
    raise ValueError(f'--temperature must be positive, got {FLAGS.temperature}')
  if not 0 < FLAGS.gamma <= 1:
    raise ValueError(f'--gamma must be in (0, 1], got {FLAGS.gamma}')
  if not 0 < FLAGS.crop_area_min <= 1:
    raise ValueError(f'--crop_area_min must be in (0, 1], got {FLAGS.crop_area_min}')
  if FLAGS.width_multiplier <= 0:
    raise ValueError(f'--width_multiplier must be positive, got {FLAGS.width_multiplier}')
  for name in ('train_batch_size', 'eval_batch_size', 'image_size', 'keep_checkpoint_max',
               'knn_k'):
    if FLAGS[name].value <= 0:
      raise ValueError(f'--{name} must be positive, got {FLAGS[name].value}')
  if FLAGS.knn_temperature <= 0:
    raise ValueError(f'--knn_temperature must be positive, got {FLAGS.knn_temperature}')
  if FLAGS.keep_hub_module_max < 0:
    raise ValueError(f'--keep_hub_module_max must be >= 0 (0 = no export), got '
                     f'{FLAGS.keep_hub_module_max}')
  if FLAGS.train_mode == 'finetune' and FLAGS.mode != 'eval' and not FLAGS.checkpoint:
    logging.warning('--train_mode=finetune without --checkpoint trains from scratch.')
  # The standard stem divides the image by 32, the CIFAR stem by 8.
  min_size = 8 if FLAGS.image_size <= data_lib.SMALL_IMAGE_SIZE else 32
  if FLAGS.image_size < min_size:
    raise ValueError(f'--image_size={FLAGS.image_size} is too small for the ResNet '
                     f'(at least {min_size} px)')


def check_batch_size(global_batch_size, num_replicas, num_examples, split):
  if global_batch_size % num_replicas:
    raise ValueError(f'--train_batch_size={global_batch_size} is not divisible by the '
                     f'{num_replicas} replicas; use a multiple of {num_replicas}')
  if global_batch_size > num_examples:
    raise ValueError(f'--train_batch_size={global_batch_size} is larger than split {split!r} '
                     f'({num_examples} images)')


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


def build_strategy():
  """The strategy of `strategy_plan` for the flags, TF_CONFIG and the local devices."""
  try:
    tf_config = json.loads(os.environ.get('TF_CONFIG') or '{}')
  except json.JSONDecodeError as e:
    raise ValueError(f'TF_CONFIG is not valid JSON ({e})') from None
  # Physical devices only: the runtime must not start before MultiWorkerMirroredStrategy.
  plan = strategy_plan(FLAGS.use_tpu, FLAGS.tpu_name, FLAGS.master, FLAGS.tpu_zone,
                       FLAGS.gcp_project,
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
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return 1
  cluster = strategy.cluster_resolver.cluster_spec().as_dict()
  return len(cluster.get('chief', [])) + len(cluster.get('worker', []))


def is_chief(strategy):
  resolver = getattr(strategy, 'cluster_resolver', None)
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
    return True
  return resolver.task_type in (None, 'chief') or (
      resolver.task_type == 'worker' and resolver.task_id == 0 and
      'chief' not in resolver.cluster_spec().as_dict())


def device_kind(strategy):
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return 'TPU'
  return 'GPU' if tf.config.list_logical_devices('GPU') else 'CPU'


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


def resolve_precision_and_jit(strategy):
  """(Keras dtype policy name, jit_compile) from the flags and the device.

  On this project's reference CPU (2 AVX-512 cores with bfloat16 dot products) XLA made the
  step 1.4-4x slower and bfloat16 1.2-1.4x faster (bench/train_step.py), so a CPU with native
  bfloat16 defaults to it (the loss, u and the softmax math stay float32); other CPUs run
  float32. Accelerators get their usual fast settings.
  """
  kind = device_kind(strategy)
  precision = FLAGS.mixed_precision
  if precision == 'auto':
    precision = {'TPU': 'bfloat16', 'GPU': 'float16',
                 'CPU': 'bfloat16' if cpu_supports_bfloat16() else 'float32'}[kind]
  policy = 'float32' if precision == 'float32' else f'mixed_{precision}'
  jit = FLAGS.jit_compile == 'true' or (FLAGS.jit_compile == 'auto' and kind != 'CPU')
  return policy, jit


def model_config(num_classes):
  return model_lib.ModelConfig(
      resnet_depth=FLAGS.resnet_depth, width_multiplier=FLAGS.width_multiplier,
      cifar_stem=FLAGS.image_size <= data_lib.SMALL_IMAGE_SIZE, sk_ratio=FLAGS.sk_ratio,
      se_ratio=FLAGS.se_ratio, batch_norm_decay=FLAGS.batch_norm_decay,
      global_bn=FLAGS.global_bn, proj_head_mode=FLAGS.proj_head_mode,
      num_proj_layers=FLAGS.num_proj_layers, proj_out_dim=FLAGS.proj_out_dim,
      num_classes=num_classes, train_mode=FLAGS.train_mode,
      lineareval_while_pretraining=FLAGS.lineareval_while_pretraining,
      ft_proj_selector=FLAGS.ft_proj_selector,
      fine_tune_after_block=FLAGS.fine_tune_after_block,
      zero_init_logits_layer=FLAGS.zero_init_logits_layer,
      supervised_head_bn=FLAGS.supervised_head_bn)


def build_model(config, image_size):
  """The model with its variables created (call under the strategy's scope)."""
  model = model_lib.ContrastiveModel(config)
  model(tf.zeros([2, image_size, image_size, 3]), training=False)
  return model


class Trainer:
  """Owns the train step and the many-steps-per-call loop; `run.py`'s loop does bookkeeping."""

  def __init__(self, strategy, model, optimizer, *, loss, temperature, hidden_norm,
               weight_decay, optimizer_name, sogclr=None, jit_compile=False):
    self.strategy = strategy
    self.model = model
    self.optimizer = optimizer
    self.loss = loss
    self.temperature = temperature
    self.hidden_norm = hidden_norm
    self.weight_decay = weight_decay
    self.decay_in_loss = not lars_optimizer.decays_inside(optimizer_name)
    self.sogclr = sogclr
    self.pretrain = model.config.train_mode == 'pretrain'
    self.loss_scaling = isinstance(optimizer, tf.keras.optimizers.LossScaleOptimizer)
    # XLA compiles the per-replica step; the loop around it stays a plain tf.function.
    self._step = (tf.function(self.train_step, jit_compile=True) if jit_compile
                  else self.train_step)
    self._loop = tf.function(self._train_loop)

  def train_step(self, views, labels, ids):
    """One per-replica step; returns a dict of scalar metrics (means over the local batch)."""
    images = tf.concat(views, 0)
    metrics = {}
    with tf.GradientTape() as tape:
      outputs = self.model(images, training=True)
      total = 0.0
      if self.pretrain:
        projection_a, projection_b = tf.split(outputs['projection'], 2, 0)
        if self.loss == 'sogclr':
          result = self.sogclr(projection_a, projection_b, ids)
          contrastive, logits_a = result['loss'], result['logits_a']
          positive_mask = result['positive_mask']
          metrics['contrast_loss'] = result['nt_xent']
          metrics['log_u_mean'] = result['log_u_mean']
        else:
          contrastive, logits_a, positive_mask = obj_lib.nt_xent_loss(
              projection_a, projection_b, self.temperature, self.hidden_norm)
          metrics['contrast_loss'] = contrastive
        metrics['contrast_acc'], metrics['contrast_entropy'] = obj_lib.contrast_metrics(
            logits_a, positive_mask)
        metrics['contrastive_objective'] = contrastive
        total += contrastive
      if 'supervised_logits' in outputs:
        repeated_labels = tf.concat([labels] * len(views), 0)
        logits = outputs['supervised_logits']
        supervised = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(
            labels=repeated_labels, logits=logits))
        metrics['supervised_loss'] = supervised
        metrics['supervised_acc'] = tf.reduce_mean(tf.cast(tf.equal(
            tf.argmax(logits, 1), tf.argmax(repeated_labels, 1)), tf.float32))
        total += supervised
      if self.decay_in_loss:
        weight_decay = lars_optimizer.weight_decay_loss(
            self.model.trainable_variables, self.weight_decay)
        metrics['weight_decay'] = weight_decay
        total += weight_decay
      metrics['total_loss'] = total
      # apply_gradients sums over replicas.
      scaled = total / self.strategy.num_replicas_in_sync
      if self.loss_scaling:  # float16: apply_gradients unscales.
        scaled = self.optimizer.scale_loss(scaled)
    variables = self.model.trainable_variables
    gradients = tape.gradient(scaled, variables)
    self.optimizer.apply_gradients(zip(gradients, variables))
    return metrics

  def _replicated_step(self, iterator):
    per_replica = self.strategy.run(self._step, args=next(iterator))
    return {k: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
            for k, v in per_replica.items()}

  def _train_loop(self, iterator, num_steps):
    """Runs `num_steps` >= 1 steps; returns each metric's mean over them (and replicas).

    Under LARS (decay inside the optimizer) `weight_decay` is the penalty of the final weights.
    """
    totals = self._replicated_step(iterator)
    for _ in tf.range(num_steps - 1):
      step = self._replicated_step(iterator)
      totals = {k: totals[k] + step[k] for k in totals}
    means = {k: v / tf.cast(num_steps, tf.float32) for k, v in totals.items()}
    if not self.decay_in_loss:
      # The optimizer decays the weights itself: the penalty is only reported, from the weights
      # after the last step, once per call instead of one pass over every kernel per step.
      means['weight_decay'] = lars_optimizer.weight_decay_loss(
          self.model.trainable_variables, self.weight_decay)
    return means

  def train_loop(self, iterator, num_steps):
    return self._loop(iterator, tf.constant(num_steps, tf.int32))

  @tf.function
  def _all_finite(self):
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(v))
                          for v in self.model.trainable_variables])

  def weights_are_finite(self):
    return bool(self._all_finite())


def format_duration(seconds):
  seconds = int(max(seconds, 0))
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  return f'{seconds // 60}m{seconds % 60:02d}s'


class Preempted(Exception):
  """Training stopped early on request (SIGTERM); a checkpoint of the last step was saved."""


def train(trainer, iterator, *, total_steps, checkpoint_every, checkpoint_manager,
          summary_writer, global_batch_size, log_every_seconds=5.0, learning_rate_fn=None,
          stop_requested=None):
  """The outer loop: bookkeeping at loop boundaries, the steps inside `trainer.train_loop`.

  Never overshoots `total_steps`; checkpoints every `checkpoint_every` steps and at the end;
  raises FloatingPointError naming the step range when a loss is not finite (the last good
  checkpoint stays). When `stop_requested` (a threading.Event) is set, saves a checkpoint at the
  next loop boundary and raises Preempted.
  """
  optimizer = trainer.optimizer
  step = int(optimizer.iterations.numpy())
  start_step = step
  steps_per_call = 1
  seconds_per_step = None
  last_log = time.time()
  train_started = time.time()
  while step < total_steps:
    next_checkpoint = (step // checkpoint_every + 1) * checkpoint_every
    num_steps = min(steps_per_call, total_steps - step, next_checkpoint - step)
    started = time.time()
    metrics = {k: float(v) for k, v in trainer.train_loop(iterator, num_steps).items()}
    elapsed = time.time() - started
    previous, step = step, int(optimizer.iterations.numpy())
    assert step == previous + num_steps, (previous, num_steps, step)
    bad = [k for k, v in metrics.items() if not math.isfinite(v) and k != 'log_u_mean']
    if bad:
      raise FloatingPointError(
          f'Non-finite {", ".join(bad)} between steps {previous + 1} and {step}; the last good '
          f'checkpoint ({checkpoint_manager.latest_checkpoint}) is kept. Lower --learning_rate '
          'or raise --temperature.')
    if previous > start_step or steps_per_call > 1:  # The first call includes tracing.
      per_step = elapsed / num_steps
      seconds_per_step = per_step if seconds_per_step is None else (
          0.7 * seconds_per_step + 0.3 * per_step)
      # Calls of about a second: few host round-trips, yet progress and summaries stay fresh.
      steps_per_call = int(np.clip(1.0 / seconds_per_step, 1, 1000))
    else:
      steps_per_call = 2
    # Summaries are float32: u itself is logged while it fits (u ~ exp(1/temperature)); its
    # log always.
    if metrics.get('log_u_mean', math.inf) < math.log(np.finfo(np.float32).max):
      metrics['u_mean'] = math.exp(metrics['log_u_mean'])
    if learning_rate_fn is not None:
      metrics['learning_rate'] = float(learning_rate_fn(step))
    if summary_writer is not None:
      with summary_writer.as_default(step=step):
        for name, value in metrics.items():
          tf.summary.scalar(f'train/{name}', value)
    preempted = stop_requested is not None and stop_requested.is_set()
    if step == next_checkpoint or step == total_steps or preempted:
      # A finite loss was computed before the last update: the weights can still have blown up.
      if not trainer.weights_are_finite():
        raise FloatingPointError(
            f'Non-finite weights between steps {previous + 1} and {step}; the last good '
            f'checkpoint ({checkpoint_manager.latest_checkpoint}) is kept. Lower '
            '--learning_rate.')
      checkpoint_manager.save(checkpoint_number=step)
    if preempted:
      if summary_writer is not None:
        summary_writer.flush()
      raise Preempted(f'Stopped at step {step}/{total_steps} on request; checkpoint saved to '
                      f'{checkpoint_manager.latest_checkpoint}. Rerun the same command to resume.')
    now = time.time()
    if now - last_log >= log_every_seconds or step == total_steps:
      last_log = now
      rate = global_batch_size / seconds_per_step if seconds_per_step else float('nan')
      eta = (total_steps - step) * seconds_per_step if seconds_per_step else 0
      parts = [f'step {step}/{total_steps}', f"loss {metrics['total_loss']:.4f}"]
      for key, label in (('contrast_loss', 'nt_xent'), ('contrast_acc', 'contrast_acc'),
                         ('supervised_acc', 'sup_acc'), ('log_u_mean', 'log_u_mean')):
        if key in metrics:
          parts.append(f'{label} {metrics[key]:.4g}')
      if seconds_per_step:
        parts += [f'{rate:.0f} img/s', f'ETA {format_duration(eta)}']
      logging.info('  '.join(parts))
  if summary_writer is not None:
    summary_writer.flush()
  return time.time() - train_started


def evaluate(strategy, model, dataset, num_steps=0):
  """Top-1/top-5 of the supervised head over the whole dataset (or `num_steps` batches)."""

  def batch_sums(images, labels):
    logits = model(images, training=False)['supervised_logits']
    targets = tf.argmax(labels, 1)
    return {
        'top_1': tf.reduce_sum(tf.cast(tf.math.in_top_k(targets, logits, 1), tf.float32)),
        'top_5': tf.reduce_sum(tf.cast(tf.math.in_top_k(
            targets, logits, min(5, logits.shape[-1])), tf.float32)),
        'count': tf.cast(tf.shape(logits)[0], tf.float32),
    }

  def eval_step(views, labels, ids):
    del ids
    zeros = {k: tf.constant(0.0) for k in ('top_1', 'top_5', 'count')}
    return _unless_empty(views[0], lambda: batch_sums(views[0], labels), lambda: zeros)

  @tf.function(reduce_retracing=True)
  def run(inputs):
    per_replica = strategy.run(eval_step, args=inputs)
    return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
            for k, v in per_replica.items()}

  sums = {'top_1': 0.0, 'top_5': 0.0, 'count': 0.0}
  for i, inputs in enumerate(dataset):
    if num_steps and i >= num_steps:
      break
    for k, v in run(inputs).items():
      sums[k] += float(v)
  count = max(sums['count'], 1.0)
  return {'top_1': sums['top_1'] / count, 'top_5': sums['top_5'] / count,
          'num_examples': int(sums['count'])}


def _unless_empty(images, compute, empty):
  """compute() on a replica's batch, or empty() when it has no images.

  The last step of a split that does not fill every replica gives some replicas an empty batch;
  oneDNN's CPU convolution returns a wrongly shaped output for it (TF 2.21), which the next
  BatchNormalization rejects.
  """
  return tf.cond(tf.shape(images)[0] > 0, compute, empty)


def extract_features(strategy, model, dataset):
  """(features [N, C], labels [N]) of the trunk over a non-repeating dataset."""

  def replica_features(views, labels):
    empty = (tf.zeros([0, model.trunk.output_dim]), tf.zeros([0], tf.int64))
    return _unless_empty(
        views[0], lambda: (model(views[0], training=False)['features'], tf.argmax(labels, 1)),
        lambda: empty)

  # The last batch is smaller: one more trace, not one per call.
  @tf.function(reduce_retracing=True)
  def run(inputs):
    views, labels, _ = inputs
    return strategy.run(replica_features, args=(views, labels))

  features, labels = [], []
  for inputs in dataset:
    f, l = run(inputs)
    features += [x.numpy() for x in strategy.experimental_local_results(f)]
    labels += [x.numpy() for x in strategy.experimental_local_results(l)]
  return np.concatenate(features), np.concatenate(labels)


# Flags that define the network (and so the checkpoint's variables).
ARCHITECTURE_FLAGS = ('resnet_depth', 'width_multiplier', 'sk_ratio', 'se_ratio', 'image_size',
                      'proj_head_mode', 'num_proj_layers', 'proj_out_dim')


# Further flags an evaluation depends on: which heads the model has and which variables train
# (so eval/regularization_loss), the data, the weight decay and the training length (the final
# step, after which --mode=eval exits).
EVAL_FLAGS = ('train_mode', 'lineareval_while_pretraining', 'ft_proj_selector',
              'fine_tune_after_block', 'num_classes', 'dataset', 'data_dir', 'train_split',
              'eval_split', 'weight_decay', 'train_batch_size', 'train_epochs', 'train_steps',
              'mixed_precision', 'supervised_head_bn')


def inherit_flags(path, names=ARCHITECTURE_FLAGS):
  """Takes the flags `names` not given on the command line from the training run's flags.json
  in directory `path` (or next to checkpoint prefix `path`; an export holds one), so
  fine-tuning needs only --checkpoint and --mode=eval only --model_dir."""
  directory = path if tf.io.gfile.isdir(path) else os.path.dirname(path)
  flags_file = os.path.join(directory, 'flags.json')
  if not tf.io.gfile.exists(flags_file):
    return
  with tf.io.gfile.GFile(flags_file) as f:
    trained = json.load(f)
  for name in names:
    if not FLAGS[name].present and name in trained and FLAGS[name].value != trained[name]:
      logging.info('--%s=%s from %s', name, trained[name], flags_file)
      FLAGS[name].value = trained[name]


def main(argv):
  """Runs the job the flags describe; returns its results dict."""
  try:
    return _main(argv)
  finally:
    # The compute policy is process-global: a caller (a notebook, the tests) gets float32 back.
    tf.keras.mixed_precision.set_global_policy('float32')


def _main(argv):
  del argv
  if FLAGS.mode == 'eval' and FLAGS.model_dir:
    inherit_flags(FLAGS.model_dir, ARCHITECTURE_FLAGS + EVAL_FLAGS)
  elif FLAGS.checkpoint and FLAGS.train_mode == 'finetune':
    inherit_flags(FLAGS.checkpoint)
  validate_flags()
  loss = resolve_loss(FLAGS.loss, {'DCL_mode': FLAGS.DCL_mode, 'GCL_mode': FLAGS.GCL_mode,
                                    'BI_mode': FLAGS.BI_mode})
  if FLAGS.deterministic:
    tf.config.experimental.enable_op_determinism()

  # First: multi-worker collectives must be configured before any other TensorFlow work.
  strategy = build_strategy()
  builder = data_lib.get_builder(FLAGS.dataset, FLAGS.data_dir)
  info = data_lib.describe(builder, FLAGS.train_split, FLAGS.eval_split, FLAGS.num_classes)
  # Seeded after the data is prepared: preparing it draws from the global random generators.
  tf.keras.utils.set_random_seed(FLAGS.seed)
  # The global TF seed stays seed + 1, as in the runs the README reports (an older workaround;
  # data.py's shuffles now seed themselves from --seed alone).
  tf.random.set_seed(FLAGS.seed + 1)
  chief = is_chief(strategy)
  # Only pretraining uses a contrastive loss (an evaluation job does not even know the run's).
  if FLAGS.mode == 'eval':
    loss_text = 'n/a (eval)'
  else:
    loss_text = loss if FLAGS.train_mode == 'pretrain' else 'n/a (finetune)'
  logging.info('Strategy %s with %d replica(s); loss %s; dataset %s: %d train / %d eval images, '
               '%d classes', type(strategy).__name__, strategy.num_replicas_in_sync, loss_text,
               info.name, info.num_train_examples, info.num_eval_examples, info.num_classes)
  check_batch_size(FLAGS.train_batch_size, strategy.num_replicas_in_sync,
                   info.num_train_examples, FLAGS.train_split)
  if FLAGS.knn_monitor and not info.label_key:
    raise ValueError(f'--knn_monitor needs labels; dataset {info.name!r} has none')
  write_dir = prepare_write_dir(strategy, chief)

  steps_per_epoch = data_lib.steps_per_epoch(info.num_train_examples, FLAGS.train_batch_size)
  total_steps = FLAGS.train_steps or FLAGS.train_epochs * steps_per_epoch
  warmup_steps = int(round(FLAGS.warmup_epochs * steps_per_epoch))
  if warmup_steps > total_steps:
    logging.warning('Warm-up (%d steps) is longer than training (%d steps); shortened.',
                    warmup_steps, total_steps)
    warmup_steps = total_steps
  policy, jit_compile = resolve_precision_and_jit(strategy)
  tf.keras.mixed_precision.set_global_policy(policy)
  logging.info('Compute dtype policy %s; XLA %s.', policy, 'on' if jit_compile else 'off')
  with strategy.scope():
    model = build_model(model_config(info.num_classes), FLAGS.image_size)
  if FLAGS.mode == 'eval':
    # Restores only the model, checkpoint by checkpoint; leaves the training run's flags alone.
    summary_writer = (tf.summary.create_file_writer(FLAGS.model_dir) if chief
                      else tf.summary.create_noop_writer())
    return evaluate_checkpoints(strategy, model, builder, info, summary_writer, total_steps,
                                write_dir=write_dir, chief=chief)
  with strategy.scope():
    learning_rate = lars_optimizer.WarmUpAndCosineDecay(
        FLAGS.learning_rate, FLAGS.train_batch_size, FLAGS.learning_rate_scaling,
        warmup_steps, total_steps)
    optimizer = lars_optimizer.build_optimizer(
        FLAGS.optimizer, learning_rate, momentum=FLAGS.momentum, weight_decay=FLAGS.weight_decay)
    if policy == 'mixed_float16':
      optimizer = tf.keras.optimizers.LossScaleOptimizer(optimizer)
    # Built here, not lazily inside the first traced step (Keras 3 cannot under a strategy).
    optimizer.build(model.trainable_variables)
    sogclr = None
    if FLAGS.train_mode == 'pretrain' and loss == 'sogclr':
      sogclr = obj_lib.SogCLRLoss(info.num_train_examples, FLAGS.temperature, FLAGS.gamma,
                                  FLAGS.hidden_norm)
    checkpoint_manager = restore_or_initialize(model, optimizer, sogclr, write_dir)

  # After the restore: flags that cannot resume this model_dir never overwrite it.
  if chief:
    with tf.io.gfile.GFile(os.path.join(FLAGS.model_dir, 'flags.json'), 'w') as f:
      # The contrastive loss the aliases resolved to; fine-tuning trains cross-entropy only.
      resolved = loss if FLAGS.train_mode == 'pretrain' else 'cross_entropy'
      json.dump(_flag_values() | {'resolved_loss': resolved}, f, indent=2, sort_keys=True)
  summary_writer = (tf.summary.create_file_writer(FLAGS.model_dir) if chief
                    else tf.summary.create_noop_writer())
  initial_step = int(optimizer.iterations.numpy())
  dataset = data_lib.build_distributed_dataset(
      strategy, builder, info, train_input_config(initial_step), info.num_classes)
  trainer = Trainer(strategy, model, optimizer, loss=loss, temperature=FLAGS.temperature,
                    hidden_norm=FLAGS.hidden_norm, weight_decay=FLAGS.weight_decay,
                    optimizer_name=FLAGS.optimizer, sogclr=sogclr, jit_compile=jit_compile)
  logging.info('Training %s from step %d to %d (%d steps/epoch, warm-up %d steps).',
               FLAGS.train_mode, initial_step, total_steps, steps_per_epoch, warmup_steps)
  stop_requested = threading.Event()
  with _stop_on_sigterm(stop_requested):
    seconds = train(
        trainer, iter(dataset), total_steps=total_steps,
        checkpoint_every=FLAGS.checkpoint_steps or max(
            1, FLAGS.checkpoint_epochs * steps_per_epoch),
        checkpoint_manager=checkpoint_manager, summary_writer=summary_writer,
        global_batch_size=FLAGS.train_batch_size, log_every_seconds=FLAGS.log_every_seconds,
        learning_rate_fn=learning_rate, stop_requested=stop_requested)
  results = {'train_seconds': round(seconds, 1)}
  step = int(optimizer.iterations.numpy())
  export(model, step, write_dir, chief)
  if not chief:
    tf.io.gfile.rmtree(write_dir)
  # Features of the final model, extracted once for the kNN monitor and the probe.
  features = {}
  results.update(run_evaluation(strategy, model, builder, info, summary_writer, step, features))
  logging.info('Final state at step %d: %s', step, state_fingerprint(model, sogclr))
  # The probe fits on the features one host sees: multi-worker runs skip it.
  if FLAGS.train_mode == 'pretrain' and num_workers(strategy) == 1:
    results.update(run_probe(strategy, model, builder, info, features))
  if chief:
    write_results(FLAGS.model_dir, step, results)
  return results


def prepare_write_dir(strategy, chief):
  """The directory this worker saves into, checked writable before anything is built.

  Non-chief workers of a multi-worker job save checkpoints (saving is collective) into a
  temporary directory of their own, deleted at the end, as TensorFlow documents.
  """
  write_dir = FLAGS.model_dir if chief else os.path.join(
      FLAGS.model_dir, f'.worker_{strategy.cluster_resolver.task_id}_tmp')
  try:
    tf.io.gfile.makedirs(write_dir)
    probe_file = os.path.join(write_dir, f'.write_test_{os.getpid()}')
    with tf.io.gfile.GFile(probe_file, 'w') as f:
      f.write('')
    tf.io.gfile.remove(probe_file)
  except (OSError, tf.errors.OpError) as e:
    raise ValueError(f'--model_dir={FLAGS.model_dir!r} is not writable: '
                     f'{getattr(e, "message", e)}') from None
  return write_dir


def restore_or_initialize(model, optimizer, sogclr, write_dir):
  """Resumes from model_dir first (the same run, restarted); only then from --checkpoint.

  Returns the CheckpointManager that saves model, optimizer (with the step) and SogCLR's u.
  """
  trackables = {'model': model, 'optimizer': optimizer}
  if sogclr is not None:
    trackables['sogclr'] = sogclr
  checkpoint = tf.train.Checkpoint(**trackables)
  manager = tf.train.CheckpointManager(checkpoint, write_dir,
                                       max_to_keep=FLAGS.keep_checkpoint_max)
  latest = tf.train.latest_checkpoint(FLAGS.model_dir)
  if latest:
    try:
      checkpoint.restore(latest).assert_existing_objects_matched()
    except (ValueError, AssertionError) as e:
      raise ValueError(
          f'--model_dir={FLAGS.model_dir!r} holds a checkpoint of another configuration '
          f'({str(e).splitlines()[0][:300]}); resume with the flags in its flags.json or use '
          'a new --model_dir') from None
    # The state restored (u included), comparable with the 'Final state' line of any run.
    logging.info('Resumed from %s at step %d: %s', latest, int(optimizer.iterations.numpy()),
                 state_fingerprint(model, sogclr))
  elif FLAGS.checkpoint:
    restore_pretrained(model, FLAGS.checkpoint)
    if FLAGS.zero_init_logits_layer and model.has_supervised_head:
      # After the restore, or the pretraining run's head would overwrite the zeros.
      for variable in model.supervised_head.weights:
        variable.assign(tf.zeros_like(variable))
  return manager


def train_input_config(initial_step):
  pretrain = FLAGS.train_mode == 'pretrain'
  return data_lib.InputConfig(
      split=FLAGS.train_split, global_batch_size=FLAGS.train_batch_size,
      image_size=FLAGS.image_size, is_training=True, num_views=2 if pretrain else 1,
      # SimCLR fine-tunes with crops and flips only.
      color_distort=pretrain, color_jitter_strength=FLAGS.color_jitter_strength,
      crop_area_min=FLAGS.crop_area_min, random_flip=FLAGS.random_flip,
      use_blur=FLAGS.use_blur and pretrain,
      cache_dataset=FLAGS.cache_dataset, seed=FLAGS.seed, deterministic=FLAGS.deterministic,
      initial_step=initial_step, shuffle_buffer=FLAGS.shuffle_buffer,
      labels_required=not pretrain or FLAGS.lineareval_while_pretraining)


def state_fingerprint(model, sogclr):
  """Sums of the weights and of the visited u (float64): equal on every worker of a run."""
  weights = sum(float(np.sum(v.numpy(), dtype=np.float64)) for v in model.variables)
  text = f'weights sum {weights:.10e}'
  if sogclr is not None:
    log_u = sogclr.log_u.numpy()
    visited = np.isfinite(log_u)
    text += (f', u visited {int(visited.sum())}, '
             f'log u sum {np.sum(log_u[visited], dtype=np.float64):.10e}')
  return text


class _stop_on_sigterm:
  """Sets `event` on SIGTERM (the preemption notice of cloud VMs) while training runs."""

  def __init__(self, event):
    self.event = event
    self.previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.event.set())
    return self

  def __exit__(self, *exc):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


def _flag_values():
  """Every flag defined in this file, with its value."""
  return {f.name: f.value for f in FLAGS.get_flags_for_module(sys.modules[__name__])}


def export(model, step, write_dir, chief):
  """Exports the model to write_dir/saved_model/<step> unless --keep_hub_module_max=0."""
  if FLAGS.keep_hub_module_max:
    path = export_saved_model(
        model, os.path.join(write_dir, 'saved_model'), step, image_size=FLAGS.image_size,
        keep=FLAGS.keep_hub_module_max,
        flags_file=os.path.join(FLAGS.model_dir, 'flags.json'), chief=chief)
    if path:
      logging.info('Exported the model at step %d to %s', step, path)


def export_saved_model(model, export_dir, step, *, image_size, keep, flags_file=None,
                       chief=True):
  """Writes `model` as a SavedModel to export_dir/<step>; keeps the newest `keep` exports.

  The export holds the model as attribute `model` (tf.train.Checkpoint(model=...) restores
  <export>/variables/variables) and a `serving_default` signature: float32 `images`
  [N, image_size, image_size, 3] in [0, 1], preprocessed as for evaluation -> float32
  'features', 'projection' (pretraining models) and 'supervised_logits' (with a linear head),
  in inference mode. `flags_file` is copied in as flags.json. Returns the path, or None on a
  non-chief worker: saving is collective, so those save into export_dir and delete it.
  """
  assert keep >= 1, keep
  module = tf.Module()
  module.model = model

  @tf.function(input_signature=[
      tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name='images')])
  def serve(images):
    return {k: tf.cast(v, tf.float32) for k, v in model(images, training=False).items()}

  # Written under another name, then renamed: export_dir/<step> is never a partial export.
  temporary = os.path.join(export_dir, f'.tmp_{step}_{os.getpid()}')
  tf.saved_model.save(module, temporary, signatures={'serving_default': serve})
  if not chief:
    tf.io.gfile.rmtree(temporary)
    return None
  if flags_file and tf.io.gfile.exists(flags_file):
    tf.io.gfile.copy(flags_file, os.path.join(temporary, 'flags.json'), overwrite=True)
  final = os.path.join(export_dir, str(step))
  if tf.io.gfile.exists(final):  # The same step again: a rerun, or training and an eval job.
    tf.io.gfile.rmtree(final)
  tf.io.gfile.rename(temporary, final)
  steps = sorted(int(name.rstrip('/')) for name in tf.io.gfile.listdir(export_dir)
                 if name.rstrip('/').isdigit())
  for old in steps[:-keep]:
    tf.io.gfile.rmtree(os.path.join(export_dir, str(old)))
  return final


def restore_pretrained(model, path):
  """Initializes `model` from another run's checkpoint or SavedModel export (weights only; no
  optimizer or step)."""
  if tf.io.gfile.exists(os.path.join(path, 'saved_model.pb')):
    # An export_saved_model directory: its variables are a checkpoint of {'model': model}.
    path = os.path.join(path, 'variables', 'variables')
  elif tf.io.gfile.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is None:
      raise ValueError(f'--checkpoint={path!r} is a directory without checkpoints')
    path = latest
  if not tf.io.gfile.exists(path + '.index'):
    raise ValueError(f'--checkpoint={path!r} does not exist (expected a checkpoint prefix, a '
                     'directory holding checkpoints or a SavedModel export)')
  # Every trunk and projection-head variable must come from the checkpoint (restore_model
  # names the missing and mismatched ones). The linear head may be new (a first fine-tuning
  # starts it from scratch) or for another number of classes (fine-tuning on another dataset):
  # then it starts as initialized. The pretraining run's optimizer state, step and SogCLR's u
  # table (or an export's signatures) are left unmatched.
  head_names = ('supervised_head', 'supervised_head_bn')
  head = {id(v) for name, layer in model.named_layers().items() if name in head_names
          for v in layer.variables}
  try:
    left_out = restore_model(model, path, [v for v in model.variables if id(v) not in head],
                             replaceable=head_names)
  except ValueError as e:
    message = str(e).replace(f'checkpoint {path} ', '')
    raise ValueError(f'--checkpoint={path!r} {message}; repeat the pretraining run\'s model '
                     'flags (its flags.json lists them)') from None
  logging.info('Initialized the model from %s', path)
  for name in left_out:
    logging.info('%s: the checkpoint holds another shape (another number of classes); it starts '
                 'as initialized', name)


def evaluate_checkpoints(strategy, model, builder, info, summary_writer, total_steps, *,
                         write_dir, chief):
  """--mode=eval: evaluates (and exports) every new checkpoint in model_dir as it appears (the
  latest first); returns after the one of the final step (or after --eval_timeout_seconds
  without a new one).

  Only the model is restored (restore_model) and the step is read from the checkpoint
  (checkpoint_step), so the training run's optimizer and loss flags are not needed. Only the
  chief writes result_<step>.json; another worker's export directory is removed at the end.
  """
  results = {}
  for path in tf.train.checkpoints_iterator(FLAGS.model_dir, min_interval_secs=1,
                                            timeout=FLAGS.eval_timeout_seconds):
    try:
      restore_model(model, path)
    except ValueError as e:
      raise ValueError(f"--model_dir={FLAGS.model_dir!r}: {e}; give the training run's model "
                       'flags (its flags.json lists them) or leave them out') from None
    step = checkpoint_step(path)
    results = run_evaluation(strategy, model, builder, info, summary_writer, step)
    if chief:
      write_results(FLAGS.model_dir, step, results)
    export(model, step, write_dir, chief)
    if step >= total_steps:
      break
  if not chief:
    tf.io.gfile.rmtree(write_dir)
  return results


# Where a checkpoint of run.py keeps the step: the optimizer's iteration count (a
# LossScaleOptimizer's own counter stays 0; its inner optimizer's counts).
STEP_KEYS = ('optimizer/inner_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE',
             'optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE')


def checkpoint_step(path):
  """The training step of checkpoint `path`, read without restoring the optimizer.

  Falls back to the number of the file name, ckpt-<n>, for a checkpoint without an optimizer:
  run.py's CheckpointManager numbers checkpoints by their step.
  """
  names = dict(tf.train.list_variables(path))
  for key in STEP_KEYS:
    if key in names:
      return int(tf.train.load_variable(path, key))
  match = re.search(r'ckpt-(\d+)$', path)
  if match:
    return int(match.group(1))
  raise ValueError(f'checkpoint {path!r} holds no step (no optimizer, no ckpt-<step> name)')


def restore_model(model, path, required=None, replaceable=()):
  """Restores the variables of `model` from checkpoint `path`, ignoring the rest (optimizer,
  step, SogCLR's u table); returns the names of the layers it left as they were.

  Raises ValueError, before anything is assigned, naming the `required` variables (default: all
  of the model's) that the checkpoint lacks and any variable it holds with another shape. A layer
  named in `replaceable` (see ContrastiveModel.named_layers) that the checkpoint holds with other
  shapes is not an error: the whole layer keeps its values (a linear head for another number of
  classes).
  """
  view = tf.train.CheckpointView(path)
  # A variable's key is its object path from the root, each name escaped as TensorFlow does.
  paths = {0: ()}
  queue = collections.deque([0])
  while queue:
    node = queue.popleft()
    for name, child in view.children(node).items():
      if child not in paths:
        paths[child] = paths[node] + (name.replace('.', '..').replace('/', '.S'),)
        queue.append(child)
  keys = {id(obj): '/'.join(paths[node]) + '/.ATTRIBUTES/VARIABLE_VALUE'
          for node, obj in view.match(tf.train.Checkpoint(model=model)).items() if node in paths}
  shapes = dict(tf.train.list_variables(path))
  layer_of = {id(v): name for name, layer in model.named_layers().items()
              for v in layer.variables}
  problems, left_out = [], set()
  required = {id(v) for v in (model.variables if required is None else required)}
  for variable in model.variables:
    key = keys.get(id(variable))
    if key is None:
      if id(variable) in required:
        problems.append(f'{variable.path} {tuple(variable.shape)} missing')
    elif key in shapes and list(variable.shape) != list(shapes[key]):
      if layer_of.get(id(variable)) in replaceable:
        left_out.add(layer_of[id(variable)])
      else:
        problems.append(f'{variable.path} {tuple(variable.shape)} is {tuple(shapes[key])} there')
  if problems:
    more = f' and {len(problems) - 5} more' if len(problems) > 5 else ''
    raise ValueError(f'checkpoint {path} holds another architecture: '
                     f'{", ".join(problems[:5])}{more}')
  root = model
  if left_out:  # the same object paths as the model's own checkpoints, without those layers
    root = tf.train.Checkpoint(**{name: layer for name, layer in model.named_layers().items()
                                  if name not in left_out})
  tf.train.Checkpoint(model=root).restore(path).expect_partial()
  return sorted(left_out)


def write_results(model_dir, step, results):
  """Merges `results` into model_dir/result_<step>.json and returns the merged dict.

  Keys already there and not recomputed (the probe's, after a --mode=eval run) are kept. The
  file is written under another name, then renamed: a crash never leaves a truncated json.
  """
  path = os.path.join(model_dir, f'result_{step}.json')
  merged = {}
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      text = f.read()
    try:
      merged = json.loads(text)
    except json.JSONDecodeError:
      aside = f'{path}.unreadable'
      logging.warning('%s is not valid json; moved to %s', path, aside)
      tf.io.gfile.rename(path, aside, overwrite=True)
  merged.update(results)
  temporary = os.path.join(model_dir, f'.result_{step}.json.tmp_{os.getpid()}')
  with tf.io.gfile.GFile(temporary, 'w') as f:
    f.write(json.dumps(merged, indent=2, sort_keys=True))
  tf.io.gfile.rename(temporary, path, overwrite=True)
  return merged


def eval_dataset(strategy, builder, info, split):
  """A non-repeating pipeline of `split` with the eval preprocessing (no augmentation)."""
  config = data_lib.InputConfig(split=split, global_batch_size=FLAGS.eval_batch_size,
                                image_size=FLAGS.image_size, is_training=False, num_views=1)
  return data_lib.build_distributed_dataset(strategy, builder, info, config, info.num_classes)


def split_features(strategy, model, builder, info, split, cache=None):
  """extract_features of `split` without augmentation; kept in `cache` ({split: (features,
  labels)}, a dict the caller holds while the model does not change) when given."""
  if cache is not None and split in cache:
    return cache[split]
  value = extract_features(strategy, model, eval_dataset(strategy, builder, info, split))
  if cache is not None:
    cache[split] = value
  return value


def run_evaluation(strategy, model, builder, info, summary_writer, step, features=None):
  """Evaluates the model at `step`: its weight-decay loss, the supervised head's top-1/top-5 on
  the eval split (when it has one) and, with --knn_monitor, a kNN classifier on trunk features.

  features: a split_features cache shared with run_probe at the same step, or None.
  Returns {'global_step', 'eval/regularization_loss', 'eval/top_1', ..., 'eval/knn_top_1'}.
  """
  # The quantity the train step logs as train/weight_decay.
  results = {'global_step': step, 'eval/regularization_loss': float(
      lars_optimizer.weight_decay_loss(model.trainable_variables, FLAGS.weight_decay))}
  parts = [f"regularization loss {results['eval/regularization_loss']:.6g}"]
  if model.has_supervised_head:
    metrics = evaluate(strategy, model, eval_dataset(strategy, builder, info, FLAGS.eval_split),
                       FLAGS.eval_steps)
    results.update({f'eval/{k}': v for k, v in metrics.items()})
    parts.append(f"{metrics['num_examples']} images: top-1 {metrics['top_1']:.4f}, "
                 f"top-5 {metrics['top_5']:.4f}")
  if FLAGS.knn_monitor:
    results.update(run_knn_monitor(strategy, model, builder, info, features))
    if 'eval/knn_top_1' in results:
      parts.append(f"kNN top-1 {results['eval/knn_top_1']:.4f} (k={FLAGS.knn_k})")
  logging.info('Eval at step %d on %s: %s', step, FLAGS.eval_split, '; '.join(parts))
  with summary_writer.as_default(step=step):
    tf.summary.scalar('eval/regularization_loss', results['eval/regularization_loss'])
    if 'eval/top_1' in results:
      tf.summary.scalar('eval/label_top_1_accuracy', results['eval/top_1'])
      tf.summary.scalar('eval/label_top_5_accuracy', results['eval/top_5'])
    if 'eval/knn_top_1' in results:
      tf.summary.scalar('eval/knn_top_1', results['eval/knn_top_1'])
  summary_writer.flush()
  return results


def run_knn_monitor(strategy, model, builder, info, features=None):
  """{'eval/knn_top_1': ...}: a weighted kNN (probe.knn_accuracy) of the eval split's trunk
  features against the train split's, both without augmentation (features: a split_features
  cache)."""
  if num_workers(strategy) > 1:
    logging.warning('--knn_monitor skipped: in a multi-worker run each host extracts only its '
                    'shard of the features.')
    return {}
  train_x, train_y = split_features(strategy, model, builder, info, FLAGS.train_split, features)
  test_x, test_y = split_features(strategy, model, builder, info, FLAGS.eval_split, features)
  return {'eval/knn_top_1': probe.knn_accuracy(train_x, train_y, test_x, test_y, k=FLAGS.knn_k,
                                               temperature=FLAGS.knn_temperature)}


def run_probe(strategy, model, builder, info, features=None):
  """A logistic-regression probe on frozen trunk features, beside raw-pixel and random-network
  baselines, when the train split is small enough (features: a split_features cache, shared
  with the kNN monitor)."""
  if not 0 < info.num_train_examples <= FLAGS.probe_max_examples:
    return {}

  def split_data(split):
    return eval_dataset(strategy, builder, info, split)

  train_x, train_y = split_features(strategy, model, builder, info, FLAGS.train_split, features)
  test_x, test_y = split_features(strategy, model, builder, info, FLAGS.eval_split, features)
  results = {'probe/top_1': probe.linear_probe_accuracy(train_x, train_y, test_x, test_y)}
  if FLAGS.probe_baselines:
    with strategy.scope():
      random_model = build_model(model.config, FLAGS.image_size)
    random_train = extract_features(strategy, random_model, split_data(FLAGS.train_split))
    random_test = extract_features(strategy, random_model, split_data(FLAGS.eval_split))
    results['probe/random_network_top_1'] = probe.linear_probe_accuracy(
        *random_train, *random_test)
    raw_train = probe.pixels(builder, info, FLAGS.train_split)
    raw_test = probe.pixels(builder, info, FLAGS.eval_split)
    results['probe/raw_pixels_top_1'] = probe.linear_probe_accuracy(*raw_train, *raw_test)
  logging.info('Linear probe on %s: top-1 %.4f (raw pixels %.4f, random network %.4f, chance '
               '%.2f)', FLAGS.eval_split, results['probe/top_1'],
               results.get('probe/raw_pixels_top_1', float('nan')),
               results.get('probe/random_network_top_1', float('nan')), 1 / info.num_classes)
  return results


# 128 + SIGTERM, as a shell reports a process ended by SIGTERM: schedulers see "interrupted".
PREEMPTED_EXIT_CODE = 143


def cli(argv):
  """main() with one-line errors for bad input (non-zero exit, nothing written is touched)."""
  try:
    results = main(argv)
  except Preempted as e:
    logging.warning('%s', e)
    print(f'preempted: {e}', file=sys.stderr)
    sys.exit(PREEMPTED_EXIT_CODE)
  except (ValueError, FloatingPointError, tf.errors.InvalidArgumentError) as e:
    message = e.message if isinstance(e, tf.errors.OpError) else str(e)
    # TF prefixes errors raised inside functions with the function's name.
    line = re.sub(r'^\{\{function_node [^}]*\}\}\s*', '',
                  message.strip().splitlines()[0] if message.strip() else repr(e))
    logging.error('%s', line)
    print(f'error: {line}', file=sys.stderr)
    sys.exit(1)
  print(summary_line(results))


def summary_line(results):
  """The run's headline numbers, one line."""
  parts = []
  if 'train_seconds' in results:
    parts.append(f"trained in {results['train_seconds']:.0f} s")
  if 'eval/top_1' in results:
    parts.append(f"linear head top-1 {results['eval/top_1']:.4f} on {FLAGS.eval_split}")
  if 'eval/knn_top_1' in results:
    parts.append(f"kNN top-1 {results['eval/knn_top_1']:.4f}")
  if 'probe/top_1' in results:
    text = f"linear probe on frozen features top-1 {results['probe/top_1']:.4f}"
    if 'probe/raw_pixels_top_1' in results:
      text += (f" (baselines: raw pixels {results['probe/raw_pixels_top_1']:.4f}, random "
               f"network {results['probe/random_network_top_1']:.4f})")
    parts.append(text)
  return 'Result: ' + '; '.join(parts) if parts else 'Result: nothing evaluated'


if __name__ == '__main__':
  app.run(cli)
