"""Steady-state images/s of the training step (SimCLR/SogCLR, XLA and bfloat16 on and off), its
model FLOP rate beside a matmul and a 3x3 conv, peak memory, and bfloat16-vs-float32 loss curves.
Usage: python bench/train_step.py [--quick] (one image = its two views; see --help)."""
import argparse
import dataclasses
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import host_memory  # noqa: E402

host_memory.tune()  # before TensorFlow allocates, as run.py does

from absl import logging  # noqa: E402  (after the path and environment set-up above)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import data as data_lib  # noqa: E402
import lars_optimizer  # noqa: E402
import model as model_lib  # noqa: E402
import objective as obj_lib  # noqa: E402
import trainer as trainer_lib  # noqa: E402

POLICIES = {'float32': 'float32', 'bfloat16': 'mixed_bfloat16'}
# The train step is about forward + backward (2x forward: gradients of activations and weights).
TRAIN_FLOPS_PER_FORWARD = 3
XLA_CHOICES = ('none', 'simclr_float32', 'simclr', 'all')
_STARTED = time.perf_counter()


def progress(message):
  """Prints a progress line stamped with the seconds since the script started."""
  print(f'[{time.perf_counter() - _STARTED:4.0f} s] {message}', flush=True)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One network and batch: depth, image side (px), global batch (images), width multiplier."""
  depth: int
  image_size: int
  batch_size: int
  width: float = 1.0

  @classmethod
  def parse(cls, text):
    """'18:32:64' or '50:64:32:1.0' (depth:image_size:batch[:width])."""
    parts = text.split(':')
    if len(parts) not in (3, 4):
      raise ValueError(f'Bad model spec {text!r}; expected depth:image_size:batch[:width], '
                       'e.g. 18:32:64 or 50:64:32:1.0')
    return cls(int(parts[0]), int(parts[1]), int(parts[2]),
               float(parts[3]) if len(parts) == 4 else 1.0)

  @property
  def label(self):
    width = '' if self.width == 1 else f' w{self.width:g}'
    return f'R{self.depth}{width} {self.image_size}px b{self.batch_size}'


@dataclasses.dataclass
class Variant:
  """One timed configuration and its per-round measurements."""
  spec: ModelSpec
  loss: str
  precision: str
  xla: bool
  trainer: trainer_lib.Trainer
  iterator: object
  steps_per_call: int
  forward_flops: float  # per view
  trace_seconds: float = 0.0
  first_call_rss_rise_bytes: int = 0
  seconds_per_step: list = dataclasses.field(default_factory=list)
  kernel_seconds_per_step: list = dataclasses.field(default_factory=list)  # process's system time
  peak_rss_bytes: list = dataclasses.field(default_factory=list)

  @property
  def key(self):
    return (self.spec, self.loss, self.precision, self.xla)

  def images_per_second(self):
    return [self.spec.batch_size / s for s in self.seconds_per_step]


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--models', default='18:32:64,50:64:32',
                      help='Comma-separated depth:image_size:batch[:width] specs.')
  parser.add_argument('--losses', default='simclr,sogclr')
  parser.add_argument('--precisions', default='float32,bfloat16')
  parser.add_argument('--xla', default='simclr_float32',
                      help="Variants also timed with XLA: 'none', 'simclr_float32' (one compile "
                           "per model), 'simclr' (both precisions) or 'all'. XLA on this CPU is "
                           "slow to compile and to run, bfloat16 most of all.")
  parser.add_argument('--rounds', type=int, default=4,
                      help='Timed rounds per model; each times every variant of the model '
                           'once, in turn.')
  parser.add_argument('--warmup_calls', type=int, default=1,
                      help='Untimed calls of each variant after its tracing call.')
  parser.add_argument('--steps', type=int, default=2, help='Steps per timed call (no XLA).')
  parser.add_argument('--xla_steps', type=int, default=1,
                      help='Steps per timed call with XLA (slow on CPU).')
  parser.add_argument('--num_classes', type=int, default=10, help='Classes of the linear head.')
  parser.add_argument('--num_examples', type=int, default=1437,
                      help="Size of SogCLR's u table (the demo split); >= batch.")
  parser.add_argument('--micro_seconds', type=float, default=0.4,
                      help='Seconds per timed matmul / convolution call.')
  parser.add_argument('--track_steps', type=int, default=200,
                      help='Steps of the bfloat16-vs-float32 loss curves on the digits demo '
                           '(0 = skip).')
  parser.add_argument('--track_every', type=int, default=20, help='Steps per loss-curve point.')
  parser.add_argument('--data_dir', default=None, help="TFDS directory for the digits demo.")
  parser.add_argument('--quick', action='store_true',
                      help='A smoke test of this script: a tiny model, no XLA, few steps, '
                           'reference matmul and convolution of 1/64 and 1/8 the work.')
  args = parser.parse_args(argv)
  if args.quick:
    args.models, args.rounds, args.steps, args.xla = '10:16:8:0.125', 2, 1, 'none'
    args.micro_seconds, args.track_steps, args.track_every = 0.05, 4, 2
  args.models = [ModelSpec.parse(m) for m in args.models.split(',') if m]
  args.losses = [m for m in args.losses.split(',') if m]
  args.precisions = [p for p in args.precisions.split(',') if p]
  for name, values, allowed in (('losses', args.losses, ('simclr', 'sogclr')),
                                ('precisions', args.precisions, tuple(POLICIES))):
    unknown = set(values) - set(allowed)
    if unknown:
      raise ValueError(f'Unknown --{name} {sorted(unknown)}; expected some of {allowed}')
  if args.xla not in XLA_CHOICES:
    raise ValueError(f'Unknown --xla={args.xla!r}; expected one of {XLA_CHOICES}')
  for spec in args.models:
    if spec.batch_size > args.num_examples:
      raise ValueError(f'Batch {spec.batch_size} of {spec.label} exceeds --num_examples='
                       f'{args.num_examples}: SogCLR ids must be distinct within a batch')
  return args


def with_xla(choice, loss, precision):
  return (choice == 'all' or (choice == 'simclr' and loss == 'simclr') or
          (choice == 'simclr_float32' and loss == 'simclr' and precision == 'float32'))


def model_config(spec, num_classes):
  return model_lib.ModelConfig(
      resnet_depth=spec.depth, width_multiplier=spec.width,
      cifar_stem=spec.image_size <= data_lib.SMALL_IMAGE_SIZE, num_classes=num_classes)


def synthetic_iterator(strategy, spec, num_classes, num_examples, seed):
  """Per-replica batches (data.batch) from 4 random in-memory batches, repeated: the input
  pipeline costs nothing. Ids walk the u table, distinct within a batch."""
  rng = np.random.default_rng(seed)
  count = 4 * spec.batch_size
  shape = (count, spec.image_size, spec.image_size, 3)
  views = tuple(rng.uniform(size=shape).astype(np.float32) for _ in range(2))
  labels = np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, count)]
  images = tf.data.Dataset.from_tensor_slices((views, labels)).batch(
      spec.batch_size, drop_remainder=True).cache().repeat()
  batch = spec.batch_size

  def step_ids(step):
    return tf.cast((step * batch + tf.range(batch, dtype=tf.int64)) % num_examples, tf.int32)

  def flatten(images_labels, ids):
    return {'views': images_labels[0], 'labels': images_labels[1], 'ids': ids}

  ids = tf.data.Dataset.range(2**62).map(step_ids)
  dataset = tf.data.Dataset.zip(images, ids).map(flatten).prefetch(2)
  return iter(strategy.experimental_distribute_dataset(dataset))


def forward_flops(model, image_size):
  """FLOPs (a multiply-add = 2) of one image's forward pass, by TF's graph profiler."""
  @tf.function
  def forward(images):
    return model(images, training=False)['projection']

  graph = forward.get_concrete_function(
      tf.TensorSpec([1, image_size, image_size, 3], tf.float32)).graph
  options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
  options['output'] = 'none'
  return float(tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops)


def build_for_precision(strategy, spec, precision, args, initial_weights=None):
  """(model, optimizer, sogclr loss) under `precision`'s Keras policy (reset to float32 after)."""
  tf.keras.mixed_precision.set_global_policy(POLICIES[precision])
  try:
    with strategy.scope():
      model = model_lib.build_model(model_config(spec, args.num_classes), spec.image_size)
      if initial_weights is not None:
        model.set_weights(initial_weights)
      optimizer = lars_optimizer.build_optimizer('lars', 0.1, momentum=0.9, weight_decay=1e-6)
      optimizer.build(model.trainable_variables)
      sogclr = obj_lib.SogCLRLoss(args.num_examples, temperature=0.1, gamma=0.9)
  finally:
    tf.keras.mixed_precision.set_global_policy('float32')
  return model, optimizer, sogclr


def make_trainer(strategy, model, optimizer, sogclr, loss, xla):
  objective = sogclr if loss == 'sogclr' else obj_lib.SimCLRLoss(temperature=0.1)
  return trainer_lib.Trainer(strategy, model, optimizer, objective=objective, weight_decay=1e-6,
                             jit_compile=xla)


rss_bytes = host_memory.own_resident_bytes


def _high_water_bytes():
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024
  raise OSError('no VmHWM in /proc/self/status')


def _reset_high_water():
  """Resets the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


class PeakRss:
  """The process's peak resident memory while the block runs.

  Reads the kernel's own high-water mark, reset on entry, so the timed step shares the CPUs with
  nothing; where the mark cannot be reset, a thread samples RSS every 5 ms instead (a sampler
  costs the step a few percent).
  """

  def __enter__(self):
    self.before = self.peak = rss_bytes()
    self._thread = None
    if not _reset_high_water():
      self._stop = threading.Event()
      self._thread = threading.Thread(target=self._sample, daemon=True)
      self._thread.start()
    return self

  def _sample(self):
    while not self._stop.wait(0.005):
      self.peak = max(self.peak, rss_bytes())

  def __exit__(self, *exc):
    if self._thread is None:
      self.peak = max(self.peak, _high_water_bytes())
    else:
      self._stop.set()
      self._thread.join()
    self.peak = max(self.peak, rss_bytes())


def build_variants(strategy, args, spec, first_seed):
  """Every timed configuration of one model spec (seeds of their batches from first_seed)."""
  variants = []
  flops = None
  for precision in args.precisions:
    model, optimizer, sogclr = build_for_precision(strategy, spec, precision, args)
    progress(f'built the {spec.label} model in {precision}')
    if flops is None:
      flops = forward_flops(model, spec.image_size)
      progress(f'{spec.label}: {flops / 1e9:.2f} forward GFLOP per view')
    for loss in args.losses:
      for xla in (False, True):
        if xla and not with_xla(args.xla, loss, precision):
          continue
        trainer = make_trainer(strategy, model, optimizer, sogclr, loss, xla)
        iterator = synthetic_iterator(strategy, spec, args.num_classes, args.num_examples,
                                      seed=first_seed + len(variants))
        variant = Variant(spec, loss, precision, xla, trainer, iterator,
                          args.xla_steps if xla else args.steps, flops)
        started = time.perf_counter()
        with PeakRss() as memory:
          metrics = trainer.train_loop(iterator, 1)  # traces (and compiles, with XLA)
          loss_value = float(metrics['total_loss'])
        variant.trace_seconds = time.perf_counter() - started
        # Freed memory stays mapped, so only the first call shows what this variant adds.
        variant.first_call_rss_rise_bytes = memory.peak - memory.before
        progress(f'built {describe(variant)}: first call (tracing) {variant.trace_seconds:.1f} s, '
                 f'loss {loss_value:.3f}')
        for _ in range(args.warmup_calls):  # the first steps after tracing still fault memory in
          float(trainer.train_loop(iterator, variant.steps_per_call)['total_loss'])
        variants.append(variant)
  return variants


def describe(variant):
  return (f'{variant.spec.label} {variant.loss} {variant.precision} '
          f'{"XLA" if variant.xla else "no XLA"}')


class Micro:
  """A matmul or a 3x3 convolution in one dtype, timed as a reference FLOP rate."""

  def __init__(self, kind, dtype, seconds, small=False):
    self.kind, self.dtype, self.seconds = kind, dtype, seconds
    rng = np.random.default_rng(0)
    if kind == 'matmul':
      # small (--quick): 1/64 of the work, which a CPU without native bfloat16 emulates slowly.
      n = 512 if small else 2048
      a = tf.constant(rng.standard_normal((n, n)), dtype)
      b = tf.constant(rng.standard_normal((n, n)), dtype)
      self.flops = 2 * n**3
      self.label = f'matmul {n}x{n}x{n}'
      self._op = lambda: tf.matmul(a, b)
    else:
      # The shape of the middle of ResNet-18's group 2 on 32x32 images at batch 64 x 2 views.
      batch, side, channels = 16 if small else 128, 16, 128
      x = tf.constant(rng.standard_normal((batch, side, side, channels)), dtype)
      w = tf.constant(rng.standard_normal((3, 3, channels, channels)) * 0.05, dtype)
      self.flops = 2 * 9 * channels * channels * side * side * batch
      self.label = f'conv3x3 {batch}x{side}x{side}x{channels}->{channels}'
      self._op = lambda: tf.nn.conv2d(x, w, 1, 'SAME')

    @tf.function(autograph=False)
    def repeat(n):
      return tf.while_loop(lambda i, total: i < n,
                           lambda i, total: (i + 1, total + tf.reshape(self._op(), [-1])[0]),
                           (tf.constant(0), tf.constant(0.0, dtype)))[1]

    self._repeat = repeat
    repeat(tf.constant(1))
    started = time.perf_counter()
    repeat(tf.constant(2)).numpy()
    self.reps = max(1, int(seconds / ((time.perf_counter() - started) / 2)))
    self.gflops = []

  def time_once(self):
    started = time.perf_counter()
    self._repeat(tf.constant(self.reps)).numpy()
    self.gflops.append(self.flops * self.reps / (time.perf_counter() - started) / 1e9)


def run_rounds(variants, micros, rounds):
  for r in range(rounds):
    started = time.perf_counter()
    # Every other round in reverse, so that no variant always follows the same one.
    for variant in (variants if r % 2 == 0 else variants[::-1]):
      with PeakRss() as memory:
        t, kernel = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
        metrics = variant.trainer.train_loop(variant.iterator, variant.steps_per_call)
        float(metrics['total_loss'])
        elapsed = time.perf_counter() - t
        kernel = resource.getrusage(resource.RUSAGE_SELF).ru_stime - kernel
      variant.seconds_per_step.append(elapsed / variant.steps_per_call)
      variant.kernel_seconds_per_step.append(kernel / variant.steps_per_call)
      variant.peak_rss_bytes.append(memory.peak)
    for micro in micros:
      micro.time_once()
    progress(f'round {r + 1}/{rounds}: {time.perf_counter() - started:.1f} s')


def median_range(values, fmt='{:.1f}'):
  return (fmt.format(statistics.median(values)) + ' [' + fmt.format(min(values)) + '-' +
          fmt.format(max(values)) + ']')


def paired_ratio(a, b):
  """Median and range over rounds of a's images/s over b's measured in the same round."""
  ratios = [x / y for x, y in zip(a.images_per_second(), b.images_per_second())]
  return median_range(ratios, '{:.2f}')


def markdown_tables(variants, micros):
  peak = {m.dtype: statistics.median(m.gflops) for m in micros if m.kind == 'matmul'}
  lines = ['| model | loss | precision | XLA | images/s median [min-max] | ms/step | '
           'model GFLOP/s | % of matmul | kernel ms/step | first call: RSS added MB | '
           'peak RSS MB | first call s |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for v in variants:
    rate = statistics.median(v.images_per_second())
    gflops = rate * 2 * TRAIN_FLOPS_PER_FORWARD * v.forward_flops / 1e9
    reference = peak.get(tf.bfloat16 if v.precision == 'bfloat16' else tf.float32)
    share = f'{100 * gflops / reference:.0f}' if reference else '-'
    lines.append(
        f'| {v.spec.label} | {v.loss} | {v.precision} | {"on" if v.xla else "off"} | '
        f'{median_range(v.images_per_second())} | '
        f'{1000 * statistics.median(v.seconds_per_step):.0f} | {gflops:.0f} | {share} | '
        f'{1000 * statistics.median(v.kernel_seconds_per_step):.0f} | '
        f'{v.first_call_rss_rise_bytes / 2**20:.0f} | {max(v.peak_rss_bytes) / 2**20:.0f} | '
        f'{v.trace_seconds:.0f} |')
  lines += ['', '| reference op | dtype | GFLOP/s median [min-max] |', '| --- | --- | --- |']
  for m in micros:
    lines.append(f'| {m.label} | {m.dtype.name} | {median_range(m.gflops, "{:.0f}")} |')

  by_key = {v.key: v for v in variants}
  lines += ['', '| model | ratio (same rounds) | median [min-max] |', '| --- | --- | --- |']
  for spec in dict.fromkeys(v.spec for v in variants):
    pairs = []
    for precision in POLICIES:
      for xla in (False, True):
        pairs.append((f'SogCLR / SimCLR ({precision}, XLA {"on" if xla else "off"})',
                      (spec, 'sogclr', precision, xla), (spec, 'simclr', precision, xla)))
    for precision in POLICIES:
      for loss in ('simclr', 'sogclr'):
        pairs.append((f'XLA / no XLA ({loss}, {precision})',
                      (spec, loss, precision, True), (spec, loss, precision, False)))
    for loss in ('simclr', 'sogclr'):
      for xla in (False, True):
        pairs.append((f'bfloat16 / float32 ({loss}, XLA {"on" if xla else "off"})',
                      (spec, loss, 'bfloat16', xla), (spec, loss, 'float32', xla)))
    for name, a, b in pairs:
      if a in by_key and b in by_key:
        lines.append(f'| {spec.label} | {name} | {paired_ratio(by_key[a], by_key[b])} |')
  return '\n'.join(lines)


def loss_curves(strategy, args):
  """Loss means over `track_every` steps of the demo model on the digits demo, float32 and
  bfloat16 from the same initial weights and the same batches; returns markdown."""
  spec = (ModelSpec(10, 16, 8, 0.125) if args.quick else ModelSpec(18, 16, 32, 0.25))
  data_dir = args.data_dir or os.path.join(tempfile.gettempdir(), 'bench_train_step_tfds')
  builder = data_lib.get_builder('digits', data_dir)
  info = data_lib.describe(builder, 'train', 'test')
  curves, weights = {}, None
  for precision in ('float32', 'bfloat16'):
    tf.keras.utils.set_random_seed(0)
    tracking = argparse.Namespace(**{**vars(args), 'num_classes': info.num_classes,
                                     'num_examples': info.num_train_examples})
    model, optimizer, sogclr = build_for_precision(strategy, spec, precision, tracking, weights)
    weights = weights or model.get_weights()
    trainer = make_trainer(strategy, model, optimizer, sogclr, 'sogclr', xla=False)
    config = data_lib.InputConfig(
        split='train', global_batch_size=spec.batch_size, image_size=spec.image_size,
        is_training=True, crop_area_min=0.5, color_jitter_strength=0.5, use_blur=False, seed=0)
    iterator = iter(data_lib.build_distributed_dataset(strategy, builder, info, config,
                                                       info.num_classes))
    started = time.perf_counter()
    curves[precision] = [
        {k: float(v) for k, v in trainer.train_loop(iterator, args.track_every).items()}
        for _ in range(args.track_steps // args.track_every)]
    progress(f'loss curve {precision}: {time.perf_counter() - started:.1f} s')
  lines = [f'SogCLR, {spec.label} on the digits demo, LARS, same initial weights and batches; '
           f'means over {args.track_every} steps:', '',
           '| steps | total loss float32 | total loss bfloat16 | difference | '
           'contrast acc float32 | contrast acc bfloat16 |',
           '| --- | --- | --- | --- | --- | --- |']
  for i, (a, b) in enumerate(zip(curves['float32'], curves['bfloat16'])):
    lines.append(f'| {i * args.track_every + 1}-{(i + 1) * args.track_every} | '
                 f'{a["total_loss"]:.4f} | {b["total_loss"]:.4f} | '
                 f'{b["total_loss"] - a["total_loss"]:+.4f} | {a["contrast_acc"]:.3f} | '
                 f'{b["contrast_acc"]:.3f} |')
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  started = time.perf_counter()
  strategy = tf.distribute.MirroredStrategy(['/cpu:0'])  # what run.py builds on a CPU
  print(f'TensorFlow {tf.__version__} on {platform.processor() or platform.machine()}, '
        f'{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at start', flush=True)
  micros = [Micro(kind, dtype, args.micro_seconds, small=args.quick)
            for kind in ('matmul', 'conv3x3') for dtype in (tf.float32, tf.bfloat16)]
  progress('reference matmul and convolution calibrated')
  variants = []
  for spec in args.models:
    # Each model's variants are timed before the next model is built, so they share the process
    # with fewer others. (Freeing them afterwards took 60-75 s per model, so they stay.)
    built = build_variants(strategy, args, spec, first_seed=len(variants))
    run_rounds(built, micros, args.rounds)
    variants += built
  tables = markdown_tables(variants, micros)
  print()
  print(tables)
  per_view_flops = ', '.join(f'{v.spec.label}: {v.forward_flops / 1e9:.2f} GFLOP/view'
                             for v in {v.spec: v for v in variants}.values())
  print(f'\nModel GFLOP/s = images/s x 2 views x {TRAIN_FLOPS_PER_FORWARD} x forward FLOPs '
        f'({per_view_flops}). '
        'First call: RSS added = peak resident memory during the tracing call above the level '
        'before it (what this variant adds to the process); peak RSS = the whole process '
        "(this model's variants and the earlier models' alive), during its timed calls. For one "
        'configuration alone, run it alone (e.g. --models=50:64:32 --losses=sogclr '
        '--precisions=float32). '
        "Kernel ms/step: the process's system CPU time per step (page faults, mostly; see "
        'host_memory.py).')
  if args.track_steps:
    curves = loss_curves(strategy, args)
    print()
    print(curves)
    tables += '\n\n' + curves
  print(f'\nTotal {time.perf_counter() - started:.0f} s; load average '
        f'{os.getloadavg()[0]:.1f} at the end; peak RSS '
        f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB.', flush=True)
  return tables


if __name__ == '__main__':
  main()
