r"""Small-batch SogCLR and iSogCLR against SimCLR: the global contrastive objective, linear and
kNN top-1 against batch size (the paper's batch-size figure, on a CPU), on the demo digits or on
Fashion-MNIST. Writes bench/results/ (digits) or bench/results/fashion_mnist/.

  python bench/small_batch.py            # digits, the full grid: 36 runs, about 1.5 h on 2 cores
  python bench/small_batch.py --quick    # a smoke test of this script (a few minutes)
  python bench/small_batch.py --dataset=fashion_mnist --batch_sizes=64 --seeds=0
                                         # one seed of one batch size of the real-data grid

On Fashion-MNIST each run also records its per-epoch kNN curve (--eval_every_epochs=1), and
the table has beside the methods the baselines: a probe and kNN on raw pixels and on a random
network of the same shape, and a supervised network of the same shape trained for the same
epochs (the ceiling), each measured once per --work_dir (--baselines_only: in a process of
their own beside the grid's).

The full grid can be split over processes sharing --work_dir (--batch_sizes=16,256 and
--batch_sizes=32,128, or --methods=...); a last run without them collects the cached runs into
the table (--collect: only the runs already measured, training none). --reuse_runs=results.json
takes the runs of an earlier table as measured (marked so).
"""
import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/'s knn_curves
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import host_memory  # noqa: E402

host_memory.tune()  # before TensorFlow allocates, as run.py does

from absl import logging  # noqa: E402  (after the path and environment set-up above)
import knn_curves  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import checkpoints  # noqa: E402
import data as data_lib  # noqa: E402
import evaluation  # noqa: E402
import experiment  # noqa: E402
import model as model_lib  # noqa: E402
import objective  # noqa: E402
import probe  # noqa: E402
import run  # noqa: E402  (parse_config: the benchmark's runs are run.py command lines)

METHODS = ('simclr', 'sogclr', 'isogclr')
LABELS = {'simclr': 'SimCLR', 'sogclr': 'SogCLR', 'isogclr': 'iSogCLR'}
# iSogCLR's temperature updates: LibAUC's unimodal defaults (run.py's), given explicitly so a
# cached run is reused only with the same ones. --temperature is every image's initial one.
ISOGCLR = {'isogclr_rho': 0.3, 'isogclr_eta': 0.01, 'isogclr_beta': 0.9, 'isogclr_tau_min': 0.05,
           'isogclr_tau_max': 0.7}
# The fixed views of the global objective: one seed for every run, so a pair of runs (and every
# batch size) is scored on exactly the same 2N images; distinct from the training seeds.
VIEW_SEED = 2022


@dataclasses.dataclass(frozen=True)
class Settings:
  """One benchmark: the grid and everything held fixed across it."""
  batch_sizes: tuple
  seeds: tuple
  train_epochs: int
  width_multiplier: float
  methods: tuple = METHODS
  resnet_depth: int = 18
  dataset: str = 'digits'
  image_size: int = 16
  temperature: float = 0.1
  gamma: float = 0.9
  # Adam with the square-root scaling rule (Malladi et al. 2022): peak lr = base * sqrt(B),
  # base chosen so batch 32 gets the demo's 1e-3.
  base_learning_rate: float = 1e-3 / math.sqrt(32)
  warmup_epochs: float = 2
  crop_area_min: float = 0.5
  color_jitter_strength: float = 0.5
  # InstDisc's k = 200 is for ImageNet's 1,300 images per class; the digits have ~144, so the
  # same share of a class is k = 20 (k = 200 reaches past the class and loses ~10 points).
  knn_k: int = 20
  knn_temperature: float = 0.1
  random_flip: bool = True
  # Training images whose two fixed views score the global objective (0: all of them).
  objective_images: int = 0
  # Every run evaluates the kNN monitor every this many epochs (its curve); 0: only at the end.
  eval_every_epochs: int = 0
  eval_batch_size: int = 360

  def peak_learning_rate(self, batch_size):
    return self.base_learning_rate * math.sqrt(batch_size)


# 30 epochs, not the demo's 50: 24 runs of 50 would take ~1.7 h on 2 shared cores. ResNet-18 at
# width 0.25 on 16x16 views is the demo's model (98% linear top-1 at 50 epochs).
FULL = Settings(batch_sizes=(16, 32, 128, 256), seeds=(0, 1, 2), train_epochs=30,
                width_multiplier=0.25)
# A smoke test of the script: its global objectives are at chance (5-22 steps leave the projection
# head's inference-mode BatchNorm statistics near their initial 1s; docs/results.md).
QUICK = Settings(batch_sizes=(64, 256), seeds=(0,), train_epochs=1, width_multiplier=0.125,
                 warmup_epochs=0, resnet_depth=10)
# Fashion-MNIST (60,000 training images, 28x28 grey, upsampled to 32): the recipe of the README's
# docs/results.md; batch 64 and 512 for the same epochs.
FASHION = Settings(
    batch_sizes=(64, 512), seeds=(0, 1), train_epochs=2, width_multiplier=0.25,
    dataset='fashion_mnist', image_size=32, temperature=0.1,
    # Adam, square-root scaling: 2e-3 at batch 64.
    base_learning_rate=2e-3 / math.sqrt(64), warmup_epochs=0.2, crop_area_min=0.2,
    color_jitter_strength=0.5, knn_k=200, random_flip=True, objective_images=5000,
    eval_every_epochs=1, eval_batch_size=1000)
PRESETS = {'digits': FULL, 'fashion_mnist': FASHION}
# Fields that choose which runs make up a benchmark, not how each run trains.
GRID_FIELDS = ('batch_sizes', 'seeds', 'methods')


def run_settings(settings, method='simclr'):
  """What one run depends on: a cached run is reused only when all of it matches."""
  fields = {k: v for k, v in dataclasses.asdict(settings).items() if k not in GRID_FIELDS}
  return fields | ({'isogclr': ISOGCLR} if method == 'isogclr' else {})


# Settings fields added after runs were recorded, with the value every earlier run had: a record
# without one was measured with that value.
ADDED_FIELDS = {'dataset': 'digits', 'random_flip': True, 'objective_images': 0,
                'eval_every_epochs': 0, 'eval_batch_size': 360, 'resnet_depth': 18}


def measured_with(record, settings):
  """Whether the run of `record` (a cached or published run) was measured with `settings`."""
  expected = run_settings(settings, record['method'])
  return ({k: v for k, v in ADDED_FIELDS.items() if k in expected} | record['settings'] ==
          expected)


def run_flags(settings, method, batch_size, seed, model_dir, data_dir):
  """run.py's command line for one pretraining run (no end-of-run probe: measured here), or
  with method 'supervised' the supervised network of the same shape trained from scratch."""
  flags = [
      f'--dataset={settings.dataset}', '--eval_split=test',
      f'--image_size={settings.image_size}', f'--resnet_depth={settings.resnet_depth}',
      f'--width_multiplier={settings.width_multiplier}', f'--train_batch_size={batch_size}',
      f'--train_epochs={settings.train_epochs}', '--optimizer=adam',
      f'--learning_rate={settings.base_learning_rate!r}', '--learning_rate_scaling=sqrt',
      f'--warmup_epochs={settings.warmup_epochs}', f'--crop_area_min={settings.crop_area_min}',
      f'--random_flip={settings.random_flip}', f'--seed={seed}', f'--model_dir={model_dir}',
      f'--eval_batch_size={settings.eval_batch_size}', '--probe_max_examples=0',
      '--projector_max_points=0', '--keep_hub_module_max=0', '--log_every_seconds=60',
      # One checkpoint, at the end: only the final weights are measured.
      f'--checkpoint_epochs={settings.train_epochs}', '--keep_checkpoint_max=1',
      # Same data order and augmentations for both methods of a pair (parallel map in order).
      '--deterministic']
  if method == 'supervised':
    # SimCLR's fine-tuning from no checkpoint: every layer trains, crops and flips only.
    return flags + ['--train_mode=finetune', '--fine_tune_after_block=-1',
                    '--num_proj_layers=0', '--ft_proj_selector=-1'] + (
        [f'--data_dir={data_dir}'] if data_dir else [])
  flags += ['--train_mode=pretrain', f'--loss={method}', f'--temperature={settings.temperature}',
            f'--gamma={settings.gamma}',
            f'--color_jitter_strength={settings.color_jitter_strength}', '--use_blur=False']
  if settings.eval_every_epochs:
    flags += [f'--eval_every_epochs={settings.eval_every_epochs}', '--knn_monitor',
              f'--knn_k={settings.knn_k}', f'--knn_temperature={settings.knn_temperature}']
  if method == 'isogclr':
    flags += [f'--{name}={value}' for name, value in ISOGCLR.items()]
  if data_dir:
    flags.append(f'--data_dir={data_dir}')
  return flags


def fixed_views(builder, info, settings):
  """Two seeded augmented views [N, H, W, 3] of the training images (all, or the first
  settings.objective_images records of the split), rows in id order."""
  split, count = 'train', info.num_train_examples
  whole = settings.objective_images in (0, count)
  if not whole and settings.objective_images < count:
    split, count = f'train[:{settings.objective_images}]', settings.objective_images
    info = data_lib.describe(builder, split, 'test')
  config = data_lib.InputConfig(
      split=split, global_batch_size=count,
      image_size=settings.image_size, is_training=True, num_views=2,
      color_jitter_strength=settings.color_jitter_strength,
      crop_area_min=settings.crop_area_min, use_blur=False, seed=VIEW_SEED, deterministic=True,
      random_flip=settings.random_flip, grey=info.grey)
  input_fn = data_lib.build_input_fn(builder, info, config, info.num_classes)
  batch = next(iter(input_fn(tf.distribute.InputContext())))
  (view_a, view_b), ids = batch['views'], batch['ids']
  order = np.argsort(ids.numpy())
  # Each image once (TFDS stores records in a shuffled order: a slice holds any ids).
  assert len(np.unique(ids.numpy())) == count, ids
  if whole:
    assert np.array_equal(ids.numpy()[order], np.arange(count)), ids
  return view_a.numpy()[order], view_b.numpy()[order]


def projections(model, images, batch_size=512):
  return np.concatenate([model(images[i:i + batch_size], training=False)['projection'].numpy()
                         for i in range(0, len(images), batch_size)])


def measure(model, builder, info, views, settings):
  """The trained model's global objective on the fixed views, linear-probe and kNN top-1."""
  strategy = tf.distribute.get_strategy()

  def split_data(split):
    return evaluation.eval_dataset(
        strategy, builder, info, split, global_batch_size=512, image_size=settings.image_size,
        num_examples=int(builder.info.splits[split].num_examples))

  global_objective = objective.global_nt_xent(
      projections(model, views[0]), projections(model, views[1]), settings.temperature)
  extract_features = evaluation.FeatureExtractor(strategy, model)
  train = extract_features(split_data('train'))
  test = extract_features(split_data('test'))
  return {
      'global_objective': float(global_objective),
      'linear_top_1': probe.linear_probe_accuracy(*train, *test),
      'knn_top_1': probe.knn_accuracy(*train, *test, k=settings.knn_k,
                                      temperature=settings.knn_temperature),
  }


def cached_record(settings, method, batch_size, seed, work_dir):
  """The record of a finished run in work_dir, or None; another run's settings are an error."""
  record_path = os.path.join(work_dir, f'{method}_b{batch_size}_s{seed}.json')
  if not os.path.exists(record_path):
    return None
  record = json.load(open(record_path))
  if not measured_with(record, settings):
    raise ValueError(f'{record_path} was measured with other settings ({record["settings"]}); '
                     'pass another --work_dir, or delete it to measure again')
  return record


def cpu_model(cpuinfo_path='/proc/cpuinfo'):
  """The CPU's model name ('model name' of /proc/cpuinfo; elsewhere the platform's)."""
  try:
    with open(cpuinfo_path) as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def pretrain_and_measure(settings, method, batch_size, seed, work_dir, data_dir, builder, info,
                         views):
  """One run of run.py in-process, then its measurements; cached in work_dir (resumable)."""
  name = f'{method}_b{batch_size}_s{seed}'
  record = cached_record(settings, method, batch_size, seed, work_dir)
  if record is not None:
    return record
  record_path = os.path.join(work_dir, f'{name}.json')
  model_dir = os.path.join(work_dir, name)
  # A run without a record was interrupted: start it afresh rather than resume mid-way.
  if tf.io.gfile.exists(model_dir):
    tf.io.gfile.rmtree(model_dir)
  started = time.time()
  # --verbosity=0: absl raises logging to INFO only under app.run; run.py's progress lines.
  config = run.parse_config(
      ['run.py', *run_flags(settings, method, batch_size, seed, model_dir, data_dir),
       '--verbosity=0'])
  results = experiment.run(config)
  # The run's model lives in its own scope; the final checkpoint holds the same weights.
  model = model_lib.build_model(
      dataclasses.replace(config.model, num_classes=info.num_classes), settings.image_size)
  checkpoints.restore_pretrained(model, model_dir)
  record = {
      'method': method, 'batch_size': batch_size, 'seed': seed,
      'steps': results['global_step'], 'train_seconds': results['train_seconds'],
      'images_per_second': round((results['global_step'] - results['trained_from_step']) *
                                 batch_size / results['train_seconds'], 1),
      'linear_head_top_1': results['eval/top_1'],
      **measure(model, builder, info, views, settings),
      # The kNN monitor after each --eval_every_epochs (the last one is the end of training).
      'curve': [[r['epoch'], r['eval/knn_top_1']] for r in results.get('monitor', [])],
      'seconds': round(time.time() - started, 1),
      # Where it was measured: the compute dtypes --mixed_precision=auto chose, the CPU.
      'precision': results['precision'], 'cpu': cpu_model(),
      'settings': run_settings(settings, method),
  }
  with open(record_path, 'w') as f:
    json.dump(record, f, indent=2)
  return record


def _probe_and_knn(train, test, settings):
  return {'linear_top_1': probe.linear_probe_accuracy(*train, *test),
          'knn_top_1': probe.knn_accuracy(*train, *test, k=settings.knn_k,
                                          temperature=settings.knn_temperature)}


def measure_baselines(settings, work_dir, data_dir, builder, info):
  """The probe and kNN on raw pixels and on a random network of the runs' shape, and the
  top-1 of that network trained supervised for the same epochs (batch: the smallest of the
  grid, seed 0); each cached in work_dir/baselines.json as soon as measured."""
  path = os.path.join(work_dir, 'baselines.json')
  record = {}
  if os.path.exists(path):
    record = json.load(open(path))
    if record['settings'] != run_settings(settings):
      raise ValueError(f'{path} was measured with other settings; pass another --work_dir')
  record['settings'] = run_settings(settings)
  strategy = tf.distribute.get_strategy()

  def measured(key, measure_fn):
    if key not in record:
      started = time.time()
      record[key] = measure_fn() | {'seconds': round(time.time() - started, 1)}
      with open(path, 'w') as f:
        json.dump(record, f, indent=2)
      print(f'baseline {key}: {record[key]}', flush=True)

  def split_data(split):
    return evaluation.eval_dataset(
        strategy, builder, info, split, global_batch_size=512, image_size=settings.image_size,
        num_examples=int(builder.info.splits[split].num_examples))

  def raw_pixels():
    return _probe_and_knn(*[probe.pixels(builder, info, split) for split in ('train', 'test')],
                          settings)

  def random_network():
    config = run.parse_config(['run.py', *run_flags(
        settings, 'simclr', settings.batch_sizes[0], 0, os.path.join(work_dir, 'random'),
        data_dir)])
    tf.keras.utils.set_random_seed(0)
    model = model_lib.build_model(
        dataclasses.replace(config.model, num_classes=info.num_classes), settings.image_size)
    extract = evaluation.FeatureExtractor(strategy, model)
    return _probe_and_knn(extract(split_data('train')), extract(split_data('test')), settings)

  def supervised():
    batch_size = settings.batch_sizes[0]
    model_dir = os.path.join(work_dir, f'supervised_b{batch_size}_s0')
    if tf.io.gfile.exists(model_dir):  # interrupted: start afresh
      tf.io.gfile.rmtree(model_dir)
    results = experiment.run(run.parse_config(
        ['run.py', *run_flags(settings, 'supervised', batch_size, 0, model_dir, data_dir),
         '--verbosity=0']))
    return {'top_1': results['eval/top_1'], 'batch_size': batch_size,
            'train_seconds': results['train_seconds'],
            'images_per_second': round(results['global_step'] * batch_size /
                                       results['train_seconds'], 1)}

  measured('raw_pixels', raw_pixels)
  measured('random_network', random_network)
  measured('supervised', supervised)
  return record


def baselines_table(baselines):
  """The baselines measured so far, a row each: linear and kNN top-1."""
  rows = [f"| {name} | {100 * baselines[key]['linear_top_1']:.1f} | "
          f"{100 * baselines[key]['knn_top_1']:.1f} |"
          for key, name in (('raw_pixels', 'raw pixels'),
                            ('random_network', 'random network, same shape'))
          if key in baselines]
  if 'supervised' in baselines:
    rows.append(f"| supervised, same network and epochs (batch "
                f"{baselines['supervised']['batch_size']}) | "
                f"{100 * baselines['supervised']['top_1']:.1f} (its own head) | |")
  return '\n'.join(['', '| baseline | linear top-1 % | kNN top-1 % |', '| :--- | ---: | ---: |',
                    *rows]) + '\n'


def plot_curves(records, settings, path):
  """The per-epoch kNN top-1 of every run, one line each."""
  styles = dict(zip(sorted({r['batch_size'] for r in records}), ('-', '--', ':', '-.')))
  knn_curves.plot(
      [(f"{LABELS[r['method']]} b{r['batch_size']} s{r['seed']}", r['method'],
        styles[r['batch_size']], 'o', r.get('curve'))
       for r in sorted(records, key=lambda r: (r['method'], r['batch_size'], r['seed']))],
      path, ylabel=f'kNN top-1 % (k={settings.knn_k}, test split)',
      title=f'{settings.dataset}: kNN monitor while pretraining', legend_size=7)


def _portable(path):
  """`path` relative to the repository when inside it (a published record names no machine's
  directories), else absolute."""
  path = os.path.abspath(path)
  relative = os.path.relpath(path, REPO)
  return path if relative.startswith(os.pardir) else relative


def reuse_runs(path, work_dir, settings):
  """Copies the runs of results.json `path` measured with `settings` (and not already in
  `work_dir`) into `work_dir` as cached records marked 'reused_from'; returns how many."""
  with open(path) as f:
    earlier = json.load(f)
  copied = 0
  for record in earlier['runs']:
    if not measured_with(record, settings):
      continue
    name = f"{record['method']}_b{record['batch_size']}_s{record['seed']}"
    record_path = os.path.join(work_dir, f'{name}.json')
    if os.path.exists(record_path):
      continue
    with open(record_path, 'w') as f:
      json.dump(record | {'reused_from': record.get('reused_from', _portable(path))}, f,
                indent=2)
    copied += 1
  return copied


def mean_and_spread(values):
  """(mean, sample standard deviation; nan for a single value)."""
  values = np.asarray(values, np.float64)
  spread = float(np.std(values, ddof=1)) if len(values) > 1 else float('nan')
  return float(np.mean(values)), spread


METRICS = ('global_objective', 'linear_top_1', 'knn_top_1', 'linear_head_top_1',
           'train_seconds', 'images_per_second')


def summarize(records, settings):
  """Per batch size: each method's mean and spread, and each other method's paired difference
  from SimCLR (the same seed), over the seeds every method has."""
  by_key = {(r['method'], r['batch_size'], r['seed']): r for r in records}
  methods = settings.methods
  summary = []
  for batch_size in settings.batch_sizes:
    seeds = [s for s in settings.seeds
             if all((m, batch_size, s) in by_key for m in methods)]
    row = {'batch_size': batch_size, 'seeds': seeds,
           'steps': by_key[(methods[0], batch_size, seeds[0])]['steps'] if seeds else 0,
           'peak_learning_rate': settings.peak_learning_rate(batch_size)}
    for metric in METRICS:
      values = {m: [by_key[(m, batch_size, s)].get(metric, math.nan) for s in seeds]
                for m in methods}
      row[metric] = {m: dict(zip(('mean', 'sd'), mean_and_spread(v))) for m, v in values.items()}
      row[metric]['difference'] = {}
      for method in methods:
        if method == 'simclr' or 'simclr' not in methods:
          continue
        differences = np.subtract(values[method], values['simclr'])
        stats = dict(zip(('mean', 'sd'), mean_and_spread(differences)))
        stats['per_seed'] = differences.tolist()
        # Lower is better for the objective, higher for accuracies.
        better = differences < 0 if metric == 'global_objective' else differences > 0
        stats['better'] = int(better.sum())
        row[metric]['difference'][method] = stats
    summary.append(row)
  return summary


def _cell(stats, scale, digits):
  """mean ± sd, the mean alone for one seed, blank where no run recorded it."""
  mean, sd = stats['mean'] * scale, stats['sd'] * scale
  if math.isnan(mean):
    return ''
  return f'{mean:.{digits}f}' if math.isnan(sd) else f'{mean:.{digits}f} ± {sd:.{digits}f}'


def _signed_cell(stats, scale, digits):
  mean, sd = stats['mean'] * scale, stats['sd'] * scale
  text = f'{mean:+.{digits}f}'
  return text if math.isnan(sd) else f'{text} ± {sd:.{digits}f}'


def markdown_table(summary):
  """A row per batch size and method: mean ± sample sd over seeds; Δ = the method - SimCLR of
  the same seed; 'lower in' counts the seeds where the method's objective is lower."""
  lines = [
      '| batch | steps | method | global objective | Δ vs SimCLR (lower in) '
      '| linear top-1 % | Δ | kNN top-1 % | Δ | training s | images/s |',
      '| ---: | ---: | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
  for row in summary:
    n = len(row['seeds'])
    for method in row['global_objective']:
      if method == 'difference':
        continue
      cells = [str(row['batch_size']), str(row['steps']), LABELS[method]]
      for metric, scale, digits in (('global_objective', 1, 3), ('linear_top_1', 100, 1),
                                    ('knn_top_1', 100, 1)):
        stats = row[metric]
        cells.append(_cell(stats[method], scale, digits))
        difference = stats['difference'].get(method)
        if difference is None:
          cells.append('')
        elif metric == 'global_objective':
          cells.append(f"{_signed_cell(difference, scale, digits)} ({difference['better']}/{n})")
        else:
          cells.append(_signed_cell(difference, scale, digits))
      cells += [_cell(row[metric][method], 1, 0) for metric in ('train_seconds',
                                                                'images_per_second')]
      lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def plot(summary, records, settings, path):
  """Global objective, its paired difference, linear and kNN top-1 against batch size."""
  import matplotlib  # pylint: disable=import-outside-toplevel  (only the plot needs it)
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  batch_sizes = [row['batch_size'] for row in summary]
  colors = {'simclr': 'tab:blue', 'sogclr': 'tab:red', 'isogclr': 'tab:green'}
  figure, axes = plt.subplots(2, 2, figsize=(10, 7.5))
  panels = (('global_objective', 1,
             f'global contrastive objective, tau={settings.temperature} (lower is better)'),
            ('linear_top_1', 100, 'linear-probe top-1 % (held-out)'),
            ('knn_top_1', 100, f'kNN top-1 % (held-out, k={settings.knn_k})'))
  for axis, (metric, scale, title) in zip((axes[0, 0], axes[1, 0], axes[1, 1]), panels):
    for method in settings.methods:
      means = [row[metric][method]['mean'] * scale for row in summary]
      sds = [np.nan_to_num(row[metric][method]['sd']) * scale for row in summary]
      axis.errorbar(batch_sizes, means, yerr=sds, color=colors[method], marker='o', capsize=3,
                    label=LABELS[method])
    axis.set_title(title)
  # Same-seed differences cancel seed-to-seed noise, which may exceed the gap; a dot per seed.
  axis = axes[0, 1]
  axis.axhline(0, color='gray', linewidth=0.8)
  for method in settings.methods:
    if method == 'simclr' or 'simclr' not in settings.methods:
      continue
    points = [(row['batch_size'], value) for row in summary
              for value in row['global_objective']['difference'][method]['per_seed']]
    if points:
      axis.plot(*zip(*points), linestyle='none', marker='.', color=colors[method], alpha=0.5)
    means = [row['global_objective']['difference'][method]['mean'] for row in summary]
    sds = [np.nan_to_num(row['global_objective']['difference'][method]['sd']) for row in summary]
    axis.errorbar(batch_sizes, means, yerr=sds, color=colors[method], marker='o', capsize=3,
                  label=f'{LABELS[method]} − SimCLR: mean ± sd (dots: seeds)')
  axis.set_title('global objective minus SimCLR\'s, same seed')
  for axis in axes.flat:
    axis.set_xscale('log', base=2)
    axis.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    axis.set_xlabel('batch size')
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--dataset', choices=sorted(PRESETS), default='digits',
                      help='The benchmark: the demo digits, or Fashion-MNIST (prepared from its '
                      'idx files on first use, docs/datasets.md).')
  parser.add_argument('--quick', action='store_true',
                      help='Smoke test on the digits: 2 batch sizes, 1 seed, 1 epoch, width 0.125.')
  parser.add_argument('--batch_sizes', default=None,
                      help='Comma-separated subset of the batch sizes (e.g. to split the grid '
                      'over two processes sharing --work_dir; a last run without it collects).')
  parser.add_argument('--seeds', default=None, help='Comma-separated subset of the seeds.')
  parser.add_argument('--methods', default=None,
                      help=f'Comma-separated subset of the methods {",".join(METHODS)}.')
  parser.add_argument('--baselines_only', action='store_true',
                      help='Fashion-MNIST: measure the baselines only (beside a grid process '
                      'sharing --work_dir); a last --collect makes the table.')
  parser.add_argument('--no_baselines', action='store_true',
                      help='Fashion-MNIST: do not measure the baselines here (another process '
                      'sharing --work_dir does); the table shows them once measured.')
  parser.add_argument('--collect', action='store_true',
                      help='Train nothing: the table of the runs already in --work_dir (a row '
                      'has the seeds every method of it has).')
  parser.add_argument('--reuse_runs', default=None,
                      help='results.json of an earlier run of this script: its runs with the same '
                      'settings are taken as measured (copied into --work_dir, marked '
                      '"reused_from") instead of being run again.')
  parser.add_argument('--train_epochs', type=int, default=None,
                      help='Override the epochs (ablations; use another --work_dir).')
  parser.add_argument('--gamma', type=float, default=None,
                      help="Override SogCLR's gamma (ablations; use another --work_dir).")
  parser.add_argument('--out_dir', default=None,
                      help='Where results.json, results.md and small_batch.png go (default: '
                      'bench/results; with --quick a new temporary directory).')
  parser.add_argument('--work_dir', default=None,
                      help='Checkpoints and per-run records; a rerun skips finished runs '
                      '(default: runs/small_batch; with --quick a new temporary directory).')
  parser.add_argument('--data_dir', default=None, help='TFDS data directory for the digits.')
  return parser.parse_args(argv)


def settings_of(args):
  """The experiment's settings: QUICK or FULL with the command line's changes."""
  settings = QUICK if args.quick else PRESETS[args.dataset]
  if args.batch_sizes:
    settings = dataclasses.replace(
        settings, batch_sizes=tuple(int(b) for b in args.batch_sizes.split(',')))
  if args.seeds:
    settings = dataclasses.replace(settings, seeds=tuple(int(s) for s in args.seeds.split(',')))
  if args.methods:
    methods = tuple(args.methods.split(','))
    unknown = set(methods) - set(METHODS)
    if unknown:
      raise SystemExit(f'error: --methods: unknown {sorted(unknown)}; expected some of {METHODS}')
    settings = dataclasses.replace(settings, methods=methods)
  if args.train_epochs:
    settings = dataclasses.replace(settings, train_epochs=args.train_epochs)
  if args.gamma:
    settings = dataclasses.replace(settings, gamma=args.gamma)
  return settings


def run_grid(args, settings, work_dir, started):
  """The records of every (seed, batch size, method) run: trained here, or with --collect read
  from work_dir."""
  builder = data_lib.get_builder(settings.dataset, args.data_dir)
  info = data_lib.describe(builder, 'train', 'test')
  views = None  # made for the first run measured here: a rerun of a finished grid needs none
  records = []
  # Seed-major: an interrupted run has whole seeds; the two methods of a pair run back to back.
  for seed in settings.seeds:
    for batch_size in settings.batch_sizes:
      for method in settings.methods:
        record = cached_record(settings, method, batch_size, seed, work_dir)
        if record is None and not args.collect:
          views = fixed_views(builder, info, settings) if views is None else views
          record = pretrain_and_measure(settings, method, batch_size, seed, work_dir,
                                        args.data_dir, builder, info, views)
        if record is not None:
          records.append(record)
        if not args.collect:
          print(f"[{time.time() - started:6.0f} s] {method} batch {batch_size} seed {seed}: "
                f"global objective {record['global_objective']:.4f}, linear top-1 "
                f"{record['linear_top_1']:.4f}, kNN top-1 {record['knn_top_1']:.4f} "
                f"({record['train_seconds']:.0f} s training, {record['seconds']:.0f} s in all)",
                flush=True)
  return records


def write_results(records, settings, args, out_dir, started, load_before, baselines=None):
  """results.json, results.md and small_batch.png (and curves.png) in out_dir; returns the
  results."""
  summary = summarize(records, settings)
  if args.collect:  # batch sizes no seed has finished for every method yet are left out
    summary = [row for row in summary if row['seeds']]
  table = markdown_table(summary) + (baselines_table(baselines) if baselines else '')
  results = {
      'settings': dataclasses.asdict(settings) | {'view_seed': VIEW_SEED, 'quick': args.quick},
      'summary': summary,
      'baselines': baselines,
      'runs': records,
      'seconds': round(time.time() - started, 1),
      # Training and measuring, summed over runs (several processes may have shared the grid).
      'run_seconds_total': round(sum(r['seconds'] for r in records), 1),
      'machine': {'cpu': cpu_model(), 'cpus': os.cpu_count(), 'load_average_before': load_before,
                  'load_average_after': os.getloadavg(), 'tensorflow': tf.__version__,
                  'python': platform.python_version()},
  }
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write(table)
  plot(summary, records, settings, os.path.join(out_dir, 'small_batch.png'))
  if any(r.get('curve') for r in records):
    plot_curves(records, settings, os.path.join(out_dir, 'curves.png'))
  print(table)
  print(f'Wrote {out_dir}/results.json, results.md, small_batch.png in {results["seconds"]:.0f} s')
  return results


def main(argv):
  args = parse_args(argv)
  settings = settings_of(args)
  # run.py's progress lines (every minute) in absl's format, without app.run's set-up.
  logging.use_absl_handler()
  # Each run extracts features of a new model (its own trace): expected, not worth a warning.
  tf.get_logger().setLevel('ERROR')
  suffix = '' if settings.dataset == 'digits' else settings.dataset
  out_dir = args.out_dir or (tempfile.mkdtemp(prefix='small_batch_quick_') if args.quick else
                             os.path.join(REPO, 'bench', 'results', suffix))
  work_dir = args.work_dir or (tempfile.mkdtemp(prefix='small_batch_runs_') if args.quick else
                               os.path.join(REPO, 'runs', 'small_batch' + (
                                   f'_{suffix}' if suffix else '')))
  os.makedirs(out_dir, exist_ok=True)
  os.makedirs(work_dir, exist_ok=True)
  if args.reuse_runs:
    reused = reuse_runs(args.reuse_runs, work_dir, settings)
    print(f'Reusing {reused} runs of {args.reuse_runs}', flush=True)
  started = time.time()
  load_before = os.getloadavg()
  records = [] if args.baselines_only else run_grid(args, settings, work_dir, started)
  baselines = None
  if settings.dataset != 'digits':  # after the grid: an interrupted benchmark keeps its runs
    if args.collect or args.no_baselines:
      path = os.path.join(work_dir, 'baselines.json')
      baselines = json.load(open(path)) if os.path.exists(path) else None
    else:
      builder = data_lib.get_builder(settings.dataset, args.data_dir)
      baselines = measure_baselines(settings, work_dir, args.data_dir, builder,
                                    data_lib.describe(builder, 'train', 'test'))
      print(f'[{time.time() - started:6.0f} s] baselines: {baselines}', flush=True)
  if args.baselines_only:
    return baselines
  return write_results(records, settings, args, out_dir, started, load_before, baselines)


if __name__ == '__main__':
  main(sys.argv[1:])
