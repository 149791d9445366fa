"""bench/long_runs.py: a record holds a finished run's newest result and its flags, and the table
pairs each objective's probe with SimCLR's of the same seed, width, batch size and epochs."""
import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def long_runs():
  spec = importlib.util.spec_from_file_location(
      'long_runs', os.path.join(REPO, 'bench', 'long_runs.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def write_run(model_dir, *, seed, probe, knn_curve, dcl_mode=True, loss=None,
              train_mode='pretrain', batch=64):
  """A finished run's files as run.py leaves them: flags.json and a result file per epoch."""
  os.makedirs(model_dir)
  flags = {'train_mode': train_mode, 'DCL_mode': dcl_mode, 'loss': loss, 'seed': seed,
           'width_multiplier': 0.5, 'train_epochs': len(knn_curve), 'train_batch_size': batch}
  with open(os.path.join(model_dir, 'flags.json'), 'w') as f:
    json.dump(flags, f)
  monitor = []
  for epoch, knn in enumerate(knn_curve, 1):
    monitor.append({'epoch': float(epoch), 'eval/knn_top_1': knn, 'global_step': 100 * epoch})
    result = {'global_step': 100 * epoch, 'trained_from_step': 0, 'train_seconds': 40.0 * epoch,
              'eval/knn_top_1': knn, 'eval/top_1': 0.8, 'monitor': list(monitor)}
    if epoch == len(knn_curve):
      result['probe/top_1'] = probe
    with open(os.path.join(model_dir, f'result_{100 * epoch}.json'), 'w') as f:
      json.dump(result, f)


def test_records_and_their_table_pair_each_seed_with_simclr(long_runs, tmp_path, capsys):
  out_dir = tmp_path / 'results'
  os.makedirs(out_dir)
  (out_dir / 'baselines.json').write_text(json.dumps(
      {'raw_pixels': {'linear_top_1': 0.841, 'knn_top_1': 0.7885}}))
  runs = {'simclr_w05_e2_s0': dict(seed=0, probe=0.8779, knn_curve=[0.79, 0.8217],
                                   dcl_mode=False),
          'simclr_w05_e2_s1': dict(seed=1, probe=0.8790, knn_curve=[0.79, 0.82], dcl_mode=False),
          'sogclr_w05_e2_s0': dict(seed=0, probe=0.8825, knn_curve=[0.7964, 0.8209]),
          'sogclr_w05_e2_s1': dict(seed=1, probe=0.8869, knn_curve=[0.7992, 0.8253]),
          # Another batch size: its own group, paired with no SimCLR of batch 64.
          'sogclr_w05_b512_e2_s0': dict(seed=0, probe=0.8700, knn_curve=[0.78, 0.81], batch=512)}
  for name, run in runs.items():
    write_run(str(tmp_path / name), **run)
    long_runs.main(['--record', str(tmp_path / name), f'--name={name}', '--host=h',
                    f'--out_dir={out_dir}'])
  record = json.loads((out_dir / 'sogclr_w05_e2_s1.json').read_text())
  # The newest result file: the end-of-run probe and the whole per-epoch monitor.
  assert record['results']['global_step'] == 200 and record['results']['probe/top_1'] == 0.8869
  assert record['flags']['seed'] == 1 and record['host'] == 'h'

  # A global objective measured for one of SogCLR's two seeds (a checkpoint kept).
  path = out_dir / 'sogclr_w05_e2_s0.json'
  path.write_text(json.dumps(json.loads(path.read_text()) | {'global_objective': 7.5244}))
  capsys.readouterr()
  long_runs.main([f'--out_dir={out_dir}'])
  lines = (out_dir / 'long_runs.md').read_text().splitlines()
  assert lines[2] == '| SimCLR | 0.5 | 64 | 2 | 0 |  | 87.8 | +3.7 |  | 82.2 | 80.0 | 80 | 160 |'
  assert lines[4] == ('| SimCLR, mean ± sd | 0.5 | 64 | 2 | 0, 1 |  | **87.8 ± 0.1** | +3.7 |  | '
                      '82.1 ± 0.1 | 80.0 ± 0.0 | | |')
  # 0.8825 is 88.3 (halves up), 0.8825 - 0.8779 is +0.5; the mean pairs seed with seed.
  assert lines[5] == ('| SogCLR | 0.5 | 64 | 2 | 0 | 7.524 | 88.3 | +4.2 | +0.5 | 82.1 | 80.0 | '
                      '80 | 160 |')
  assert lines[7] == ('| SogCLR, mean ± sd | 0.5 | 64 | 2 | 0, 1 | 7.524 (1 of 2) | **88.5 ± 0.3** '
                      '| +4.4 | +0.6 ± 0.2 | 82.3 ± 0.3 | 80.0 ± 0.0 | | |')
  assert lines[8] == ('| SogCLR | 0.5 | 512 | 2 | 0 |  | 87.0 | +2.9 |  | 81.0 | 80.0 | 80 | '
                      '1280 |')
  assert '| sogclr_w05_e2_s1 | 79.9 | 82.5 |' in lines
  assert 'raw pixels: 78.85%' in ''.join(lines)
  assert (out_dir / 'long_runs.png').stat().st_size > 10_000


def test_the_objective_is_read_from_the_flags_as_run_py_chooses_it(long_runs):
  assert long_runs.objective_of({'train_mode': 'finetune', 'DCL_mode': True}) == 'supervised'
  assert long_runs.objective_of({'train_mode': 'pretrain', 'loss': 'isogclr'}) == 'isogclr'
  assert long_runs.objective_of({'train_mode': 'pretrain', 'DCL_mode': True}) == 'sogclr'
  assert long_runs.objective_of({'train_mode': 'pretrain', 'DCL_mode': False}) == 'simclr'


def test_a_run_without_results_is_an_error_naming_it(long_runs, tmp_path):
  with pytest.raises(SystemExit, match=rf'^error: {tmp_path} holds no result_<step>.json'):
    long_runs.main(['--record', str(tmp_path), '--name=sogclr_w05_e6_s0',
                    f'--out_dir={tmp_path}'])


@pytest.mark.slow
def test_a_record_holds_the_global_objective_of_the_newest_checkpoint(
    long_runs, pretrained_run, data_dir, tmp_path, tiny_model_config):
  # The pretrained run: 3 SogCLR steps on the digits; the objective on the digits preset's two
  # fixed views of all 1,437 training images, as bench/small_batch.py scores its grid.
  model_dir, _ = pretrained_run
  long_runs.main(['--record', model_dir, '--name=sogclr_w0125_e1_s0', f'--data_dir={data_dir}',
                  f'--out_dir={tmp_path}'])
  recorded = json.loads((tmp_path / 'sogclr_w0125_e1_s0.json').read_text())
  import small_batch  # noqa: PLC0415  (bench/, on the path once long_runs ran it)
  import tensorflow as tf  # noqa: PLC0415

  import data as data_lib  # noqa: PLC0415
  import model as model_lib  # noqa: PLC0415
  import objective  # noqa: PLC0415

  model = model_lib.build_model(tiny_model_config(), 16)
  tf.train.Checkpoint(model=model).restore(tf.train.latest_checkpoint(model_dir)).expect_partial()
  builder = data_lib.get_builder('digits', data_dir)
  views = small_batch.fixed_views(builder, data_lib.describe(builder, 'train', 'test'),
                                  small_batch.FULL)
  assert len(views[0]) == 1437
  expected = float(objective.global_nt_xent(model(views[0])['projection'],
                                            model(views[1])['projection'], 0.1))
  assert recorded['global_objective'] == pytest.approx(expected, rel=1e-5)
