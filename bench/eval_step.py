r"""Time of one evaluation step on a real dataset: the features held on the host (one forward
pass a split shared by the head, the kNN, the Projector and the probe) against the replicas'
path (the head's pass, the streaming kNN's passes, the Projector's and the probe's own), as
evaluation.Evaluator chooses by --probe_max_examples.

Two kinds of step are timed, as a pretraining run with --eval_every_epochs meets them: an epoch's
evaluation (head, kNN, Projector) and the last step's (the same, then the probe). The network is
the Fashion-MNIST recipe's (ResNet-18 x0.5 at 32 px, random weights: the time does not depend on
them). The two paths alternate within one process, `--repeats` times each; compare the ratio.

  python bench/eval_step.py                                   # Fashion-MNIST, about 15 minutes
  python bench/eval_step.py --dataset=digits --image_size=16  # the demo digits, a quick look
"""
import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import data as data_lib  # noqa: E402
import evaluation  # noqa: E402
import model as model_lib  # noqa: E402
import probe  # noqa: E402


def evaluator(strategy, model, builder, info, args, held, logdir):
  config = evaluation.EvalConfig(
      eval_batch_size=args.eval_batch_size, knn_monitor=True, probe_baselines=False,
      probe_max_examples=100_000 if held else 0)
  made = evaluation.Evaluator(
      strategy, model, builder, info, config,
      data=data_lib.DataConfig(dataset=args.dataset, data_dir=args.data_dir, train_split='train',
                               eval_split='test', image_size=args.image_size),
      projector_dir=logdir)
  assert made.holds_features == held
  return made


def time_step(made, step, final):
  """Seconds of one evaluation at `step` (a new step: nothing cached), with the probe when
  `final`. The replicas' evaluator has --probe_max_examples=0, so its probe is made here as
  before: the train split extracted for it, the eval split's features the Projector's."""
  start = time.perf_counter()
  results = made.evaluate(step, knn=True, log=False)
  if final and made.holds_features:
    results |= made.probe(step)
  elif final:
    results['probe/top_1'] = probe.linear_probe_accuracy(
        *made.features(step, made.data.train_split), *made.features(step, made.data.eval_split))
  return time.perf_counter() - start, results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--dataset', default='fashion_mnist')
  parser.add_argument('--data_dir', default=os.path.expanduser('~/tensorflow_datasets'))
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--width_multiplier', type=float, default=0.5)
  parser.add_argument('--eval_batch_size', type=int, default=1000)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--precision', default='mixed_bfloat16')
  args = parser.parse_args(argv)
  tf.keras.mixed_precision.set_global_policy(args.precision)
  builder = data_lib.get_builder(args.dataset, args.data_dir)
  info = data_lib.describe(builder, 'train', 'test')
  strategy = tf.distribute.get_strategy()
  model = model_lib.build_model(model_lib.ModelConfig(
      resnet_depth=18, width_multiplier=args.width_multiplier, cifar_stem=True,
      num_classes=info.num_classes), args.image_size)
  times = {(held, final): [] for held in (True, False) for final in (False, True)}
  step = 0
  with tempfile.TemporaryDirectory() as logdir:
    made = {held: evaluator(strategy, model, builder, info, args, held, logdir)
            for held in (True, False)}
    # A first step of each path traces its functions; it is not timed.
    for held in (True, False):
      step += 1
      time_step(made[held], step, final=False)
    for repeat in range(args.repeats):
      for final in (False, True):
        order = (True, False) if repeat % 2 == 0 else (False, True)
        for held in order:
          step += 1
          seconds, results = time_step(made[held], step, final)
          times[held, final].append(seconds)
          print(f"{'held' if held else 'replicas':>8} {'last step' if final else 'epoch':>9} "
                f"{seconds:7.1f} s  head {results['eval/top_1']:.4f} "
                f"kNN {results['eval/knn_top_1']:.4f}" + (
                    f" probe {results['probe/top_1']:.4f}" if final else ''), flush=True)
  print(f'\n{info.name}: {info.num_train_examples} train, {info.num_eval_examples} test images; '
        f'ResNet-18 x{args.width_multiplier:g} at {args.image_size} px, {args.precision}, '
        f'eval batch {args.eval_batch_size}, {args.repeats} repeats each')
  print('| evaluation | replicas\' path s | features held s | held / replicas |')
  print('| :--- | ---: | ---: | ---: |')
  for final, name in ((False, 'an epoch\'s (head, kNN, Projector)'),
                      (True, 'the last step\'s (and the probe)')):
    held, streamed = np.array(times[True, final]), np.array(times[False, final])
    print(f'| {name} | {streamed.mean():.1f} ± {streamed.std():.1f} | '
          f'{held.mean():.1f} ± {held.std():.1f} | {np.mean(held / streamed):.2f} |')


if __name__ == '__main__':
  main()
