"""Scale-out paths testable on a CPU: the strategy plan (TPU flags, TF_CONFIG, GPUs), the TPU
resolver for an address, static per-replica shapes, eval coverage and no host calls in the step."""
import socket

import numpy as np
import pytest
import tensorflow as tf

import data
import lars_optimizer
import model as model_lib
import objective
import run
from test_reliability import run_cli

TPU_NAME = 'my-tpu'
TPU_ADDRESS = 'grpc://10.0.0.2:8470'
ONE_TASK = {'cluster': {'worker': ['host0:2222']}, 'task': {'type': 'worker', 'index': 0}}
TWO_TASKS = {'cluster': {'worker': ['host0:2222', 'host1:2222']},
             'task': {'type': 'worker', 'index': 1}}
# How the machine offers a TPU: flags naming one, a TPU VM's attached TPU, or nothing.
TPU_SOURCES = {
    'tpu_name': dict(tpu_name=TPU_NAME, master=None, tpu_zone='us-central2-b',
                     gcp_project='my-project', tpu_attached=False),
    'master': dict(tpu_name=None, master=TPU_ADDRESS, tpu_zone=None, gcp_project=None,
                   tpu_attached=False),
    'tpu_vm': dict(tpu_name=None, master=None, tpu_zone=None, gcp_project=None,
                   tpu_attached=True),
    'none': dict(tpu_name=None, master=None, tpu_zone=None, gcp_project=None,
                 tpu_attached=False),
}
# The TPUClusterResolver arguments each source leads to, and whether the address is remote.
EXPECTED_TPU = {
    'tpu_name': ({'tpu': TPU_NAME, 'zone': 'us-central2-b', 'project': 'my-project'}, True),
    'master': ({'tpu': TPU_ADDRESS, 'zone': None, 'project': None}, True),
    'tpu_vm': ({'tpu': 'local', 'zone': None, 'project': None}, False),
}


def plan(use_tpu=None, tpu_name=None, master=None, tpu_zone=None, gcp_project=None,
         tpu_attached=False, tf_config=None, num_gpus=0):
  return run.strategy_plan(use_tpu, tpu_name, master, tpu_zone, gcp_project,
                           tpu_attached=tpu_attached, tf_config=tf_config or {},
                           num_gpus=num_gpus)


@pytest.mark.parametrize('num_gpus', [0, 2])
@pytest.mark.parametrize('tf_config', [{}, ONE_TASK, TWO_TASKS], ids=['none', '1task', '2tasks'])
@pytest.mark.parametrize('source', list(TPU_SOURCES))
@pytest.mark.parametrize('use_tpu', [None, True, False])
def test_strategy_plan_for_every_combination(use_tpu, source, tf_config, num_gpus):
  kwargs = TPU_SOURCES[source]
  if use_tpu and source == 'none':
    with pytest.raises(ValueError, match=r'^--use_tpu=True but no TPU is attached'):
      plan(use_tpu, **kwargs, tf_config=tf_config, num_gpus=num_gpus)
    return
  result = plan(use_tpu, **kwargs, tf_config=tf_config, num_gpus=num_gpus)
  if use_tpu is not False and source != 'none':
    # A TPU wins over TF_CONFIG and GPUs.
    resolver_kwargs, remote = EXPECTED_TPU[source]
    assert result.kind == 'tpu'
    assert result.tpu_resolver_kwargs == resolver_kwargs
    assert result.connect_to_cluster == remote
    assert result.devices is None
    assert any('TF_CONFIG ignored' in w for w in result.warnings) == (tf_config is TWO_TASKS)
    return
  assert result.tpu_resolver_kwargs is None and not result.connect_to_cluster
  if tf_config is TWO_TASKS:
    assert result.kind == 'multi_worker' and result.devices is None
  else:  # No TF_CONFIG, or one of a single task: this host alone.
    assert result.kind == 'mirrored'
    assert result.devices == (None if num_gpus else ('/cpu:0',))
  # --use_tpu=False with TPU flags runs without a TPU and says which flags it ignored.
  ignored = [w for w in result.warnings if w.startswith('--use_tpu=False: ignoring')]
  assert bool(ignored) == (use_tpu is False and source in ('tpu_name', 'master'))
  if source == 'tpu_name' and ignored:
    assert ignored[0].endswith('--tpu_name, --tpu_zone, --gcp_project')


def test_tpu_name_wins_over_master_with_a_warning():
  result = plan(tpu_name=TPU_NAME, master=TPU_ADDRESS)
  assert result.tpu_resolver_kwargs['tpu'] == TPU_NAME
  assert result.warnings == (f"--master='{TPU_ADDRESS}' ignored: --tpu_name='{TPU_NAME}' names "
                             'the TPU',)
  # A grpc:// address given as --tpu_name is remote too; an attached TPU does not override it.
  result = plan(tpu_name=TPU_ADDRESS, tpu_attached=True)
  assert result.tpu_resolver_kwargs['tpu'] == TPU_ADDRESS and result.connect_to_cluster


@pytest.mark.parametrize('use_tpu', [None, True])
@pytest.mark.parametrize('flag, kwargs', [
    ('tpu_zone', dict(tpu_zone='us-central2-b')),
    ('gcp_project', dict(gcp_project='my-project')),
    ('tpu_zone', dict(tpu_zone='us-central2-b', master=TPU_ADDRESS)),
    ('gcp_project', dict(gcp_project='my-project', tpu_attached=True)),
])
def test_zone_or_project_without_tpu_name_is_an_error(use_tpu, flag, kwargs):
  # They only locate a TPU by name: given alone they are a mistake, not a hint to ignore.
  with pytest.raises(ValueError, match=rf'^--{flag}=.* locates a Cloud TPU by --tpu_name'):
    plan(use_tpu, **kwargs)


def test_use_tpu_without_a_tpu_is_a_one_line_error_from_the_command_line(capsys, tmp_path):
  code, err = run_cli(capsys, '--use_tpu=True', '--dataset=digits', f'--model_dir={tmp_path}')
  assert code == 1
  lines = [l for l in err.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and lines[0].startswith('error: --use_tpu=True but no TPU'), err[-2000:]
  run.FLAGS.unparse_flags()


@pytest.fixture
def no_network(monkeypatch):
  """Any attempt to resolve a host name or open a connection fails the test."""

  def refuse(*args, **kwargs):
    raise AssertionError(f'network access: {args}')

  for name in ('create_connection', 'getaddrinfo', 'gethostbyname'):
    monkeypatch.setattr(socket, name, refuse)
  monkeypatch.setattr(socket.socket, 'connect', refuse)


@pytest.mark.parametrize('source', ['master', 'tpu_vm'])
def test_tpu_resolver_for_an_address_or_a_tpu_vm_is_built_offline(source, no_network):
  # A Cloud TPU *name* is looked up through the Cloud TPU API (network, cloud-tpu-client): not
  # constructed here. connect_to_cluster and initialize_tpu_system need the TPU itself.
  planned = plan(**TPU_SOURCES[source])
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver(**planned.tpu_resolver_kwargs)
  if source == 'master':
    assert resolver.master() == TPU_ADDRESS
    assert resolver.cluster_spec().as_dict() == {'worker': ['10.0.0.2:8470']}
  else:
    assert resolver.master() == '' and resolver.cluster_spec().as_dict() == {}


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
  builder = data.get_builder('digits', str(tmp_path_factory.mktemp('tfds')))
  return builder, data.describe(builder, 'train', 'test')


def test_training_batches_are_static_per_replica_halves_of_the_global_batch(two_replicas,
                                                                            digits):
  builder, info = digits
  config = data.InputConfig(split='train', global_batch_size=32, image_size=16,
                            is_training=True, use_blur=False)
  dataset = data.build_distributed_dataset(two_replicas, builder, info, config, 10)
  # Fully defined shapes (TPUs compile the step for them): the remainder of an epoch is dropped.
  per_replica = tf.nest.flatten(dataset.element_spec, expand_composites=True)
  assert len(per_replica) == 2 * 4  # (view 1, view 2, labels, ids) on each replica
  for spec in per_replica:
    assert spec.shape.is_fully_defined() and spec.shape[0] == 16, spec
  views, labels, ids = next(iter(dataset))
  for tensors in (views[0], views[1], labels, ids):
    assert [t.shape[0] for t in two_replicas.experimental_local_results(tensors)] == [16, 16]
  # The two replicas hold different images: one global batch of 32 distinct ids.
  assert len(set(np.concatenate(
      [t.numpy() for t in two_replicas.experimental_local_results(ids)]))) == 32


def test_eval_covers_the_whole_split_including_the_partial_last_batch(two_replicas, digits):
  builder, info = digits
  assert info.num_eval_examples == 360
  # 112 images a step, 56 per replica: 360 = 6 x 56 + 24, so 7 per-replica batches; the 4th step
  # gives replica 0 the partial batch and replica 1 an empty one.
  config = data.InputConfig(split='test', global_batch_size=112, image_size=16,
                            is_training=False, num_views=1)
  dataset = data.build_distributed_dataset(two_replicas, builder, info, config, 10)
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
    model = run.build_model(tiny_config('pretrain'), 16)
  metrics = run.evaluate(two_replicas, model, dataset)
  assert metrics['num_examples'] == 360
  assert 0 <= metrics['top_1'] <= metrics['top_5'] <= 1
  features, labels = run.extract_features(two_replicas, model, dataset)
  assert features.shape == (360, model.trunk.output_dim) and labels.shape == (360,)
  assert np.all(np.isfinite(features))


def tiny_config(train_mode):
  return model_lib.ModelConfig(resnet_depth=18, width_multiplier=0.125, cifar_stem=True,
                               num_proj_layers=2, proj_out_dim=16, num_classes=10,
                               train_mode=train_mode)


HOST_CALL_OPS = {'PyFunc', 'PyFuncStateless', 'EagerPyFunc'}


def host_call_ops(concrete_function):
  """Ops of the function graph and of every function it calls that run Python on the host."""
  graph = concrete_function.graph
  ops = [op.type for op in graph.get_operations()]
  library = graph.as_graph_def().library.function
  ops += [node.op for function in library for node in function.node_def]
  return sorted({op for op in ops if op in HOST_CALL_OPS}), len(library)


def test_host_call_detector_finds_a_py_function_inside_the_replicated_loop(two_replicas):
  # The check below must be able to fail: the same structure with one tf.py_function.
  with two_replicas.scope():
    variable = tf.Variable(0.0)

  def step():
    variable.assign_add(tf.py_function(lambda: np.float32(1.0), [], tf.float32))

  @tf.function
  def loop(num_steps):
    for _ in tf.range(num_steps):
      two_replicas.run(step)

  found, _ = host_call_ops(loop.get_concrete_function(tf.constant(2)))
  assert found == ['EagerPyFunc']


def test_traced_train_loop_has_no_host_calls(two_replicas):
  # SogCLR's step computes SimCLR's similarities and logits plus the u table, and pretraining
  # traces the supervised head too: one trace covers the ops of every mode.
  with two_replicas.scope():
    model = run.build_model(tiny_config('pretrain'), 16)
    optimizer = lars_optimizer.build_optimizer('lars', 0.01, weight_decay=1e-4)
    optimizer.build(model.trainable_variables)
    sogclr = objective.SogCLRLoss(64, 0.1, 0.9)
  trainer = run.Trainer(two_replicas, model, optimizer, loss='sogclr', temperature=0.1,
                        hidden_norm=True, weight_decay=1e-4, optimizer_name='lars', sogclr=sogclr)
  views = (np.zeros([64, 16, 16, 3], np.float32),) * 2
  dataset = tf.data.Dataset.from_tensor_slices(
      (views, np.zeros([64, 10], np.float32), np.arange(64, dtype=np.int32))).batch(
          8, drop_remainder=True)
  iterator = iter(two_replicas.experimental_distribute_dataset(dataset))
  concrete = trainer._loop.get_concrete_function(  # pylint: disable=protected-access
      iterator, tf.constant(2, tf.int32))
  found, num_functions = host_call_ops(concrete)
  assert num_functions > 0  # the tf.range loop body is a nested function: it was searched
  assert not found, f'the train loop calls the host: {found}'
