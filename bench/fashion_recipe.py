r"""The Fashion-MNIST recipe, chosen by measurement: short SogCLR runs (batch 64, seed 0), each
the benchmark's recipe (bench/small_batch.py's FASHION settings) with one thing changed, scored
as the benchmark scores a run (linear probe on all 60,000 training features and kNN, on the
10,000 test images). Writes bench/results/fashion_mnist/recipe.md and recipe.json.

  python bench/fashion_recipe.py                          # every variant, 1 epoch each
  python bench/fashion_recipe.py --variants=base,t0.2     # some of them
  python bench/fashion_recipe.py --collect                # the table of the variants measured

Each variant is cached in --work_dir as it finishes (a rerun measures only the missing ones),
so the scan splits over processes and sessions.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from absl import logging  # noqa: E402
import small_batch  # noqa: E402  (sets up the path, the environment and TensorFlow)
import tensorflow as tf  # noqa: E402

import data as data_lib  # noqa: E402

BASE = dataclasses.replace(small_batch.FASHION, batch_sizes=(64,), seeds=(0,),
                           methods=('sogclr',), train_epochs=1)
# name: (what changes, the fields it sets). Learning rates are the peak at batch 64.
VARIANTS = {
    'base': ('the benchmark recipe', {}),
    't0.2': ('temperature 0.2', {'temperature': 0.2}),
    't0.5': ('temperature 0.5', {'temperature': 0.5}),
    'lr4e-3': ('learning rate 4e-3', {'base_learning_rate': 4e-3 / 8}),
    'lr1e-3': ('learning rate 1e-3', {'base_learning_rate': 1e-3 / 8}),
    'crop0.08': ('crop area >= 0.08', {'crop_area_min': 0.08}),
    'crop0.4': ('crop area >= 0.4', {'crop_area_min': 0.4}),
    'jitter0': ('no brightness/contrast jitter', {'color_jitter_strength': 0.0}),
    'jitter1': ('jitter strength 1.0', {'color_jitter_strength': 1.0}),
    'w0.5': ('width x0.5 (256 features)', {'width_multiplier': 0.5}),
}


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variants', default=','.join(VARIANTS),
                      help=f'Comma-separated, in this order; some of {", ".join(VARIANTS)}.')
  parser.add_argument('--train_epochs', type=int, default=BASE.train_epochs)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--collect', action='store_true',
                      help='Only the table of the variants already measured.')
  parser.add_argument('--work_dir', default=os.path.join(small_batch.REPO, 'runs',
                                                         'fashion_recipe'))
  parser.add_argument('--out_dir', default=os.path.join(small_batch.REPO, 'bench', 'results',
                                                        'fashion_mnist'))
  parser.add_argument('--data_dir', default=None, help='TFDS data directory.')
  args = parser.parse_args(argv)
  unknown = set(args.variants.split(',')) - set(VARIANTS)
  if unknown:
    parser.error(f'--variants: unknown {sorted(unknown)}')
  return args


def variant_settings(name, train_epochs):
  return dataclasses.replace(BASE, train_epochs=train_epochs, **VARIANTS[name][1])


def markdown_table(records):
  lines = ['| variant | linear top-1 % | kNN top-1 % | kNN after each epoch % | training s | '
           'images/s |', '| :--- | ---: | ---: | :--- | ---: | ---: |']
  for name, record in records.items():
    curve = ', '.join(f'{100 * top_1:.1f}' for _, top_1 in record['curve'])
    lines.append(f"| {VARIANTS[name][0]} | {100 * record['linear_top_1']:.1f} | "
                 f"{100 * record['knn_top_1']:.1f} | {curve} | {record['train_seconds']:.0f} | "
                 f"{record['images_per_second']:.0f} |")
  return '\n'.join(lines) + '\n'


def main(argv):
  args = parse_args(argv)
  logging.use_absl_handler()
  tf.get_logger().setLevel('ERROR')
  os.makedirs(args.work_dir, exist_ok=True)
  os.makedirs(args.out_dir, exist_ok=True)
  builder = data_lib.get_builder(BASE.dataset, args.data_dir)
  info = data_lib.describe(builder, 'train', 'test')
  records = {}
  started = time.time()
  for name in args.variants.split(','):
    settings = variant_settings(name, args.train_epochs)
    work_dir = os.path.join(args.work_dir, f'{name}_e{args.train_epochs}')
    os.makedirs(work_dir, exist_ok=True)
    record = small_batch.cached_record(settings, 'sogclr', 64, args.seed, work_dir)
    if record is None and not args.collect:
      record = small_batch.pretrain_and_measure(
          settings, 'sogclr', 64, args.seed, work_dir, args.data_dir, builder, info,
          small_batch.fixed_views(builder, info, settings))
    if record is not None:
      records[name] = record
      print(f"[{time.time() - started:6.0f} s] {name}: linear {record['linear_top_1']:.4f}, "
            f"kNN {record['knn_top_1']:.4f}", flush=True)
  table = markdown_table(records)
  with open(os.path.join(args.out_dir, 'recipe.md'), 'w') as f:
    f.write(table)
  with open(os.path.join(args.out_dir, 'recipe.json'), 'w') as f:
    json.dump({'base': dataclasses.asdict(BASE) | {'train_epochs': args.train_epochs},
               'variants': {name: VARIANTS[name][1] for name in records},
               'runs': records, 'machine': {'cpus': os.cpu_count(),
                                            'load_average_after': os.getloadavg()}},
              f, indent=2)
  print(table)


if __name__ == '__main__':
  main(sys.argv[1:])
