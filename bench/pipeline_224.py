r"""The training input pipeline at 224 px on photographs, per CPU core, against today's pipeline.

  git worktree add /tmp/pipeline-base 03926d6     # today's pipeline (the commit before issue 16)
  python bench/pipeline_224.py --baseline=/tmp/pipeline-base

Writes (once, under --data_dir) a folder of 2,571 JPEG photographs (333-500 px, cut from
scikit-learn's two bundled photos) as a TFDS dataset with `imagenet.py --folder`, then, in
interleaved rounds, each in a fresh process: today's pipeline (--baseline), ours with every
augmentation on the host (`--augment_on=host`, today's pixels) and ours with color distortion and
blur left to the train step (`--augment_on=device`). Two views, batch 64, `--batches` timed after
5 of warm-up. Rates are images/s (one image = its two views) and per core (the cores this process
may run on). Then, in this process, the train step of a small model at 224 px fed one batch from
memory, with and without the device augmentations, and those augmentations alone.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = 'photos224'
NUM_IMAGES = 2571
# The finding of issue 16: today's pipeline gave 326-334 images/s against the official SogCLR
# pipeline's 541-556 on the same files and cores (the official code is not run here).
TODAY_OVER_OFFICIAL = 330 / 548


def write_photo_folder(root, num_images=NUM_IMAGES, seed=0):
  """root/<class>/<n>.jpg: crops of 333-500 px of scikit-learn's two photos, rescaled, saved as
  JPEG at quality 93 (55 KB on average)."""
  import numpy as np  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415
  from sklearn.datasets import load_sample_images  # noqa: PLC0415
  photos = [Image.fromarray(p) for p in load_sample_images().images]
  rng = np.random.RandomState(seed)
  for n in range(num_images):
    photo = photos[n % 2]
    scale = rng.uniform(0.8, 1.25)
    photo = photo.resize((round(photo.width * scale), round(photo.height * scale)),
                         Image.BICUBIC)
    width, height = (int(min(rng.randint(333, 501), side)) for side in photo.size)
    left = rng.randint(0, photo.width - width + 1)
    top = rng.randint(0, photo.height - height + 1)
    folder = os.path.join(root, f'class{n % 10}')
    os.makedirs(folder, exist_ok=True)
    photo.crop((left, top, left + width, top + height)).save(
        os.path.join(folder, f'{n:05d}.jpg'), quality=93)


def prepare(data_dir):
  if os.path.isdir(os.path.join(data_dir, DATASET)):
    return
  with tempfile.TemporaryDirectory() as root:
    write_photo_folder(root)
    subprocess.run([sys.executable, os.path.join(REPO, 'imagenet.py'), f'--folder={root}',
                    f'--name={DATASET}', f'--data_dir={data_dir}'], check=True)


def cores():
  return len(os.sched_getaffinity(0))


def child(args):
  """One measurement of the pipeline of the code at args.code: prints a JSON line."""
  sys.path.insert(0, args.child)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import dataclasses  # noqa: PLC0415

  import tensorflow as tf  # noqa: PLC0415

  import data as data_lib  # noqa: PLC0415
  if args.lever == 'no decode check':
    # The undecodable-record check (nested datasets of DECODE_CHUNK records) replaced by a
    # plain parallel decode, to price it.
    data_lib._decode_naming_failures = lambda dataset, _name, _split, deterministic: dataset.map(
        lambda ex: {**ex, 'image': data_lib._decode_image(ex['image'])},
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  if args.lever == 'decode crop window':
    _decode_only_the_crop_windows(tf, data_lib)
  builder = data_lib.get_builder(DATASET, args.data_dir)
  info = data_lib.describe(builder, 'train', 'train')
  fields = {f.name for f in dataclasses.fields(data_lib.InputConfig)}
  extra = {'augment_on': args.augment_on} if 'augment_on' in fields else {}
  config = data_lib.InputConfig(
      split='train', global_batch_size=args.batch_size, image_size=224, is_training=True,
      use_blur=True, deterministic=args.deterministic or args.lever == 'deterministic', **extra)
  dataset = data_lib.build_input_fn(builder, info, config, info.num_classes)(
      tf.distribute.InputContext())
  options = tf.data.Options()
  if args.lever == 'one thread per op':
    options.threading.max_intra_op_parallelism = 1
  if args.lever == 'autotune off':
    options.autotune.enabled = False  # tf.data's fixed defaults for parallelism and buffers
  dataset = dataset.with_options(options)
  batches = iter(dataset)
  for _ in range(5):
    next(batches)
  started, cpu_started = time.perf_counter(), time.process_time()
  for _ in range(args.batches):
    next(batches)
  images = args.batches * args.batch_size
  # CPU seconds of every thread of this process: its cost, whatever else shares the cores.
  print(json.dumps({'rate': images / (time.perf_counter() - started),
                    'per_core': images / (time.process_time() - cpu_started)}))


def _decode_only_the_crop_windows(tf, data_lib):
  """The pipeline with each view decoded from its own crop window of the JPEG
  (decode_and_crop_jpeg; the same boxes as the full decode's crops), without the
  undecodable-record check (which decodes the whole image): compare with 'no decode check'.
  Only the augment_on=device views (crop and resize on the host)."""
  import data_util  # noqa: PLC0415
  data_lib._decode_naming_failures = lambda dataset, *_: dataset

  def to_views(self, example, seed):
    config = self.config
    seeds = tf.random.experimental.stateless_split(seed, config.num_views)
    shape = tf.io.extract_jpeg_shape(example['image'])
    views = []
    for v in range(config.num_views):
      crop_seed = tf.random.experimental.stateless_split(seeds[v], 4)[0]
      begin, size = data_util.crop_window(shape, crop_seed, config.image_size,
                                          config.image_size, config.crop_area_min)
      crop = tf.io.decode_and_crop_jpeg(example['image'], tf.stack(
          [begin[0], begin[1], size[0], size[1]]), channels=3)
      views.append(tf.ensure_shape(tf.image.resize(
          crop, [config.image_size] * 2, method=tf.image.ResizeMethod.BICUBIC),
          [config.image_size, config.image_size, 3]))
    params = tuple(data_util.pixel_params(seeds[v], config.pixel_augment())
                   for v in range(config.num_views))
    return (tuple(views), tf.one_hot(example['label'], self.num_classes), example['id'], params)

  data_lib._RecordStages.to_views = to_views


def measure(code, augment_on, args, lever=''):
  command = [sys.executable, os.path.abspath(__file__), f'--child={code}',
             f'--augment_on={augment_on}', f'--lever={lever}', f'--data_dir={args.data_dir}',
             f'--batches={args.batches}', f'--batch_size={args.batch_size}']
  if args.deterministic:
    command.append('--deterministic')
  output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
  return json.loads(output.strip().splitlines()[-1])


def step_rates(args):
  """(step with device augmentations, step without, augmentations alone) in images/s."""
  sys.path.insert(0, REPO)
  import tensorflow as tf  # noqa: PLC0415

  import data_util  # noqa: PLC0415
  import lars_optimizer  # noqa: PLC0415
  import model as model_lib  # noqa: PLC0415
  import objective  # noqa: PLC0415
  import trainer as trainer_lib  # noqa: PLC0415
  batch = args.step_batch_size
  strategy = tf.distribute.MirroredStrategy(['/cpu:0'])
  augment = data_util.PixelAugment(height=224)
  rng = tf.random.Generator.from_seed(0)
  views = tuple(rng.uniform([batch, 224, 224, 3], maxval=255.0) for _ in range(2))
  params = tuple(tf.stack([data_util.pixel_params(tf.constant([i, v], tf.int64), augment)
                           for i in range(batch)]) for v in range(2))
  labels = tf.one_hot(tf.range(batch) % 10, 10)
  ids = tf.range(batch)
  rates = {}
  for name, pixel_augment, element in (
      ('step + device augmentations', augment,
       {'views': views, 'labels': labels, 'ids': ids, 'pixel_params': params}),
      ('step alone', None, {'views': views, 'labels': labels, 'ids': ids})):
    with strategy.scope():
      model = model_lib.build_model(model_lib.ModelConfig(
          resnet_depth=args.resnet_depth, width_multiplier=args.width_multiplier,
          num_classes=10), 224)
      optimizer = lars_optimizer.build_optimizer('lars', 0.1, weight_decay=1e-6)
      optimizer.build(model.trainable_variables)
    trainer = trainer_lib.Trainer(strategy, model, optimizer, weight_decay=1e-6,
                                  objective=objective.SimCLRLoss(temperature=0.1),
                                  pixel_augment=pixel_augment)
    iterator = iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(element).repeat()))
    rates[name] = _rate(lambda t=trainer, i=iterator: t.train_loop(i, 1), args.steps, batch)
  distort = tf.function(lambda v, p: data_util.distort_batch(tf.concat(v, 0), tf.concat(p, 0),
                                                             augment))
  rates['device augmentations alone'] = _rate(lambda: distort(views, params).numpy(),
                                              args.steps, batch)
  return rates


def _rate(fn, steps, batch, warmup=2):
  for _ in range(warmup):
    fn()
  started = time.perf_counter()
  for _ in range(steps):
    fn()
  return steps * batch / (time.perf_counter() - started)


def _rotated(items, shift):
  """items started at position `shift`: each contender takes every place in the rounds' order."""
  shift %= len(items)
  return [*items[shift:], *items[:shift]]


def _median(values):
  return sorted(values)[len(values) // 2]


def _spread(values):
  return f'{_median(values):.0f} [{min(values):.0f}-{max(values):.0f}]'


LEVERS = ('no decode check', 'decode crop window', 'deterministic', 'one thread per op',
          'autotune off')


def compare_levers(args):
  """Ours (augment_on=device) and, in the same rounds, with each lever changed."""
  names = ('as it is', *LEVERS)
  per_core = {name: [] for name in names}
  ratios = {name: [] for name in names}
  for round_index in range(args.rounds):
    measured = {name: measure(REPO, 'device', args, '' if name == 'as it is' else name)
                for name in _rotated(names, round_index)}
    for name, result in measured.items():
      per_core[name].append(result['per_core'])
      ratios[name].append(result['per_core'] / measured['as it is']['per_core'])
  print(f'{DATASET}, 224 px, augment_on=device, batch {args.batch_size}, {args.rounds} rounds, '
        f'load average {os.getloadavg()[0]:.1f} at the end')
  print(f'{"lever":22s} {"images per CPU-second":>22s} {"x as it is [min-max]":>22s}')
  for name in names:
    print(f'{name:22s} {_spread(per_core[name]):>22s} {_median(ratios[name]):9.2f} '
          f'[{min(ratios[name]):.2f}-{max(ratios[name]):.2f}]')


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--baseline', default='/tmp/pipeline-base',
                      help='A checkout of today\'s code (git worktree add ... 03926d6); '
                           'skipped when absent.')
  parser.add_argument('--data_dir', default=os.path.join(tempfile.gettempdir(),
                                                         'sogclr_bench_photos'))
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--batches', type=int, default=40)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--deterministic', action='store_true')
  parser.add_argument('--steps', type=int, default=5, help='Timed train steps.')
  parser.add_argument('--step_batch_size', type=int, default=16)
  parser.add_argument('--resnet_depth', type=int, default=18)
  parser.add_argument('--width_multiplier', type=float, default=0.25)
  parser.add_argument('--skip_step', action='store_true')
  parser.add_argument('--levers', action='store_true',
                      help='Instead: ours (augment_on=device) against itself with one lever '
                           'changed at a time: ' + ', '.join(LEVERS))
  parser.add_argument('--child', help=argparse.SUPPRESS)
  parser.add_argument('--augment_on', default='host', help=argparse.SUPPRESS)
  parser.add_argument('--lever', default='', help=argparse.SUPPRESS)
  return parser.parse_args()


def main():
  args = parse_args()
  if args.child:
    return child(args)
  prepare(args.data_dir)
  if args.levers:
    return compare_levers(args)
  contenders = [('ours, augment_on=host', REPO, 'host'),
                ('ours, augment_on=device', REPO, 'device')]
  if os.path.isfile(os.path.join(args.baseline, 'data.py')):
    contenders.insert(0, ("today's (baseline)", args.baseline, 'host'))
  else:
    print(f'No baseline at {args.baseline}: today\'s pipeline is not measured')
  rates = {name: [] for name, _, _ in contenders}
  per_core = {name: [] for name, _, _ in contenders}
  ratios = {name: [] for name, _, _ in contenders}
  baseline = contenders[0][0] if contenders[0][1] != REPO else None
  for round_index in range(args.rounds):
    measured = {name: measure(code, augment_on, args)
                for name, code, augment_on in _rotated(contenders, round_index)}
    for name, result in measured.items():
      rates[name].append(result['rate'])
      per_core[name].append(result['per_core'])
      if baseline:  # within the round: the same load for every contender
        ratios[name].append(result['per_core'] / measured[baseline]['per_core'])
  print(f'{DATASET}: {NUM_IMAGES} JPEGs, 224 px, two views, batch {args.batch_size}, '
        f'{args.batches} batches after 5, {args.rounds} rounds alternating, {cores()} cores, '
        f'deterministic={args.deterministic}, load average {os.getloadavg()[0]:.1f} at the end')
  print(f'{"pipeline":26s} {"images/s":>18s} {"images per CPU-second":>24s} '
        f'{"x today":>16s} {"x official*":>8s}')
  for name in rates:
    ratio = _median(ratios[name]) if ratios[name] else float('nan')
    ratio_range = (f'[{min(ratios[name]):.2f}-{max(ratios[name]):.2f}]' if ratios[name] else '')
    print(f'{name:26s} {_spread(rates[name]):>18s} {_spread(per_core[name]):>24s} '
          f'{ratio:5.2f} {ratio_range:>10s} {ratio * TODAY_OVER_OFFICIAL:8.2f}')
  print('Per core: images per CPU-second of the pipeline process (all its threads); x today: '
        'the ratio of that within each round, median [min-max].')
  print(f'* official = today x {1 / TODAY_OVER_OFFICIAL:.2f}, the ratio issue 16 measured on the '
        'same kind of files and cores (the official code is not run here).')
  if not args.skip_step:
    for name, rate in step_rates(args).items():
      print(f'{name:30s} {rate:9.1f} images/s (ResNet-{args.resnet_depth} '
            f'x{args.width_multiplier}, 224 px, batch {args.step_batch_size})')
  return None


if __name__ == '__main__':
  main()
