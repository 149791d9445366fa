"""evaluation.py on the demo data: the head's metrics and the features cover a split exactly,
the kNN monitor and the probe share one extraction per split, and an Evaluator's tf.functions
are traced once for a whole run while the results follow the weights."""
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
import summaries

# Monitors of the pretraining run; a real weight decay makes the regularization loss visible.
MONITORS = ['--knn_monitor', '--knn_k=20', '--weight_decay=1e-3']


@pytest.fixture(scope='module')
def pretraining(tmp_path_factory, run_main, tiny):
  """3 SogCLR steps with LARS, evaluated with the monitors and the probe.

  model_dir, results, and extracted: the SplitOutputs of each extraction of a FeatureExtractor.
  """
  model_dir = str(tmp_path_factory.mktemp('pretrained'))
  extracted = []
  extract = evaluation.FeatureExtractor.outputs

  def counted(self, dataset):
    value = extract(self, dataset)
    extracted.append(value)
    return value

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(evaluation.FeatureExtractor, 'outputs', counted)
    results = run_main(*tiny, *MONITORS, f'--model_dir={model_dir}', '--train_steps=3',
                       '--probe_max_examples=100000', '--probe_baselines=False',
                       '--DCL_mode=True', '--optimizer=lars',
                       '--learning_rate=1.0')
  return types.SimpleNamespace(model_dir=model_dir, results=results, extracted=extracted)


@pytest.fixture(scope='module')
def digits(data_dir):
  builder = data_lib.get_builder('digits', data_dir)
  return builder, data_lib.describe(builder, 'train', 'test')


def eager_outputs(model, digits, split):
  """(trunk features, head logits, labels) of a digits split, computed here eagerly on one
  pipeline, without evaluation.py's tf.functions or a strategy."""
  builder, info = digits
  config = data_lib.InputConfig(split=split, global_batch_size=100, image_size=16,
                                is_training=False, num_views=1)
  dataset = data_lib.build_input_fn(builder, info, config, info.num_classes)(
      tf.distribute.InputContext())
  features, logits, labels = [], [], []
  for batch in dataset:
    outputs = model(batch['views'][0], training=False)
    features.append(outputs['features'].numpy())
    logits.append(outputs['supervised_logits'].numpy())
    labels.append(np.argmax(batch['labels'].numpy(), 1))
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


@pytest.mark.slow
def test_knn_monitor_equals_knn_on_the_checkpoint_features(pretraining, final_features):
  pretrained, results = pretraining.model_dir, pretraining.results
  train_x, train_y, test_x, test_y = final_features
  assert train_x.shape == (1437, 64) and test_x.shape == (360, 64)
  expected = probe.knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=0.1)
  assert results['eval/knn_top_1'] == expected
  assert 0.1 < expected <= 1.0
  saved = json.load(open(os.path.join(pretrained, 'result_3.json')))
  assert saved['eval/knn_top_1'] == expected
  assert 'eval/knn_top_1' in summaries.tags(pretrained)


@pytest.mark.slow
def test_the_probe_extracts_each_split_once_and_the_knn_monitor_agrees(pretraining, final_features):
  # The head, the kNN monitor, the probe and the projector read the train split once and the
  # eval split once between them: one forward pass each at the final step ...
  by_size = {len(found.labels): found for found in pretraining.extracted}
  assert sorted(len(found.labels) for found in pretraining.extracted) == [360, 1437]
  train, test = by_size[1437], by_size[360]
  (train_x, train_y), (test_x, test_y) = (train.features, train.labels), (test.features,
                                                                            test.labels)
  # ... and are the final model's features (to float32 round-off).
  for extracted, expected in zip((train_x, train_y, test_x, test_y), final_features):
    np.testing.assert_allclose(extracted, expected, rtol=1e-4, atol=1e-5)
  assert pretraining.results['eval/knn_top_1'] == probe.knn_accuracy(
      train_x, train_y, test_x, test_y, k=20, temperature=0.1)
  assert pretraining.results['probe/top_1'] == probe.linear_probe_accuracy(
      train_x, train_y, test_x, test_y)


def padded_test_split(strategy, digits, global_batch_size=112):
  builder, info = digits
  return evaluation.eval_dataset(strategy, builder, info, 'test',
                                 global_batch_size=global_batch_size, image_size=16,
                                 num_examples=info.num_eval_examples)


@pytest.mark.slow
def test_eval_batches_have_a_static_shape_and_cover_the_split_once(two_replicas, digits,
                                                                   tiny_model_config):
  assert digits[1].num_eval_examples == 360
  # 112 images a step, 56 per replica: 360 = 6 x 56 + 24. Every replica gets 4 full batches;
  # the padding (mask False) fills replica 0's last one and all of replica 1's.
  dataset = padded_test_split(two_replicas, digits)
  specs = tf.nest.flatten(dataset.element_spec, expand_composites=True)
  assert specs and all(spec.shape[0] == 56 for spec in specs), specs
  counts, seen = [], []
  for batch in dataset:
    ids, mask = batch['ids'], batch['mask']
    local = [(i.numpy(), m.numpy()) for i, m in zip(
        two_replicas.experimental_local_results(ids),
        two_replicas.experimental_local_results(mask))]
    assert [len(i) for i, _ in local] == [56, 56]
    counts.append([int(m.sum()) for _, m in local])
    seen += [x for i, m in local for x in i[m].tolist()]
  assert counts == [[56, 56], [56, 56], [56, 56], [24, 0]]
  assert sorted(seen) == list(range(360))  # every image once

  with two_replicas.scope():
    model = model_lib.build_model(tiny_model_config(train_mode='pretrain'), 16)
  head = evaluation.HeadMetrics(two_replicas, model)
  metrics = head(dataset)
  assert metrics['num_examples'] == 360
  assert 0 <= metrics['top_1'] <= metrics['top_5'] <= 1
  # One trace for the whole split, the padded last step included: the step's input signature
  # has a static batch dimension.
  assert head._sums.experimental_get_tracing_count() == 1
  (signature,) = [f.structured_input_signature for f in
                  head._sums._list_all_concrete_functions_for_serialization()]
  inputs = tf.nest.flatten(signature, expand_composites=True)
  assert inputs and all(spec.shape.rank == 0 or spec.shape[0] == 56 for spec in inputs), inputs
  features, labels = evaluation.FeatureExtractor(two_replicas, model)(dataset)
  assert features.shape == (360, model.trunk.output_dim) and labels.shape == (360,)
  assert np.all(np.isfinite(features))


@pytest.mark.slow
@pytest.mark.parametrize('replicas', [1, 2])
def test_padded_eval_equals_unpadded_eager_eval(replicas, one_replica, two_replicas, digits,
                                                tiny_model_config):
  # 360 test images in steps of 112 (1 replica: 3 full batches and one of 24 real images and
  # 88 of padding): the head's top-1, the features and the streaming kNN are those of the
  # unpadded split computed eagerly.
  strategy = two_replicas if replicas == 2 else one_replica
  with strategy.scope():
    model = model_lib.build_model(tiny_model_config(), 16)
  dataset = padded_test_split(strategy, digits)
  test_x, logits, test_y = eager_outputs(model, digits, 'test')
  metrics = evaluation.HeadMetrics(strategy, model)(dataset)
  assert metrics['num_examples'] == 360
  assert metrics['top_1'] == pytest.approx(np.mean(logits.argmax(1) == test_y), abs=1e-9)
  features, labels = evaluation.FeatureExtractor(strategy, model)(dataset)
  np.testing.assert_allclose(features, test_x, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(labels, test_y)
  knn = evaluation.StreamingKNN(strategy, lambda views: model(views[0])['features'], k=20,
                                temperature=0.1, num_classes=10)
  # The test split against itself: a split of 360 in steps of 112 on both sides. (NumPy's kNN
  # on these features, not the eager ones: a difference at 1e-5 can swap two neighbours of
  # nearly equal similarity.)
  assert knn(dataset, dataset) == probe.knn_accuracy(features, labels, features, labels, k=20,
                                                     temperature=0.1)


def test_merge_top_k_keeps_the_k_largest_with_their_labels():
  values = tf.constant([[0.9, 0.5, -np.inf]])
  labels = tf.constant([[1, 2, 0]], tf.int64)
  merged = evaluation.merge_top_k(values, labels, tf.constant([[0.7, -np.inf, 0.95, 0.1]]),
                                  tf.constant([3, 4, 5, 6], tf.int64), 3)
  np.testing.assert_allclose(merged[0].numpy(), [[0.95, 0.9, 0.7]])
  np.testing.assert_array_equal(merged[1].numpy(), [[5, 1, 3]])


def test_streaming_and_host_knn_equal_numpy_knn_on_random_features(one_replica, two_replicas):
  # Clustered random features, train split of 300 in batches of 64 (a padded last batch), 70
  # eval rows in batches of 32; k larger than a batch, so the running top-k is really merged.
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(5, 8))

  def split(n):
    y = rng.integers(0, 5, n)
    return (centers[y] + rng.normal(size=(n, 8))).astype(np.float32), y

  train, test = split(300), split(70)

  def dataset(strategy, x, y, batch):
    def input_fn(context):
      per_replica = context.get_per_replica_batch_size(batch)
      steps = -(-len(x) // batch)
      padded = steps * batch - len(x)
      d = tf.data.Dataset.from_tensor_slices(data_lib.batch(
          (np.concatenate([x, np.zeros((padded, 8), np.float32)]),),
          np.eye(5, dtype=np.float32)[np.concatenate([y, np.zeros(padded, int)])],
          np.arange(steps * batch), mask=np.arange(steps * batch) < len(x)))
      return d.batch(per_replica, drop_remainder=True)
    return strategy.distribute_datasets_from_function(input_fn)

  expected = probe.knn_accuracy(*train, *test, k=100, temperature=0.1)
  assert 0.3 < expected < 1.0
  for strategy in (one_replica, two_replicas):
    knn = evaluation.StreamingKNN(strategy, lambda views: views[0], k=100, temperature=0.1,
                                  num_classes=5)
    assert knn(dataset(strategy, *train, 64), dataset(strategy, *test, 32)) == expected
  # k above the train split's size votes with all of it (the padding never counts).
  everything = evaluation.StreamingKNN(one_replica, lambda views: views[0], k=5000,
                                       temperature=0.1, num_classes=5)
  assert everything(dataset(one_replica, *train, 64), dataset(one_replica, *test, 32)) == (
      probe.knn_accuracy(*train, *test, k=300, temperature=0.1))
  # The same classifier on features held on the host, in chunks of 32 eval rows (3 chunks).
  for k, reference_k in ((100, 100), (5000, 300)):
    assert evaluation.knn_top_1(*train, *test, k=k, temperature=0.1, num_classes=5,
                                chunk_size=32) == probe.knn_accuracy(
                                    *train, *test, k=reference_k, temperature=0.1)


@pytest.mark.slow  # about 5 s
def test_the_knn_records_the_neighbours_it_used(one_replica, digits, data_dir, tiny_model_config,
                                                caplog):
  # Finding (red team): --knn_k=5000 on 1,437 training digits logged k=5000 and recorded no k.
  builder, info = digits
  with one_replica.scope():
    model = model_lib.build_model(tiny_model_config(), 16)
  found = {}
  for k in (20, 5000):
    evaluator = evaluation.Evaluator(
        one_replica, model, builder, info,
        evaluation.EvalConfig(eval_batch_size=360, knn_k=k, projector_max_points=0),
        data=data_lib.DataConfig(dataset='digits', data_dir=data_dir, train_split='train',
                                 eval_split='test', image_size=16))
    with caplog.at_level('INFO', logger='absl'):
      found[k] = evaluator.evaluate(44, knn=True)['eval/knn_k']
  assert found == {20: 20, 5000: 1437}
  assert '(k=20)' in caplog.text
  assert '(k=1437, all of --train_split=train: --knn_k=5000 is more)' in caplog.text


@pytest.mark.slow
def _assert_results_are_those_of(model, evaluator, digits, step, result):
  """The evaluation `result` of `step` is that of the model's current weights: the eval split
  computed eagerly, kNN and the regularization loss recomputed in NumPy."""
  test_x, logits, test_y = eager_outputs(model, digits, 'test')
  x, y = evaluator.features(step, 'test')
  np.testing.assert_allclose(x, test_x, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(y, test_y)
  assert evaluator.features(step, 'train')[0].shape == (1437, 64)
  assert result['global_step'] == step
  assert result['eval/num_examples'] == 360
  assert result['eval/top_1'] == pytest.approx(np.mean(logits.argmax(1) == test_y))
  top_5 = np.argsort(-logits, 1)[:, :5]
  assert result['eval/top_5'] == pytest.approx(np.mean(np.any(top_5 == test_y[:, None], 1)))
  # Within one image of the float64 reference: these random-scaled weights give near-tied
  # 20th neighbours, which the replicas' float32 similarities may order differently (seen
  # once in a full run: 0.5028 against 0.5000); test_knn_monitor_equals_knn_on_the_checkpoint_
  # features pins exact equality on trained features.
  assert result['eval/knn_top_1'] == pytest.approx(probe.knn_accuracy(
      *evaluator.features(step, 'train'), *evaluator.features(step, 'test'), k=20,
      temperature=0.1), abs=1.5 / 360)
  kernels = [v.numpy().astype(np.float64) for v in model.trainable_variables
             if v.name not in ('gamma', 'beta', 'bias')]
  assert result['eval/regularization_loss'] == pytest.approx(
      1e-3 * sum(np.sum(k ** 2) for k in kernels) / 2, rel=1e-5)


def _counted_extractions(evaluator):
  """The list of the datasets `evaluator` extracts features from from now on."""
  extractions = []
  extract = evaluator.extract_features.outputs

  def counted(dataset):
    extractions.append(dataset)
    return extract(dataset)

  evaluator.extract_features.outputs = counted
  return extractions


@pytest.mark.slow
@pytest.mark.parametrize('held', [True, False], ids=['features_held', 'streamed'])
def test_evaluator_traces_once_for_the_whole_run_and_follows_the_weights(
    held, two_replicas, digits, data_dir, tiny_model_config):
  # held: the train split (1,437) within --probe_max_examples, so one forward pass a split
  # serves the head, the kNN and the probe; streamed: --probe_max_examples=0, the head's
  # metrics and the kNN on the replicas.
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
                            probe_baselines=False, projector_max_points=0,
                            probe_max_examples=100_000 if held else 0),
      data=data_lib.DataConfig(dataset='digits', data_dir=data_dir, train_split='train',
                               eval_split='test', image_size=16),
      weight_decay=1e-3)
  assert evaluator.holds_features == held
  extractions = _counted_extractions(evaluator)

  def tracing_counts():
    knn = evaluator.streaming_knn
    return (evaluator.head_metrics._sums.experimental_get_tracing_count(),
            evaluator.extract_features._run.experimental_get_tracing_count(),
            knn._eval_step.experimental_get_tracing_count(),
            knn._train_step.experimental_get_tracing_count())

  results, traces = [], []
  for step, weights in zip((1, 2, 3), [None, *later_weights]):
    if weights is not None:
      model.set_weights(weights)
    results.append(evaluator.evaluate(step))
    # Held: each split read once at this step; streamed: no host extraction.
    assert len(extractions) == (2 * step if held else 2 * (step - 1))
    if held and step == 3:  # The probe of the same step reuses the evaluation's features.
      top_1 = evaluator.probe(step)['probe/top_1']
      assert len(extractions) == 6
      assert top_1 == probe.linear_probe_accuracy(*evaluator.features(step, 'train'),
                                                  *evaluator.features(step, 'test'))
      assert top_1 > 0.3  # even a random trunk's features beat chance (0.1) on digits
    _assert_results_are_those_of(model, evaluator, digits, step, results[-1])
    assert len(extractions) == 2 * step  # each split once per step
    traces.append(tracing_counts())

  # The first evaluation traced each function it uses once (static batches: the padded last
  # batch too); the next two evaluations (other weights, other steps) traced nothing.
  assert traces[0] == ((0, 1, 0, 0) if held else (1, 1, 1, 1)), traces
  assert traces[1] == traces[2] == traces[0], traces
  # Three sets of weights, three sets of results.
  assert len({r['eval/regularization_loss'] for r in results}) == 3
  assert len({(r['eval/top_1'], r['eval/knn_top_1']) for r in results}) == 3


def tiny_evaluator(strategy, digits, data_dir, model_config):
  """(model, Evaluator) of a new tiny model on the digits' test split."""
  builder, info = digits
  with strategy.scope():
    model = model_lib.build_model(model_config, 16)
  return model, evaluation.Evaluator(
      strategy, model, builder, info,
      evaluation.EvalConfig(eval_batch_size=100, knn_k=20, projector_max_points=0),
      data=data_lib.DataConfig(dataset='digits', data_dir=data_dir, train_split='train',
                               eval_split='test', image_size=16),
      weight_decay=1e-3)


@pytest.mark.slow
def test_a_step_evaluated_while_training_is_not_evaluated_again(one_replica, digits, data_dir,
                                                                tiny_model_config):
  model, evaluator = tiny_evaluator(one_replica, digits, data_dir, tiny_model_config())
  knn_calls = []
  knn = evaluator.knn
  evaluator.knn = lambda step: knn_calls.append(step) or knn(step)
  monitored = evaluator.evaluate(5, knn=True, log=False)  # the last --eval_every_epochs one
  assert evaluator.evaluate(5) == monitored  # the end of training: the same step, not redone
  assert evaluator.evaluate(5, knn=True) == monitored
  assert len(knn_calls) == 1
  model.set_weights([w * 1.5 for w in model.get_weights()])
  later = evaluator.evaluate(6, knn=True)
  assert len(knn_calls) == 2 and later['global_step'] == 6
  assert later['eval/regularization_loss'] > monitored['eval/regularization_loss']


def test_an_evaluation_before_the_batch_norm_statistics_settle_says_so(one_replica, digits,
                                                                       data_dir, tiny_model_config,
                                                                       caplog):
  # 0.9 ** 43 = 1.08% of the initial statistics left, 0.9 ** 44 = 0.97%.
  assert evaluation.unsettled_statistics(44, 0.9) is None
  assert evaluation.unsettled_statistics(43, 0.9) == (
      'Evaluated at step 43: the BatchNorm moving statistics (--batch_norm_decay=0.9) still hold '
      "1% of their initial values, which inference mode uses: the head's top-1 and the "
      'projections can be near chance until about step 44')
  assert evaluation.unsettled_statistics(0, 0.0).endswith('until about step 1')
  assert evaluation.unsettled_statistics(100, 0.99).startswith(
      'Evaluated at step 100: the BatchNorm moving statistics (--batch_norm_decay=0.99) still '
      'hold 37% ')
  # The evaluator logs it with its line (not for an evaluation while training, log=False), and
  # not once the statistics have settled.
  _, evaluator = tiny_evaluator(one_replica, digits, data_dir, tiny_model_config())
  # The end of training's evaluation of a step evaluated while training warns too.
  with caplog.at_level('INFO', logger='absl'):
    for step, log in ((5, False), (5, True), (6, True), (44, True)):
      evaluator.evaluate(step, log=log)
  warnings = [r.getMessage() for r in caplog.records
              if r.levelname == 'WARNING' and r.name == 'absl']
  assert warnings == [evaluation.unsettled_statistics(step, 0.9) for step in (5, 6)]


def test_evaluators_made_one_after_another_do_not_read_as_retracing(one_replica, caplog):
  # Finding (CI): TensorFlow counts the traces of every tf.function of one code object together
  # and warned of "excessive retracing" once 5 HeadMetrics of one process (runs one after
  # another in a notebook or a test worker) had each traced its own function once.
  def logits(views, training):
    del training
    return {'supervised_logits': tf.one_hot(tf.zeros([2], tf.int32), 10) + views[:, 0, 0, :1]}

  batch = {'views': (tf.zeros([2, 4, 4, 3]),), 'labels': tf.one_hot([0, 1], 10),
           'mask': tf.ones([2])}
  with caplog.at_level('WARNING'):
    for _ in range(7):
      assert float(evaluation.HeadMetrics(one_replica, logits)._sums(batch)['top_1']) == 1.0
  assert not [r for r in caplog.records if 'retracing' in r.getMessage()]
