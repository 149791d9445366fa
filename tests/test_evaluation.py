"""evaluation.py on the demo data: the head's metrics and the features cover a split exactly,
the kNN monitor and the probe share one extraction per split, and an Evaluator's tf.functions
are traced once for a whole run while the results follow the weights."""
import glob
import json
import os
import types

import numpy as np
import pytest
import tensorflow as tf

import data as data_lib
import evaluation
import model as model_lib
import probe

# Monitors of the pretraining run; a real weight decay makes the regularization loss visible.
MONITORS = ['--knn_monitor', '--knn_k=20', '--weight_decay=1e-3']


@pytest.fixture(scope='module')
def pretraining(tmp_path_factory, run_main, tiny):
  """3 SogCLR steps with LARS, evaluated with the monitors and the probe.

  model_dir, results, and extracted: the (features, labels) of each call of a FeatureExtractor.
  """
  model_dir = str(tmp_path_factory.mktemp('pretrained'))
  extracted = []
  extract = evaluation.FeatureExtractor.__call__

  def counted(self, dataset):
    value = extract(self, dataset)
    extracted.append(value)
    return value

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(evaluation.FeatureExtractor, '__call__', counted)
    results = run_main(*tiny, *MONITORS, f'--model_dir={model_dir}', '--train_steps=3',
                       '--probe_baselines=False', '--DCL_mode=True', '--optimizer=lars',
                       '--learning_rate=1.0')
  return types.SimpleNamespace(model_dir=model_dir, results=results, extracted=extracted)


@pytest.fixture(scope='module')
def digits(data_dir):
  builder = data_lib.get_builder('digits', data_dir)
  return builder, data_lib.describe(builder, 'train', 'test')


def summary_tags(model_dir):
  tags = set()
  for event_file in glob.glob(os.path.join(model_dir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(event_file):
      tags.update(v.tag for v in event.summary.value)
  return tags


def eager_outputs(model, digits, split):
  """(trunk features, head logits, labels) of a digits split, computed here eagerly on one
  pipeline, without evaluation.py's tf.functions or a strategy."""
  builder, info = digits
  config = data_lib.InputConfig(split=split, global_batch_size=100, image_size=16,
                                is_training=False, num_views=1)
  dataset = data_lib.build_input_fn(builder, info, config, info.num_classes)(
      tf.distribute.InputContext())
  features, logits, labels = [], [], []
  for views, one_hot, _ in dataset:
    outputs = model(views[0], training=False)
    features.append(outputs['features'].numpy())
    logits.append(outputs['supervised_logits'].numpy())
    labels.append(np.argmax(one_hot.numpy(), 1))
  return np.concatenate(features), np.concatenate(logits), np.concatenate(labels)


def split_features(model, digits, split):
  """(trunk features, labels) of a digits split (eager_outputs)."""
  features, _, labels = eager_outputs(model, digits, split)
  return features, labels


@pytest.fixture(scope='module')
def final_features(digits, pretraining, tiny_model_config):
  """(train features, labels, test features, labels) of the pretraining run's final model."""
  model = model_lib.build_model(tiny_model_config(), 16)
  tf.train.Checkpoint(model=model).restore(
      tf.train.latest_checkpoint(pretraining.model_dir)).expect_partial()
  return (*split_features(model, digits, 'train'), *split_features(model, digits, 'test'))


def test_knn_monitor_equals_knn_on_the_checkpoint_features(pretraining, final_features):
  pretrained, results = pretraining.model_dir, pretraining.results
  train_x, train_y, test_x, test_y = final_features
  assert train_x.shape == (1437, 64) and test_x.shape == (360, 64)
  expected = probe.knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=0.1)
  assert results['eval/knn_top_1'] == expected
  assert 0.1 < expected <= 1.0
  saved = json.load(open(os.path.join(pretrained, 'result_3.json')))
  assert saved['eval/knn_top_1'] == expected
  assert 'eval/knn_top_1' in summary_tags(pretrained)


def test_knn_monitor_and_probe_extract_each_split_once(pretraining, final_features):
  # One extraction of the train split and one of the eval split serve both ...
  assert [len(x) for x, _ in pretraining.extracted] == [1437, 360]
  (train_x, train_y), (test_x, test_y) = pretraining.extracted
  # ... and are the final model's features (to float32 round-off).
  for extracted, expected in zip((train_x, train_y, test_x, test_y), final_features):
    np.testing.assert_allclose(extracted, expected, rtol=1e-4, atol=1e-5)
  assert pretraining.results['eval/knn_top_1'] == probe.knn_accuracy(
      train_x, train_y, test_x, test_y, k=20, temperature=0.1)
  assert pretraining.results['probe/top_1'] == probe.linear_probe_accuracy(
      train_x, train_y, test_x, test_y)


def test_eval_covers_the_whole_split_including_the_partial_last_batch(two_replicas, digits,
                                                                      tiny_model_config):
  builder, info = digits
  assert info.num_eval_examples == 360
  # 112 images a step, 56 per replica: 360 = 6 x 56 + 24, so 7 per-replica batches; the 4th step
  # gives replica 0 the partial batch and replica 1 an empty one.
  config = data_lib.InputConfig(split='test', global_batch_size=112, image_size=16,
                                is_training=False, num_views=1)
  dataset = data_lib.build_distributed_dataset(two_replicas, builder, info, config, 10)
  counts, seen = [], []
  for _, _, ids in dataset:
    local = [t.numpy() for t in two_replicas.experimental_local_results(ids)]
    counts.append([len(t) for t in local])
    seen += [i for t in local for i in t.tolist()]
  assert counts == [[56, 56], [56, 56], [56, 56], [24, 0]]
  assert sorted(seen) == list(range(360))  # every image once

  # Evaluation and the probe's features count exactly those images: the replica with the empty
  # batch skips the model (oneDNN's CPU convolution mis-shapes an empty batch).
  with two_replicas.scope():
    model = model_lib.build_model(tiny_model_config(train_mode='pretrain'), 16)
  metrics = evaluation.HeadMetrics(two_replicas, model)(dataset)
  assert metrics['num_examples'] == 360
  assert 0 <= metrics['top_1'] <= metrics['top_5'] <= 1
  features, labels = evaluation.FeatureExtractor(two_replicas, model)(dataset)
  assert features.shape == (360, model.trunk.output_dim) and labels.shape == (360,)
  assert np.all(np.isfinite(features))


def test_evaluator_traces_once_for_the_whole_run_and_follows_the_weights(
    two_replicas, digits, data_dir, tiny_model_config):
  builder, info = digits
  config = tiny_model_config()
  with two_replicas.scope():
    model = model_lib.build_model(config, 16)
  # The weights of the later "checkpoints": each value scaled by its own random factor (BN
  # variances stay positive).
  rng = np.random.default_rng(0)
  later_weights = [[w * rng.uniform(0.5, 1.5, w.shape).astype(w.dtype)
                    for w in model.get_weights()] for _ in range(2)]
  evaluator = evaluation.Evaluator(
      two_replicas, model, builder, info,
      evaluation.EvalConfig(eval_batch_size=100, knn_monitor=True, knn_k=20,
                            probe_baselines=False),
      data=data_lib.DataConfig(dataset='digits', data_dir=data_dir, train_split='train',
                               eval_split='test', image_size=16),
      weight_decay=1e-3)
  extractions = []
  extract = evaluator.extract_features

  def counted(dataset):
    extractions.append(dataset)
    return extract(dataset)

  evaluator.extract_features = counted

  def tracing_counts():
    return (evaluator.head_metrics._sums.experimental_get_tracing_count(),
            extract._run.experimental_get_tracing_count())

  results, traces = [], []
  for step, weights in zip((1, 2, 3), [None, *later_weights]):
    if weights is not None:
      model.set_weights(weights)
    results.append(evaluator.evaluate(step))
    traces.append(tracing_counts())
    if step == 3:  # The probe of the same step reuses the kNN monitor's features of both splits.
      assert 0 <= evaluator.probe(step)['probe/top_1'] <= 1
    assert len(extractions) == 2 * step  # each split once per step

    # The results are those of the weights of this step (the eval split, computed eagerly).
    test_x, logits, test_y = eager_outputs(model, digits, 'test')
    x, y = evaluator.features(step, 'test')
    np.testing.assert_allclose(x, test_x, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(y, test_y)
    assert evaluator.features(step, 'train')[0].shape == (1437, 64)
    assert results[-1]['global_step'] == step
    assert results[-1]['eval/num_examples'] == 360
    assert results[-1]['eval/top_1'] == pytest.approx(np.mean(logits.argmax(1) == test_y))
    assert results[-1]['eval/knn_top_1'] == probe.knn_accuracy(
        *evaluator.features(step, 'train'), *evaluator.features(step, 'test'), k=20,
        temperature=0.1)
    kernels = [v.numpy().astype(np.float64) for v in model.trainable_variables
               if v.name not in ('gamma', 'beta', 'bias')]
    assert results[-1]['eval/regularization_loss'] == pytest.approx(
        1e-3 * sum(np.sum(k ** 2) for k in kernels) / 2, rel=1e-5)

  # The first evaluation traced each function once, plus at most once more for the smaller
  # last batch; the next two evaluations (other weights, other steps) traced nothing.
  assert all(1 <= count <= 2 for count in traces[0]), traces
  assert traces[1] == traces[2] == traces[0], traces
  # Three sets of weights, three sets of results.
  assert len({r['eval/regularization_loss'] for r in results}) == 3
  assert len({(r['eval/top_1'], r['eval/knn_top_1']) for r in results}) == 3
