"""SogCLR pretraining and evaluation from Python, without run.py or flags.

The library's modules used the way a notebook would: a dataset, a model, an optimizer, the
SogCLR objective with its `u` table, the training loop with checkpoints (resumed when the
directory already holds some), then the linear head's and the kNN's top-1 and the linear probe
on frozen features.

  python examples/pretrain_from_python.py /tmp/tfds /tmp/sogclr_example [steps]

prepares scikit-learn's digits (the demo data) in the first directory on first use, trains a
small ResNet-18 for `steps` steps (default 200, about a minute on 2 cores) into the second, and
prints the results as one json line.
"""
import json
import os
import sys

import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import checkpoints  # noqa: E402  (after the path above)
import data  # noqa: E402
import evaluation  # noqa: E402
import model as model_lib  # noqa: E402
import objective  # noqa: E402
import trainer  # noqa: E402

BATCH_SIZE = 32
IMAGE_SIZE = 16


def pretrain(data_dir, model_dir, steps=200):
  """Pretrains SogCLR on the digits for `steps` steps and evaluates; returns the results."""
  strategy = tf.distribute.MirroredStrategy(['/cpu:0'])
  builder = data.get_builder('digits', data_dir)
  info = data.describe(builder, train_split='train', eval_split='test')
  model_config = model_lib.ModelConfig(resnet_depth=18, width_multiplier=0.25, cifar_stem=True,
                                       num_classes=info.num_classes)
  steps_per_epoch = info.num_train_examples // BATCH_SIZE
  with strategy.scope():
    model = model_lib.build_model(model_config, IMAGE_SIZE)
    optimizer, learning_rate = trainer.build_optimizer(
        trainer.OptimizerConfig(name='adam', learning_rate=0.008, warmup_epochs=0), model,
        global_batch_size=BATCH_SIZE, warmup_steps=0, total_steps=steps)
    # SogCLR: one moving-average denominator u per training image, indexed by the dataset's ids.
    sogclr = objective.build(objective.ObjectiveConfig(loss='sogclr', temperature=0.1, gamma=0.9),
                             info.num_ids, steps_per_epoch)
    # Resumes from model_dir's newest checkpoint (model, optimizer and u), if there is one.
    manager = checkpoints.restore_or_initialize(model, optimizer, sogclr, model_dir=model_dir,
                                                keep_checkpoint_max=2)
  # A resumed pipeline starts where the checkpoint's step left the epoch's order.
  input_config = data.InputConfig(
      split='train', global_batch_size=BATCH_SIZE, image_size=IMAGE_SIZE, is_training=True,
      crop_area_min=0.5, color_jitter_strength=0.5, use_blur=False, random_flip=False,
      unique_ids=True, initial_step=int(optimizer.iterations.numpy()))
  dataset = data.build_distributed_dataset(strategy, builder, info, input_config,
                                           info.num_classes)
  sogclr_trainer = trainer.Trainer(strategy, model, optimizer, objective=sogclr,
                                   weight_decay=1e-6)
  progress = []
  seconds = trainer.train(sogclr_trainer, iter(dataset), total_steps=steps,
                          checkpoint_every=max(1, steps // 2), checkpoint_manager=manager,
                          learning_rate_fn=learning_rate, on_progress=progress.append)
  evaluator = evaluation.Evaluator(
      strategy, model, builder, info,
      evaluation.EvalConfig(eval_batch_size=120, knn_monitor=True, probe_baselines=False,
                            projector_max_points=0),
      data=data.DataConfig(dataset='digits', data_dir=data_dir, train_split='train',
                           eval_split='test', image_size=IMAGE_SIZE))
  step = int(optimizer.iterations.numpy())
  results = evaluator.evaluate(step) | evaluator.probe(step)
  # A directory already at `steps` (or beyond) trains nothing: no loss to report.
  return {'step': step, 'train_seconds': round(seconds, 1),
          'objective_loss': progress[-1].metrics['objective_loss'] if progress else None,
          'u_visited': float(tf.reduce_mean(tf.cast(tf.math.is_finite(sogclr.log_u), tf.float32))),
          'checkpoints': [checkpoints.checkpoint_step(path) for path in manager.checkpoints],
          **{k: results[k] for k in ('eval/top_1', 'eval/knn_top_1', 'probe/top_1')}}


if __name__ == '__main__':
  if len(sys.argv) not in (3, 4):
    sys.exit(__doc__)
  print(json.dumps(pretrain(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))))
