"""Contrastive objectives: SimCLR's NT-Xent, SogCLR's global contrastive loss with its `u` table,
and iSogCLR's individualized temperatures, behind one interface (`Objective`).

`build(config, num_examples, steps_per_epoch)` makes the objective an `ObjectiveConfig` names;
every objective is called the same way and returns the same dict, and declares itself what the
trainer logs, saves and checks of it. A new objective is one `Objective` subclass and one entry
in `OBJECTIVES`.

All gather negatives from every replica (gradients flow back through the gather), so one device
and many devices give the same answer on the same global batch.
"""
import dataclasses
import math

import numpy as np
import tensorflow as tf

import schema

# Subtracted from masked logits: exp() of the result is exactly 0 in float32, unlike -inf it keeps
# 0 * logit finite in the cross-entropy.
LARGE_NUM = 1e9


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """The contrastive objective of pretraining: `loss` names an entry of OBJECTIVES, which reads
  the fields its hyperparameters() name."""
  loss: str = 'sogclr'  # 'sogclr' | 'isogclr' | 'simclr'
  # iSogCLR: every image's initial temperature
  temperature: float = schema.setting(0.1, defines_run=True, allowed=schema.above(0))
  gamma: float = schema.setting(0.9, defines_run=True, allowed=schema.Range(0, 1, low_open=True))
  # 'constant' | 'cosine' (SogCLR and iSogCLR)
  gamma_schedule: str = schema.setting('constant', defines_run=True)
  # cosine: epochs from gamma 1 down to `gamma`
  gamma_decay_epochs: int = schema.setting(0, defines_run=True, allowed=schema.at_least(0))
  hidden_norm: bool = schema.setting(True, defines_run=True)
  # iSogCLR's temperature updates (LibAUC's unimodal defaults).
  isogclr_rho: float = schema.setting(0.3, defines_run=True, allowed=schema.at_least(0))
  isogclr_eta: float = schema.setting(0.01, defines_run=True, allowed=schema.above(0))
  isogclr_beta: float = schema.setting(0.9, defines_run=True,
                                       allowed=schema.Range(0, 1, low_open=True))
  isogclr_tau_min: float = schema.setting(0.05, defines_run=True, allowed=schema.above(0))
  isogclr_tau_max: float = schema.setting(0.7, defines_run=True)  # >= isogclr_tau_min

  @property
  def objective_class(self):
    """The Objective subclass of `loss`."""
    if self.loss not in OBJECTIVES:
      raise ValueError(f'Unknown loss {self.loss!r}; expected one of {sorted(OBJECTIVES)}')
    return OBJECTIVES[self.loss]

  @property
  def per_image(self):
    """Whether the objective keeps per-image tables (the pipeline then needs distinct ids)."""
    return self.objective_class.PER_IMAGE

  def hyperparameters(self):
    """The fields the objective reads with this config (the others do not change it)."""
    return self.objective_class.hyperparameters(self)


def build(config, num_examples, steps_per_epoch):
  """The objective of `config` (an ObjectiveConfig) for a split of `num_examples` images
  (the size of its per-image tables); call under the strategy's scope."""
  return config.objective_class.from_config(config, num_examples, steps_per_epoch)


def cross_replica_concat(tensor):
  """Concatenates `tensor` [b, ...] from all replicas, in replica order, into [R*b, ...].

  Each replica writes its rows into a zero [R, b, ...] block and the blocks are summed across
  replicas: the gradient of that sum sends every replica's upstream gradient back to the replica
  that produced each row. (An all-reduce rather than `all_gather`, which fails under
  MultiWorkerMirroredStrategy for tensors without a device placement.)
  """
  context = tf.distribute.get_replica_context()
  if context is None or context.num_replicas_in_sync == 1:
    return tensor
  num_replicas = context.num_replicas_in_sync
  blocks = tf.scatter_nd(
      indices=[[context.replica_id_in_sync_group]], updates=[tensor],
      shape=tf.concat([[num_replicas], tf.shape(tensor)], axis=0))
  blocks = context.all_reduce(tf.distribute.ReduceOp.SUM, blocks)
  return tf.reshape(blocks, tf.concat([[-1], tf.shape(tensor)[1:]], axis=0))


def _replica_offset(local_batch_size):
  context = tf.distribute.get_replica_context()
  if context is None or context.num_replicas_in_sync == 1:
    return 0
  return tf.cast(context.replica_id_in_sync_group, tf.int32) * local_batch_size


def contrastive_similarities(projection_a, projection_b, hidden_norm=True):
  """Similarities of each local anchor to all 2B gathered views.

  Args:
    projection_a, projection_b: [b, D] projections of the two views of the local batch.
    hidden_norm: L2-normalise projections first (cosine similarity).

  Returns:
    sims_a, sims_b: [b, 2B] raw dot products of view-a (view-b) anchors with the gathered
      [view b | view a] (respectively [view a | view b]) rows; the positive sits at column
      `offset + i`, the anchor itself at column `B + offset + i`.
    positive_mask, self_mask: [b, 2B] one-hot masks of those columns (float32).
  """
  projection_a = tf.cast(projection_a, tf.float32)
  projection_b = tf.cast(projection_b, tf.float32)
  if hidden_norm:
    projection_a = tf.math.l2_normalize(projection_a, axis=-1)
    projection_b = tf.math.l2_normalize(projection_b, axis=-1)
  all_a = cross_replica_concat(projection_a)
  all_b = cross_replica_concat(projection_b)
  local_batch_size = tf.shape(projection_a)[0]
  global_batch_size = tf.shape(all_a)[0]
  columns = _replica_offset(local_batch_size) + tf.range(local_batch_size)
  positive_mask = tf.one_hot(columns, 2 * global_batch_size)
  self_mask = tf.one_hot(global_batch_size + columns, 2 * global_batch_size)
  sims_a = tf.matmul(projection_a, tf.concat([all_b, all_a], 0), transpose_b=True)
  sims_b = tf.matmul(projection_b, tf.concat([all_a, all_b], 0), transpose_b=True)
  return sims_a, sims_b, positive_mask, self_mask


def nt_xent_from_similarities(sims, positive_mask, self_mask, temperature):
  """Per-anchor NT-Xent [b] and its logits [b, 2B] (self column masked out)."""
  logits = sims / temperature - LARGE_NUM * self_mask
  losses = tf.nn.softmax_cross_entropy_with_logits(labels=positive_mask, logits=logits)
  return losses, logits


def contrast_metrics(logits_a, positive_mask):
  """Contrastive top-1 accuracy and mean softmax entropy of view-a anchors (SimCLR's metrics)."""
  correct = tf.equal(tf.argmax(logits_a, 1), tf.argmax(positive_mask, 1))
  probabilities = tf.nn.softmax(logits_a)
  entropy = -tf.reduce_sum(probabilities * tf.math.log(probabilities + 1e-8), axis=1)
  return tf.reduce_mean(tf.cast(correct, tf.float32)), tf.reduce_mean(entropy)


def nt_xent_loss(projection_a, projection_b, temperature, hidden_norm=True):
  """SimCLR's NT-Xent: mean over local anchors of view a plus the same for view b.

  Returns:
    (loss scalar, logits_a [b, 2B], positive_mask [b, 2B]).
  """
  sims_a, sims_b, positive_mask, self_mask = contrastive_similarities(
      projection_a, projection_b, hidden_norm)
  losses_a, logits_a = nt_xent_from_similarities(sims_a, positive_mask, self_mask, temperature)
  losses_b, _ = nt_xent_from_similarities(sims_b, positive_mask, self_mask, temperature)
  return tf.reduce_mean(losses_a) + tf.reduce_mean(losses_b), logits_a, positive_mask


def _log_add_exp(x, y):
  """log(exp(x) + exp(y)) that accepts -inf in either argument (never both)."""
  larger = tf.maximum(x, y)
  return larger + tf.math.log(tf.exp(x - larger) + tf.exp(y - larger))


def log_u_aggregation(strategy):
  """How the replicas' scatter_update of the u table reaches every copy, under `strategy`.

  Every replica scatters the same all-gathered ids and values. Under TPUStrategy, TensorFlow's
  TPU on-write policy accepts a scatter inside the replicated step only with NONE aggregation:
  each core applies it to its own copy, so the copies stay identical. Elsewhere the mirrored
  on-write policy needs an aggregation to update from a replica: ONLY_FIRST_REPLICA broadcasts
  replica 0's (equal) update. The checkpoint is the same either way.
  """
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return tf.VariableAggregation.NONE
  return tf.VariableAggregation.ONLY_FIRST_REPLICA


def _per_image_table(num_examples, value, name):
  """A non-trainable [num_examples] float32 table filled with `value`, updated by scatter from
  the replicated step: every replica scatters the same all-gathered ids and values, so the
  copies stay identical (log_u_aggregation) and the checkpoint holds one."""
  return tf.Variable(
      tf.fill([num_examples], value), trainable=False, name=name,
      synchronization=tf.VariableSynchronization.ON_WRITE,
      aggregation=log_u_aggregation(tf.distribute.get_strategy()))


def cosine_gamma(epoch, gamma, decay_epochs):
  """LibAUC's 'cosine' gamma schedule: 1 at epoch 0, down to `gamma` along a half cosine over
  `decay_epochs` (whole epochs), then `gamma`. epoch: an integer (or an integer tensor)."""
  epoch = tf.cast(epoch, tf.float32)
  decaying = (1.0 - gamma) * 0.5 * (1.0 + tf.cos(math.pi * epoch / decay_epochs)) + gamma
  return tf.where(epoch < decay_epochs, decaying, tf.constant(gamma, tf.float32))


GAMMA_SCHEDULES = ('constant', 'cosine')


class Objective(tf.Module):
  """A contrastive objective as the trainer sees it.

  Called as `objective(projection_a, projection_b, ids, step)` on the local batch ([b, D]
  projections of the two views, [b] dataset ids, the 0-based training step), it returns a dict
  with at least 'loss' (the scalar whose gradient training follows), 'nt_xent' (the batch
  NT-Xent at the fixed temperature, comparable across objectives), 'logits_a' and
  'positive_mask' ([b, 2B], for the contrastive accuracy and entropy).

  Class attributes declare the rest: METRICS, the train metrics it adds ({metric name: key of
  that dict}); PER_IMAGE, whether it keeps tables indexed by the dataset's ids (saved in the
  checkpoint under 'sogclr/'); `hyperparameters(config)`, the ObjectiveConfig fields it reads.
  Per-image objectives override `tables`, `call_metrics`, `write_summaries` and `fingerprint`.
  """
  METRICS = {'contrast_loss': 'nt_xent'}
  PER_IMAGE = False
  # Step metrics that may be infinite without harm (the divergence check skips them).
  UNBOUNDED_METRICS = ()

  @classmethod
  def hyperparameters(cls, config):
    return ('temperature', 'hidden_norm')

  @classmethod
  def from_config(cls, config, num_examples, steps_per_epoch):
    raise NotImplementedError

  def tables(self):
    """{name: variable} of the per-image tables (saved with the model); {} without."""
    return {}

  def table_is_sound(self, name, value):
    """A scalar bool tensor: whether table `name` holds a state training can continue from."""
    return tf.reduce_all(tf.math.is_finite(value))

  def call_metrics(self, metrics):
    """Metrics derived from a call's step metrics and from the tables (Python floats)."""
    return {}

  def write_summaries(self, at_checkpoint, first_call):
    """Writes the tables' summaries to the default summary writer, at its step."""

  def fingerprint(self):
    """A text summarising the tables exactly (equal on every worker of a run); '' without."""
    return ''


class SimCLRLoss(Objective):
  """SimCLR's NT-Xent of the global batch (nt_xent_loss); no per-image state."""

  def __init__(self, temperature, hidden_norm=True, name='simclr'):
    super().__init__(name=name)
    schema.check(ObjectiveConfig, temperature=temperature)
    self.temperature = float(temperature)
    self.hidden_norm = hidden_norm

  @classmethod
  def from_config(cls, config, num_examples, steps_per_epoch):
    return cls(config.temperature, config.hidden_norm)

  def __call__(self, projection_a, projection_b, ids=None, step=None):
    """The Objective dict; 'loss' and 'nt_xent' are the same NT-Xent."""
    loss, logits_a, positive_mask = nt_xent_loss(projection_a, projection_b, self.temperature,
                                                 self.hidden_norm)
    return {'loss': loss, 'nt_xent': loss, 'logits_a': logits_a, 'positive_mask': positive_mask}


class SogCLRLoss(Objective):
  """SogCLR's global contrastive loss and its moving-average denominators `u`, one per image.

  `u` is kept in the log domain (`log_u`): u grows like exp(1/temperature) and overflows float32
  below temperature ~0.011, and an underflowed u of 0 would read as a first visit. A never-visited
  image holds -inf, which no real u (always > 0) can take. The table is a non-trainable variable
  of length `num_examples` and is saved in checkpoints with the model.

  gamma_schedule: 'constant' (`gamma` throughout) or 'cosine' (`cosine_gamma` of the epoch, the
  step passed to `__call__` // `steps_per_epoch`). Either way an image's first visit takes its
  estimate whole (gamma = 1).
  """
  METRICS = {'contrast_loss': 'nt_xent', 'log_u_mean': 'log_u_mean'}
  PER_IMAGE = True
  # log of the batch's mean u: +inf once u overflows float32 is still a state SogCLR runs on.
  UNBOUNDED_METRICS = ('log_u_mean',)

  @classmethod
  def hyperparameters(cls, config):
    # A constant gamma does not read gamma_decay_epochs.
    schedule = ('gamma', 'gamma_schedule') + (
        ('gamma_decay_epochs',) if config.gamma_schedule != 'constant' else ())
    return Objective.hyperparameters(config) + schedule

  @classmethod
  def _schedule(cls, config, steps_per_epoch):
    return dict(gamma_schedule=config.gamma_schedule,
                gamma_decay_epochs=config.gamma_decay_epochs, steps_per_epoch=steps_per_epoch)

  @classmethod
  def from_config(cls, config, num_examples, steps_per_epoch):
    return cls(num_examples, config.temperature, config.gamma, config.hidden_norm,
               **cls._schedule(config, steps_per_epoch))

  def __init__(self, num_examples, temperature, gamma, hidden_norm=True, name='sogclr', *,
               gamma_schedule='constant', gamma_decay_epochs=0, steps_per_epoch=None):
    super().__init__(name=name)
    schema.check(ObjectiveConfig, temperature=temperature, gamma=gamma)
    if gamma_schedule not in GAMMA_SCHEDULES:
      raise ValueError(f'Unknown gamma_schedule {gamma_schedule!r}; expected one of '
                       f'{GAMMA_SCHEDULES}')
    if gamma_schedule == 'cosine' and not (gamma_decay_epochs > 0 and steps_per_epoch):
      raise ValueError('the cosine gamma schedule needs gamma_decay_epochs > 0 and '
                       f'steps_per_epoch, got {gamma_decay_epochs} and {steps_per_epoch}')
    self.num_examples = int(num_examples)
    self.temperature = float(temperature)
    self.gamma = float(gamma)
    self.gamma_schedule = gamma_schedule
    self.gamma_decay_epochs = gamma_decay_epochs
    self.steps_per_epoch = steps_per_epoch
    self.hidden_norm = hidden_norm
    self.log_u = _per_image_table(self.num_examples, -math.inf, 'log_u')

  def tables(self):
    return {'log_u': self.log_u}

  def table_is_sound(self, name, value):
    if name != 'log_u':
      return super().table_is_sound(name, value)
    # A never-visited image holds -inf by design; NaN or +inf is damage.
    return tf.reduce_all(tf.logical_not(tf.math.is_nan(value)) & (value < np.inf))

  def call_metrics(self, metrics):
    """u_mean, the mean u of the call's batches, while it fits a float32 (its log always)."""
    log_u_mean = metrics.get('log_u_mean', math.inf)
    if log_u_mean < math.log(np.finfo(np.float32).max):
      return {'u_mean': math.exp(log_u_mean)}
    return {}

  def write_summaries(self, at_checkpoint, first_call):
    """u/visited_fraction (images whose u has been set: log u finite) and, at a checkpoint or
    the first call, a histogram u/log_u of log u over those images (the never visited are
    -inf)."""
    log_u = tf.convert_to_tensor(self.log_u)
    visited = tf.math.is_finite(log_u)
    tf.summary.scalar('u/visited_fraction', tf.reduce_mean(tf.cast(visited, tf.float32)))
    if at_checkpoint or first_call:
      tf.summary.histogram('u/log_u', tf.boolean_mask(log_u, visited))

  def fingerprint(self):
    log_u = self.log_u.numpy()
    visited = np.isfinite(log_u)
    return (f'u visited {int(visited.sum())}, '
            f'log u sum {np.sum(log_u[visited], dtype=np.float64):.10e}')

  def gamma_at(self, step):
    """gamma of revisits at training step `step` (0-based; a Python float when constant)."""
    if self.gamma_schedule == 'constant':
      return self.gamma
    if step is None:
      raise ValueError('the cosine gamma schedule needs the step')
    epoch = tf.cast(step, tf.int64) // self.steps_per_epoch
    return cosine_gamma(epoch, self.gamma, self.gamma_decay_epochs)

  @staticmethod
  def _moving_average(log_u_stored, sims, positive_mask, self_mask, temperature, gamma):
    """log of u_i(view) = (1-gamma) u_i(stored) + gamma g_i; gamma = 1 on a first visit.

    temperature: a float or per-anchor [b, 1]; gamma: a float or a scalar tensor.
    """
    negatives_logits = sims / temperature - LARGE_NUM * (positive_mask + self_mask)
    num_negatives = tf.cast(tf.shape(sims)[1] - 2, tf.float32)
    log_g = tf.reduce_logsumexp(negatives_logits, axis=1) - tf.math.log(num_negatives)
    if isinstance(gamma, float):
      if gamma == 1.0:
        return log_g, negatives_logits
      log_keep, log_gamma = math.log1p(-gamma), math.log(gamma)
    else:
      # A scheduled gamma of 1 gives log_keep = -inf: the stored u drops out, as it should.
      log_keep, log_gamma = tf.math.log1p(-gamma), tf.math.log(gamma)
    log_u = _log_add_exp(log_keep + log_u_stored, log_gamma + log_g)
    return tf.where(tf.math.is_inf(log_u_stored), log_g, log_u), negatives_logits

  @staticmethod
  def _surrogate(sims, positive_mask, negatives_logits, log_u):
    """Per-anchor -<z_i, z'_i> + 1/(2(B-1)) sum_k sg(exp(<z_i,z_k>/tau) / u_i) <z_i, z_k>."""
    weights = tf.stop_gradient(tf.exp(negatives_logits - log_u[:, None]))
    num_negatives = tf.cast(tf.shape(sims)[1] - 2, tf.float32)
    positive = tf.reduce_sum(positive_mask * sims, axis=1)
    return -positive + tf.reduce_sum(weights * sims, axis=1) / num_negatives

  def _views(self, projection_a, projection_b, ids, temperature, step):
    """Both views' similarities, new log u and surrogate loss, with `temperature` (a float or
    the anchors' [b, 1])."""
    sims_a, sims_b, positive_mask, self_mask = contrastive_similarities(
        projection_a, projection_b, self.hidden_norm)
    log_u_stored = tf.gather(self.log_u, ids)
    gamma = self.gamma_at(step)
    views = []
    for sims in (sims_a, sims_b):
      log_u, negatives = self._moving_average(
          log_u_stored, tf.stop_gradient(sims), positive_mask, self_mask, temperature, gamma)
      views.append({'sims': sims, 'log_u': log_u, 'negatives_logits': negatives,
                    'loss': self._surrogate(sims, positive_mask, negatives, log_u)})
    return views, positive_mask, self_mask

  def _results(self, views, positive_mask, self_mask, ids):
    """Scatters the new log u of the global batch; the dict `__call__` returns."""
    log_u_new = _log_add_exp(views[0]['log_u'], views[1]['log_u']) - math.log(2.0)
    all_ids = cross_replica_concat(ids)
    all_log_u_new = cross_replica_concat(log_u_new)
    self.log_u.scatter_update(tf.IndexedSlices(all_log_u_new, all_ids))
    loss = tf.reduce_mean(views[0]['loss']) + tf.reduce_mean(views[1]['loss'])
    nt_xent_a, logits_a = nt_xent_from_similarities(
        tf.stop_gradient(views[0]['sims']), positive_mask, self_mask, self.temperature)
    nt_xent_b, _ = nt_xent_from_similarities(
        tf.stop_gradient(views[1]['sims']), positive_mask, self_mask, self.temperature)
    global_batch_size = tf.cast(tf.shape(all_ids)[0], tf.float32)
    return {
        'loss': loss,
        'nt_xent': tf.reduce_mean(nt_xent_a) + tf.reduce_mean(nt_xent_b),
        'logits_a': logits_a,
        'positive_mask': positive_mask,
        'log_u_mean': tf.reduce_logsumexp(all_log_u_new) - tf.math.log(global_batch_size),
    }, all_ids

  def __call__(self, projection_a, projection_b, ids, step=None):
    """SogCLR loss of the local batch; updates `log_u` for the whole global batch.

    Args:
      projection_a, projection_b: [b, D] projections of the two views.
      ids: [b] integer dataset ids in [0, num_examples), distinct across the global batch.
      step: the 0-based training step (a scalar tensor); needed by the cosine gamma schedule.

    Returns:
      dict with 'loss' (the surrogate: mean over anchors of view a plus view b, whose gradient
      SogCLR follows), 'nt_xent' (the batch NT-Xent, for comparison with SimCLR), 'logits_a' and
      'positive_mask' (for contrastive metrics) and 'log_u_mean' (log of the mean of the new u
      over the global batch).
    """
    ids = tf.cast(ids, tf.int32)
    views, positive_mask, self_mask = self._views(
        projection_a, projection_b, ids, self.temperature, step)
    return self._results(views, positive_mask, self_mask, ids)[0]


class ISogCLRLoss(SogCLRLoss):
  """iSogCLR (Qiu et al., ICML 2023): SogCLR with one learned temperature per image.

  Beside `log_u`, two tables of length `num_examples`: `tau` (each image's temperature, starting
  at `temperature`) and `tau_momentum` (a moving average of its gradient, starting at 0). Per
  anchor i, with its stored tau_i, the moving average of u and the surrogate are SogCLR's; then,
  as LibAUC's GCLoss_v1(enable_isogclr=True) defines them, with u_i(view) the new moving average
  and w_ik = exp(s_ik / tau_i) / u_i(view):

      grad_i = mean over views of (log u_i(view) + rho - mean_k(w_ik s_ik / tau_i))
      m_i   <- (1 - beta) m_i + beta grad_i
      tau_i <- clip(tau_i - eta m_i, tau_min, tau_max)

  `nt_xent` and `logits_a` stay at the fixed `temperature` (comparable with SimCLR's).
  """
  METRICS = SogCLRLoss.METRICS | {'tau_batch_mean': 'tau_mean'}

  @classmethod
  def hyperparameters(cls, config):
    return SogCLRLoss.hyperparameters(config) + (
        'isogclr_rho', 'isogclr_eta', 'isogclr_beta', 'isogclr_tau_min', 'isogclr_tau_max')

  @classmethod
  def from_config(cls, config, num_examples, steps_per_epoch):
    return cls(num_examples, config.temperature, config.gamma, config.hidden_norm,
               rho=config.isogclr_rho, eta=config.isogclr_eta, beta=config.isogclr_beta,
               tau_min=config.isogclr_tau_min, tau_max=config.isogclr_tau_max,
               **cls._schedule(config, steps_per_epoch))

  def __init__(self, num_examples, temperature, gamma, hidden_norm=True, name='sogclr', *,
               rho=0.3, eta=0.01, beta=0.9, tau_min=0.05, tau_max=0.7, **schedule):
    super().__init__(num_examples, temperature, gamma, hidden_norm, name, **schedule)
    schema.check(ObjectiveConfig, isogclr_rho=rho, isogclr_eta=eta, isogclr_beta=beta,
                 isogclr_tau_min=tau_min)
    if not tau_min <= temperature <= tau_max:
      raise ValueError(f'need 0 < tau_min <= temperature <= tau_max, got {tau_min}, '
                       f'{temperature}, {tau_max}')
    self.rho, self.eta, self.beta = float(rho), float(eta), float(beta)
    self.tau_min, self.tau_max = float(tau_min), float(tau_max)
    self.tau = _per_image_table(self.num_examples, self.temperature, 'tau')
    self.tau_momentum = _per_image_table(self.num_examples, 0.0, 'tau_momentum')

  def _tau_gradient(self, view, tau):
    """log u_i(view) + rho - mean_k(w_ik s_ik / tau_i) of each anchor [b]."""
    weights = tf.exp(view['negatives_logits'] - view['log_u'][:, None])
    num_negatives = tf.cast(tf.shape(view['sims'])[1] - 2, tf.float32)
    # Masked columns have weight exactly 0; s / tau stays finite there.
    scaled_sims = tf.stop_gradient(view['sims']) / tau
    return (view['log_u'] + self.rho -
            tf.reduce_sum(weights * scaled_sims, axis=1) / num_negatives)

  def __call__(self, projection_a, projection_b, ids, step=None):
    """As SogCLRLoss, at each anchor's temperature; also updates `tau` and `tau_momentum` for
    the global batch. The dict also holds 'tau_mean' (the new temperatures' mean over the
    global batch)."""
    ids = tf.cast(ids, tf.int32)
    tau = tf.gather(self.tau, ids)[:, None]
    views, positive_mask, self_mask = self._views(projection_a, projection_b, ids, tau, step)
    gradient = tf.stop_gradient(
        0.5 * (self._tau_gradient(views[0], tau) + self._tau_gradient(views[1], tau)))
    momentum = (1.0 - self.beta) * tf.gather(self.tau_momentum, ids) + self.beta * gradient
    new_tau = tf.clip_by_value(tau[:, 0] - self.eta * momentum, self.tau_min, self.tau_max)
    results, all_ids = self._results(views, positive_mask, self_mask, ids)
    all_new_tau = cross_replica_concat(new_tau)
    self.tau_momentum.scatter_update(
        tf.IndexedSlices(cross_replica_concat(momentum), all_ids))
    self.tau.scatter_update(tf.IndexedSlices(all_new_tau, all_ids))
    results['tau_mean'] = tf.reduce_mean(all_new_tau)
    return results

  def temperature_table(self):
    """The temperatures of the images visited so far (a 1-D tensor; empty before any)."""
    return tf.boolean_mask(self.tau, tf.math.is_finite(self.log_u))

  def tables(self):
    return {'log_u': self.log_u, 'tau': self.tau, 'tau_momentum': self.tau_momentum}

  @tf.function(autograph=False)
  def _temperature_stats(self):
    # Masked reductions, not the visited subset: no dynamic shape (TPUs) on every call.
    visited = tf.math.is_finite(self.log_u)
    count = tf.reduce_sum(tf.cast(visited, tf.float32))
    return (tf.reduce_sum(tf.where(visited, self.tau, 0.0)) / count,
            tf.reduce_min(tf.where(visited, self.tau, math.inf)),
            tf.reduce_max(tf.where(visited, self.tau, -math.inf)))

  def call_metrics(self, metrics):
    """SogCLR's, and tau_mean, tau_min, tau_max over the images visited so far."""
    return super().call_metrics(metrics) | dict(zip(
        ('tau_mean', 'tau_min', 'tau_max'), (float(x) for x in self._temperature_stats())))

  def write_summaries(self, at_checkpoint, first_call):
    """SogCLR's, and at a checkpoint a histogram train/tau of the visited images' temperatures
    (one per call would grow the event file by a histogram a second)."""
    super().write_summaries(at_checkpoint, first_call)
    if at_checkpoint:
      tf.summary.histogram('train/tau', self.temperature_table())

  def fingerprint(self):
    return (f'{super().fingerprint()}, '
            f'tau sum {np.sum(self.tau.numpy(), dtype=np.float64):.10e}, tau momentum '
            f'sum {np.sum(self.tau_momentum.numpy(), dtype=np.float64):.10e}')


# The objectives `ObjectiveConfig.loss` names.
OBJECTIVES = {'simclr': SimCLRLoss, 'sogclr': SogCLRLoss, 'isogclr': ISogCLRLoss}


def global_nt_xent(projection_a, projection_b, temperature, hidden_norm=True, chunk_size=1024):
  """The global contrastive objective: NT-Xent of every image against the whole dataset.

  Each of the 2N anchors is contrasted with its positive and all 2N-2 other vectors (both views of
  every other image), as `nt_xent_loss` would with the whole dataset as one batch; this is the
  objective SogCLR provably optimizes, comparable across the batch sizes runs were trained with.

  Args:
    projection_a, projection_b: [N, D] projections of two fixed views of all N images (row i of
      each is image i).
    temperature: tau > 0.
    hidden_norm: L2-normalise projections first (cosine similarity).
    chunk_size: anchors per [chunk_size, 2N] block of logits (memory grows with it, not N^2).

  Returns:
    Scalar float32: mean over view-a anchors plus mean over view-b anchors, the convention of
    `nt_xent_loss` (so a per-anchor mean is half of it).
  """
  projection_a = tf.cast(projection_a, tf.float32)
  projection_b = tf.cast(projection_b, tf.float32)
  if hidden_norm:
    projection_a = tf.math.l2_normalize(projection_a, axis=-1)
    projection_b = tf.math.l2_normalize(projection_b, axis=-1)
  num_examples = int(projection_a.shape[0])
  everything = tf.concat([projection_a, projection_b], 0)
  total = tf.constant(0.0, tf.float64)
  for start in range(0, 2 * num_examples, chunk_size):
    rows = tf.range(start, min(start + chunk_size, 2 * num_examples))
    sims = tf.matmul(tf.gather(everything, rows), everything, transpose_b=True)
    # Row j's positive is the other view of the same image, N rows away (modulo 2N).
    positive_mask = tf.one_hot((rows + num_examples) % (2 * num_examples), 2 * num_examples)
    self_mask = tf.one_hot(rows, 2 * num_examples)
    losses, _ = nt_xent_from_similarities(sims, positive_mask, self_mask, temperature)
    # Accumulated in float64: 2N float32 losses of similar size lose digits when summed.
    total += tf.reduce_sum(tf.cast(losses, tf.float64))
  return tf.cast(total / num_examples, tf.float32)
