r"""The input pipeline's own rate next to the train step's consumption, for one config, as a ratio.

  python bench/input_pipeline.py                                  # the demo digits, 16 px
  python bench/input_pipeline.py --dataset=imagenet_s --data_dir=... --image_size=224 \
      --resnet_depth=50 --width_multiplier=1 --batch_size=32
One image = its two views. A ratio above 1 means the pipeline outruns the step; on a shared CPU
both compete for the same cores, so the end-to-end rate (step fed by the pipeline) is printed too.
"""
import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import host_memory  # noqa: E402

host_memory.tune()  # before TensorFlow allocates, as run.py does

import tensorflow as tf  # noqa: E402  (after the path and environment set-up above)

import data as data_lib  # noqa: E402
import lars_optimizer  # noqa: E402
import model as model_lib  # noqa: E402
import objective  # noqa: E402
import trainer as trainer_lib  # noqa: E402


def images_per_second(step_fn, num_steps, batch_size, warmup):
  """Rate of `step_fn()` (one global batch per call) after `warmup` untimed calls."""
  for _ in range(warmup):
    step_fn()
  started = time.perf_counter()
  for _ in range(num_steps):
    step_fn()
  return num_steps * batch_size / (time.perf_counter() - started)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--dataset', default='digits')
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--split', default='train')
  parser.add_argument('--image_size', type=int, default=16)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--resnet_depth', type=int, default=18)
  parser.add_argument('--width_multiplier', type=float, default=0.25)
  parser.add_argument('--loss', choices=['simclr', 'sogclr'], default='sogclr')
  parser.add_argument('--steps', type=int, default=40, help='Timed steps of each measurement.')
  parser.add_argument('--deterministic', action='store_true')
  parser.add_argument('--cache_dataset', action='store_true')
  args = parser.parse_args()

  data_dir = args.data_dir or os.path.join(tempfile.gettempdir(), 'sogclr_bench_tfds')
  builder = data_lib.get_builder(args.dataset, data_dir)
  info = data_lib.describe(builder, args.split, args.split)
  config = data_lib.InputConfig(
      split=args.split, global_batch_size=args.batch_size, image_size=args.image_size,
      is_training=True, use_blur=args.image_size > 32, deterministic=args.deterministic,
      cache_dataset=args.cache_dataset)
  input_fn = data_lib.build_input_fn(builder, info, config, info.num_classes)
  warmup = 5

  pipeline = iter(input_fn(tf.distribute.InputContext()))
  pipeline_rate = images_per_second(lambda: next(pipeline), args.steps, args.batch_size, warmup)

  strategy = tf.distribute.MirroredStrategy(['/cpu:0'])
  with strategy.scope():
    model = model_lib.build_model(model_lib.ModelConfig(
        resnet_depth=args.resnet_depth, width_multiplier=args.width_multiplier,
        cifar_stem=args.image_size <= data_lib.SMALL_IMAGE_SIZE, num_classes=info.num_classes),
        args.image_size)
    optimizer = lars_optimizer.build_optimizer('lars', 0.1, weight_decay=1e-6)
    optimizer.build(model.trainable_variables)
    loss = objective.build(objective.ObjectiveConfig(loss=args.loss, temperature=0.1, gamma=0.9),
                           info.num_train_examples, steps_per_epoch=None)
  trainer = trainer_lib.Trainer(strategy, model, optimizer, objective=loss, weight_decay=1e-6)
  # The step alone: one real batch, repeated from memory.
  batch = next(iter(input_fn(tf.distribute.InputContext())))
  constant = iter(strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensors(batch).repeat()))
  step_rate = images_per_second(lambda: trainer.train_loop(constant, 1), args.steps,
                                args.batch_size, warmup)
  fed = iter(strategy.distribute_datasets_from_function(input_fn))
  end_to_end_rate = images_per_second(lambda: trainer.train_loop(fed, 1), args.steps,
                                      args.batch_size, warmup)

  print(f'{args.dataset} {args.split}: {args.image_size}px, batch {args.batch_size}, '
        f'ResNet-{args.resnet_depth} x{args.width_multiplier}, {args.loss}, '
        f'{os.cpu_count()} CPUs, deterministic={args.deterministic}')
  print(f'input pipeline alone      {pipeline_rate:9.0f} images/s')
  print(f'train step alone          {step_rate:9.0f} images/s')
  print(f'pipeline / step           {pipeline_rate / step_rate:9.2f}x')
  print(f'train step fed by pipeline {end_to_end_rate:8.0f} images/s '
        f'({end_to_end_rate / step_rate:.2f} of the step alone)')


if __name__ == '__main__':
  main()
