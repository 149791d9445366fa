"""Weight updates: the LARS optimizer (as in SimCLR), the optimizer factory, the warmup-cosine
learning-rate schedule and the weight-decay exclusions (BN scale/offset and biases)."""
import math

import tensorflow as tf

EXCLUDED_NAMES = ('gamma', 'beta', 'bias')

_SCALINGS = ('linear', 'sqrt')


def is_excluded(variable):
  """True for BN gamma/beta and biases: no weight decay, no LARS trust ratio.

  Accepts a Keras 3 variable (`name` is the last path component) or a tf.Variable
  (`name` such as 'dense/bias:0').
  """
  return variable.name.split(':')[0].split('/')[-1] in EXCLUDED_NAMES


LINEAR_HEAD_NAME = 'supervised_head'


def _path_parts(variable):
  path = getattr(variable, 'path', None) or variable.name
  return path.split(':')[0].split('/')


def is_linear_head(variable):
  """True for the linear head's variables (layer `supervised_head`). Under LARS, as in the
  official SogCLR code and SimCLR, they get neither LARS' decay nor its trust ratio: their L2
  penalty goes into the loss (`linear_head_decay_loss`) and they follow plain momentum."""
  return LINEAR_HEAD_NAME in _path_parts(variable)


def linear_head_decay_loss(variables, weight_decay):
  """weight_decay * l2_loss of the linear head's kernel: under LARS, the head's decay."""
  kernels = [v for v in variables if is_linear_head(v) and not is_excluded(v)]
  if not weight_decay or not kernels:
    return tf.constant(0.0, tf.float32)
  return weight_decay * tf.add_n([tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in kernels])


def weight_decay_loss(variables, weight_decay):
  """Returns weight_decay * sum of l2_loss (sum(w**2) / 2) over the non-excluded variables."""
  if not weight_decay:
    return tf.constant(0.0, tf.float32)
  return weight_decay * tf.add_n([
      tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in variables if not is_excluded(v)])


@tf.keras.utils.register_keras_serializable(package='simclr')
class LARS(tf.keras.optimizers.Optimizer):
  """Layer-wise adaptive rate scaling (You et al., 2017), the SimCLR variant.

  Weight decay is coupled (added to the gradient before the trust ratio), so it must not also be
  added to the loss. Excluded variables (see `is_excluded`) and the linear head (see
  `is_linear_head`; its L2 penalty belongs in the loss) get neither decay nor trust ratio.
  """

  def __init__(self, learning_rate, momentum=0.9, weight_decay_rate=0.0, eeta=0.001,
               classic_momentum=True, nesterov=False, name='LARS', **kwargs):
    if kwargs.get('weight_decay') is not None:
      # Keras' decoupled decay would apply on top of ours, to the excluded variables too.
      raise ValueError('LARS takes weight_decay_rate=..., not weight_decay=...')
    super().__init__(learning_rate=learning_rate, name=name, **kwargs)
    self.momentum = float(momentum)
    self.weight_decay_rate = float(weight_decay_rate)
    self.eeta = float(eeta)
    self.classic_momentum = classic_momentum
    self.nesterov = nesterov

  def build(self, variables):
    if self.built:
      return
    super().build(variables)
    self.momentums = [self.add_variable_from_reference(v, 'momentum') for v in variables]
    # Decided here, on the model's variables: under MirroredStrategy update_step sees per-replica
    # components whose names carry a replica suffix.
    self._excluded = [is_excluded(v) or is_linear_head(v) for v in variables]

  def _trust_ratio(self, w, direction):
    # sqrt(2 * l2_loss): one pass over each tensor (tf.norm writes the squares out first).
    w_norm = tf.sqrt(2.0 * tf.nn.l2_loss(w))
    d_norm = tf.sqrt(2.0 * tf.nn.l2_loss(direction))
    return tf.where(tf.logical_and(w_norm > 0, d_norm > 0),
                    self.eeta * tf.math.divide_no_nan(w_norm, d_norm), tf.ones_like(w_norm))

  def update_step(self, gradient, variable, learning_rate):
    index = self._get_variable_index(variable)
    v = self.momentums[index]
    excluded = self._excluded[index]
    dtype = variable.dtype
    learning_rate = tf.cast(learning_rate, dtype)
    momentum = tf.cast(self.momentum, dtype)
    w = tf.convert_to_tensor(variable)
    g = tf.cast(gradient, dtype)
    if self.weight_decay_rate and not excluded:
      g += tf.cast(self.weight_decay_rate, dtype) * w

    if self.classic_momentum:
      trust = 1.0 if excluded else self._trust_ratio(w, g)
      scaled_lr = learning_rate * trust
      # One fused kernel updates v and the variable in place (inside a distributed update the
      # handles are this device's copies): v = momentum * v + scaled_lr * g, then
      # variable -= v (Nesterov: momentum * v + scaled_lr * g).
      tf.raw_ops.ResourceApplyMomentum(
          var=variable.handle, accum=v.handle, lr=tf.ones([], dtype), grad=scaled_lr * g,
          momentum=momentum, use_locking=False, use_nesterov=self.nesterov)
    else:
      next_v = momentum * v + g
      update = momentum * next_v + g if self.nesterov else next_v
      trust = 1.0 if excluded else self._trust_ratio(w, update)
      self.assign(v, next_v)
      self.assign_sub(variable, learning_rate * trust * update)

  def get_config(self):
    config = super().get_config()
    config.update({
        'momentum': self.momentum,
        'weight_decay_rate': self.weight_decay_rate,
        'eeta': self.eeta,
        'classic_momentum': self.classic_momentum,
        'nesterov': self.nesterov,
    })
    return config


def build_optimizer(name, learning_rate, *, momentum=0.9, weight_decay=0.0):
  """Returns the optimizer; weight_decay_in_loss(optimizer) says whether the caller adds
  `weight_decay_loss` to the loss (for 'momentum' and 'adam')."""
  if name == 'lars':
    return LARS(learning_rate, momentum=momentum, weight_decay_rate=weight_decay)
  if name == 'momentum':
    # Nesterov, as the official SogCLR code's (and SimCLR's) 'momentum' optimizer.
    return tf.keras.optimizers.SGD(learning_rate, momentum=float(momentum), nesterov=True)
  if name == 'adam':
    return tf.keras.optimizers.Adam(learning_rate)
  raise ValueError(f"Unknown optimizer {name!r}; expected one of 'lars', 'momentum', 'adam'")


def weight_decay_in_loss(optimizer):
  """Whether the loss must carry the L2 penalty (`weight_decay_loss`) for `optimizer`: every
  optimizer build_optimizer makes but LARS, which decays the weights itself (a
  LossScaleOptimizer answers for the optimizer it wraps)."""
  if isinstance(optimizer, tf.keras.optimizers.LossScaleOptimizer):
    optimizer = optimizer.inner_optimizer
  return not isinstance(optimizer, LARS)


def scaled_learning_rate(base_learning_rate, global_batch_size, scaling):
  """Returns the peak learning rate: 'linear' lr * B / 256, 'sqrt' lr * sqrt(B) (SimCLR)."""
  if scaling == 'linear':
    return base_learning_rate * global_batch_size / 256.
  if scaling == 'sqrt':
    return base_learning_rate * math.sqrt(global_batch_size)
  raise ValueError(f'Unknown learning-rate scaling {scaling!r}; expected one of {_SCALINGS}')


@tf.keras.utils.register_keras_serializable(package='simclr')
class WarmUpAndCosineDecay(tf.keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup from 0 to the scaled peak, then cosine decay to 0 at `total_steps`."""

  def __init__(self, base_learning_rate, global_batch_size, scaling, warmup_steps, total_steps):
    if not 0 <= warmup_steps <= total_steps:
      raise ValueError(f'Need 0 <= warmup_steps <= total_steps, got warmup_steps={warmup_steps}, '
                       f'total_steps={total_steps}; shorten the warmup or train longer.')
    super().__init__()
    self.base_learning_rate = base_learning_rate
    self.global_batch_size = global_batch_size
    self.scaling = scaling
    self.warmup_steps = warmup_steps
    self.total_steps = total_steps
    self.peak = scaled_learning_rate(base_learning_rate, global_batch_size, scaling)

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    decay_steps = self.total_steps - self.warmup_steps
    if decay_steps > 0:
      progress = tf.clip_by_value((step - self.warmup_steps) / decay_steps, 0., 1.)
    else:
      progress = tf.ones_like(step)
    cosine = 0.5 * self.peak * (1. + tf.cos(math.pi * progress))
    if not self.warmup_steps:
      return cosine
    return tf.where(step < self.warmup_steps, self.peak * step / self.warmup_steps, cosine)

  def get_config(self):
    return {
        'base_learning_rate': self.base_learning_rate,
        'global_batch_size': self.global_batch_size,
        'scaling': self.scaling,
        'warmup_steps': self.warmup_steps,
        'total_steps': self.total_steps,
    }
