r"""Fashion-MNIST runs at the recipe's budget (docs/fashion_mnist.md, "Prepare and pretrain"):
records of whole `run.py` runs, and their table and per-epoch curves.

A record is one run's last result file (`result_<step>.json`, with its per-epoch monitor and the
end-of-run probe), its `flags.json`, the command and the host, and (with --data_dir) the global
contrastive objective of its newest checkpoint on the 2-epoch grid's fixed views
(bench/small_batch.py: two seeded views of the first 5,000 training images, temperature 0.1),
kept in bench/results/fashion_mnist/<name>.json. The table groups the runs by objective, width,
batch size and epochs (mean ± sample sd over seeds) and gives each pretraining run's probe
against raw pixels (baselines.json) and against SimCLR of the same seed, width, batch size and
epochs.

  python bench/long_runs.py --record=runs/fmnist_sogclr --name=sogclr_w05_e6_s0 \
      --command='docs/fashion_mnist.md "Prepare and pretrain"' --host='2 cores, ...' \
      --data_dir=~/tensorflow_datasets
  python bench/long_runs.py          # long_runs.md and long_runs.png from every record
"""
import argparse
import dataclasses
import decimal
import glob
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import knn_curves  # noqa: E402  (bench/)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(REPO, 'bench', 'results', 'fashion_mnist')
# Records of long runs: <objective>_<...>_e<epochs>[_s<seed>].json (the grid's files differ).
RECORD_PATTERN = re.compile(r'^(simclr|sogclr|isogclr|supervised)_.*e\d+(_s\d+)?\.json$')
LABELS = {'simclr': 'SimCLR', 'sogclr': 'SogCLR', 'isogclr': 'iSogCLR',
          'supervised': 'supervised (every layer, crops and flips)'}


def record(model_dir, command, host):
  """The record of the run in `model_dir`: its newest result file, flags.json, command, host."""
  results = glob.glob(os.path.join(model_dir, 'result_*.json'))
  steps = {int(m.group(1)): path for path in results
           if (m := re.fullmatch(r'result_(\d+)\.json', os.path.basename(path)))}
  if not steps:
    raise SystemExit(f'error: {model_dir} holds no result_<step>.json (a finished run)')
  with open(os.path.join(model_dir, 'flags.json')) as f:
    flags = json.load(f)
  with open(steps[max(steps)]) as f:
    results = json.load(f)
  return {'command': command, 'flags': flags, 'host': host, 'results': results}


def global_objective(model_dir, flags, data_dir):
  """The global contrastive objective of the newest checkpoint in `model_dir` on the batch-size
  grid's two fixed views of its dataset (bench/small_batch.py's column, with its preset: for
  Fashion-MNIST the first 5,000 training images, temperature 0.1); None for a supervised run
  (no projection head)."""
  if flags['train_mode'] != 'pretrain':
    return None
  # TensorFlow and the project's modules (small_batch puts the repository on the path) for
  # this only: the table needs neither.
  import small_batch  # noqa: PLC0415
  import tensorflow as tf  # noqa: PLC0415

  import settings  # noqa: PLC0415

  preset = small_batch.PRESETS[flags['dataset']]
  builder = small_batch.data_lib.get_builder(flags['dataset'], data_dir)
  info = small_batch.data_lib.describe(builder, 'train', 'test')
  config = settings.build_config(flags)
  model = small_batch.model_lib.build_model(
      dataclasses.replace(config.model, num_classes=info.num_classes), config.data.image_size)
  tf.train.Checkpoint(model=model).restore(
      tf.train.latest_checkpoint(model_dir)).assert_existing_objects_matched()
  views = small_batch.fixed_views(builder, info, preset)
  return float(small_batch.objective.global_nt_xent(
      small_batch.projections(model, views[0]), small_batch.projections(model, views[1]),
      preset.temperature))


def objective_of(flags):
  """'supervised', 'simclr', 'sogclr' or 'isogclr' from a run's flags.json."""
  if flags['train_mode'] == 'finetune':
    return 'supervised'
  if flags.get('loss'):
    return flags['loss']
  return 'sogclr' if flags.get('DCL_mode') else 'simclr'


def run_row(name, rec):
  """One run's measurements from its record."""
  flags, results = rec['flags'], rec['results']
  steps = results['global_step'] - results.get('trained_from_step', 0)
  return {
      'name': name, 'objective': objective_of(flags), 'width': flags['width_multiplier'],
      'batch': flags['train_batch_size'], 'epochs': flags['train_epochs'], 'seed': flags['seed'],
      'probe': results.get('probe/top_1'), 'knn': results.get('eval/knn_top_1'),
      'head': results.get('eval/top_1'), 'train_seconds': results['train_seconds'],
      'global_objective': rec.get('global_objective'),
      'images_per_second': steps * flags['train_batch_size'] / results['train_seconds'],
      'curve': [(m['epoch'], m.get('eval/knn_top_1')) for m in results.get('monitor', [])],
      'host': rec['host']}


def read_runs(out_dir):
  """Every long-run record in `out_dir`, as run_row()s, in file-name order (the table sorts
  them by objective: SimCLR, SogCLR, iSogCLR, supervised)."""
  runs = []
  for path in sorted(glob.glob(os.path.join(out_dir, '*.json'))):
    name = os.path.basename(path)
    if RECORD_PATTERN.match(name):
      with open(path) as f:
        runs.append(run_row(name[:-len('.json')], json.load(f)))
  return runs


def percent(value, signed=False):
  """`value` (a fraction) in % to one decimal, halves rounded up as written by hand (0.8825:
  88.3), where binary floats would round 88.24999... down."""
  digits = decimal.Decimal(repr(round(100 * float(value), 6))).quantize(
      decimal.Decimal('0.1'), rounding=decimal.ROUND_HALF_UP)
  return f'{digits:+}' if signed else f'{digits}'


def _mean_sd(values):
  """'mean ± sd' in %, or the value alone; '' when nothing was measured."""
  values = [v for v in values if v is not None]
  if not values:
    return ''
  if len(values) == 1:
    return percent(values[0])
  return f'{percent(np.mean(values))} ± {percent(np.std(values, ddof=1))}'


def markdown_table(runs, raw_pixels):
  """A row per run and a mean ± sd row per group of two or more seeds."""
  simclr = {(r['width'], r['batch'], r['epochs'], r['seed']): r['probe'] for r in runs
            if r['objective'] == 'simclr'}
  lines = ['| objective | width | batch | epochs | seed | global objective | linear probe % | '
           'Δ raw pixels | Δ SimCLR (same seed and batch) | kNN % | linear head % | training s | '
           'images/s |',
           '| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | '
           '---: |']
  groups = {}
  for r in runs:
    groups.setdefault((r['objective'], r['width'], r['batch'], r['epochs']), []).append(r)
  order = list(LABELS)
  for (objective, width, batch, epochs), members in sorted(
      groups.items(), key=lambda item: (order.index(item[0][0]), item[0][1:])):
    differences = []
    for r in sorted(members, key=lambda r: r['seed']):
      paired = simclr.get((width, batch, epochs, r['seed']))
      difference = ''
      if objective not in ('simclr', 'supervised') and r['probe'] is not None and paired:
        differences.append(r['probe'] - paired)
        difference = percent(differences[-1], signed=True)
      lines.append(
          f"| {LABELS[objective]} | {width:g} | {batch} | {epochs} | {r['seed']} | "
          f"{_objective([r['global_objective']])} | {_mean_sd([r['probe']])} "
          f"| {_signed(r['probe'], raw_pixels)} | {difference} | {_mean_sd([r['knn']])} | "
          f"{_mean_sd([r['head']])} | {r['train_seconds']:.0f} | {r['images_per_second']:.0f} |")
    if len(members) > 1:
      probes = [r['probe'] for r in members]
      mean_probe = np.mean(probes) if None not in probes else None
      lines.append(
          f"| {LABELS[objective]}, mean ± sd | {width:g} | {batch} | {epochs} | "
          f"{', '.join(str(r['seed']) for r in members)} | "
          f"{_objective([r['global_objective'] for r in members])} | **{_mean_sd(probes)}** | "
          f"{_signed(mean_probe, raw_pixels)} | {_mean_sd_signed(differences)} | "
          f"{_mean_sd([r['knn'] for r in members])} | {_mean_sd([r['head'] for r in members])} "
          '| | |')
  return '\n'.join(lines) + '\n'


def _objective(values):
  """The global objective to 3 decimals, 'mean ± sd' over several runs, and how many runs
  when some were not measured; '' unmeasured."""
  measured = [v for v in values if v is not None]
  if not measured:
    return ''
  text = (f'{np.mean(measured):.3f} ± {np.std(measured, ddof=1):.3f}' if len(measured) > 1
          else f'{measured[0]:.3f}')
  return text if len(measured) == len(values) else f'{text} ({len(measured)} of {len(values)})'


def _signed(value, reference):
  return '' if value is None or reference is None else percent(value - reference, signed=True)


def _mean_sd_signed(values):
  if len(values) < 2:
    return percent(values[0], signed=True) if values else ''
  return f'{percent(np.mean(values), signed=True)} ± {percent(np.std(values, ddof=1))}'


def curves_table(runs):
  """kNN top-1 (%) after each epoch, a row per pretraining run."""
  epochs = max((len(r['curve']) for r in runs), default=0)
  lines = ['| run | ' + ' | '.join(str(e + 1) for e in range(epochs)) + ' |',
           '| :--- |' + ' ---: |' * epochs]
  for r in runs:
    if r['curve'] and r['curve'][0][1] is not None:
      cells = [percent(v) for _, v in r['curve']]
      lines.append(f"| {r['name']} | " + ' | '.join(cells + [''] * (epochs - len(cells))) + ' |')
  return '\n'.join(lines) + '\n'


def plot(runs, path):
  """kNN top-1 after each epoch of every run: colour the objective, line the width (dotted
  below 0.5) and batch size (dashed above 64), marker the seed."""
  knn_curves.plot(
      [(f"{LABELS[r['objective']]} x{r['width']:g} b{r['batch']} seed {r['seed']}",
        r['objective'], ':' if r['width'] < 0.5 else '--' if r['batch'] > 64 else '-',
        'os^v'[r['seed'] % 4], [(e, v) for e, v in r['curve'] if v is not None]) for r in runs],
      path, ylabel='kNN top-1 % (10,000 test images, k=200)',
      title='Fashion-MNIST: kNN after each epoch', legend_outside=True)


def raw_pixels(out_dir):
  """The raw-pixel baseline of the benchmark's baselines.json ({'linear_top_1', 'knn_top_1'};
  empty without it)."""
  path = os.path.join(out_dir, 'baselines.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f).get('raw_pixels', {})


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--record', metavar='MODEL_DIR',
                      help='Write the record of the finished run in MODEL_DIR (then stop).')
  parser.add_argument('--name', help='The record\'s name, e.g. sogclr_w05_e6_s0 (--record).')
  parser.add_argument('--command', default='', help='How the run was started (--record).')
  parser.add_argument('--host', default='', help='The host and what ran beside (--record).')
  parser.add_argument('--data_dir', help='With --record: the run\'s data_dir; the record then '
                      'holds the global objective of its newest checkpoint.')
  parser.add_argument('--out_dir', default=OUT_DIR)
  args = parser.parse_args(argv)
  if args.record:
    if not args.name or not RECORD_PATTERN.match(args.name + '.json'):
      parser.error('--record needs --name=<objective>_..._e<epochs>[_s<seed>], e.g. '
                   'sogclr_w05_e6_s0')
    path = os.path.join(args.out_dir, args.name + '.json')
    made = record(args.record, args.command, args.host)
    if os.path.exists(path):  # recorded again (e.g. to add the objective): the same run
      with open(path) as f:
        earlier = json.load(f)
      made['command'] = args.command or earlier['command']
      made['host'] = args.host or earlier['host']
    if args.data_dir:
      made['global_objective'] = global_objective(args.record, made['flags'], args.data_dir)
    with open(path, 'w') as f:
      json.dump(made, f, indent=1)
      f.write('\n')
    print(f'Wrote {path}')
    return
  runs = read_runs(args.out_dir)
  pixels = raw_pixels(args.out_dir)
  text = markdown_table(runs, pixels.get('linear_top_1'))
  knn = f" (raw pixels: {100 * pixels['knn_top_1']:.2f}%)" if 'knn_top_1' in pixels else ''
  text += f'\nkNN top-1 % after each epoch{knn}:\n\n' + curves_table(runs)
  with open(os.path.join(args.out_dir, 'long_runs.md'), 'w') as f:
    f.write(text)
  plot(runs, os.path.join(args.out_dir, 'long_runs.png'))
  print(text)


if __name__ == '__main__':
  main()
