"""bench/small_batch.py: its summary arithmetic on made-up runs, and `--quick` end to end (CI)."""
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'bench', 'small_batch.py')


@pytest.fixture(scope='module')
def small_batch():
  spec = importlib.util.spec_from_file_location('small_batch', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_summary_pairs_methods_by_seed(small_batch):
  settings = small_batch.Settings(batch_sizes=(16, 64), seeds=(0, 1, 2), train_epochs=1,
                                  width_multiplier=0.125)
  objectives = {('simclr', 16): [5.0, 5.4, 4.9], ('sogclr', 16): [4.9, 5.2, 4.9],
                ('isogclr', 16): [4.8, 5.5, 4.7],
                ('simclr', 64): [5.1, 5.0, 5.3], ('sogclr', 64): [5.2, 4.9, 5.3],
                ('isogclr', 64): [5.0, 5.0, 5.0]}
  records = [{'method': method, 'batch_size': batch, 'seed': seed, 'steps': 89,
              'global_objective': value, 'linear_top_1': 0.9 + 0.01 * seed,
              'knn_top_1': 0.8, 'linear_head_top_1': 0.7}
             for (method, batch), values in objectives.items()
             for seed, value in enumerate(values)]
  summary = small_batch.summarize(records, settings)
  row = summary[0]['global_objective']
  assert row['simclr']['mean'] == pytest.approx(np.mean([5.0, 5.4, 4.9]))
  assert row['simclr']['sd'] == pytest.approx(np.std([5.0, 5.4, 4.9], ddof=1))
  # Paired: differences per seed, not the difference of the means with pooled noise.
  sogclr = row['difference']['sogclr']
  assert sogclr['per_seed'] == pytest.approx([-0.1, -0.2, 0.0], abs=1e-12)
  assert sogclr['sd'] == pytest.approx(np.std([-0.1, -0.2, 0.0], ddof=1))
  assert sogclr['better'] == 1 + 1  # lower objective in seeds 0 and 1; a tie is not better
  assert row['difference']['isogclr']['per_seed'] == pytest.approx([-0.2, 0.1, -0.2], abs=1e-12)
  assert row['difference']['isogclr']['better'] == 2
  assert 'simclr' not in row['difference']
  assert summary[1]['global_objective']['difference']['sogclr']['better'] == 1
  assert summary[1]['global_objective']['difference']['isogclr']['better'] == 2
  assert summary[0]['linear_top_1']['difference']['sogclr']['mean'] == pytest.approx(0.0)
  table = small_batch.markdown_table(summary)
  lines = table.strip().splitlines()
  assert len(lines) == 2 + 2 * 3  # a row per batch size and method
  assert lines[2].startswith('| 16 | 89 | SimCLR | 5.100 ± 0.265 |  | 91.0 ± 1.0 |  |')
  # Records without times (as the published digits runs): blank cells, not nan.
  assert lines[2].endswith('| 80.0 ± 0.0 |  |  |  |') and 'nan' not in table
  assert lines[3].startswith('| 16 | 89 | SogCLR | 5.000 ± 0.173 | -0.100 ± 0.100 (2/3) |')
  assert lines[4].startswith('| 16 | 89 | iSogCLR | 5.000 ± 0.436 | -0.100 ± 0.173 (2/3) |')


def test_a_method_subset_summarizes_without_simclr_differences(small_batch):
  settings = small_batch.Settings(batch_sizes=(16,), seeds=(0,), train_epochs=1,
                                  width_multiplier=0.125, methods=('isogclr',))
  record = {'method': 'isogclr', 'batch_size': 16, 'seed': 0, 'steps': 89,
            'global_objective': 5.0, 'linear_top_1': 0.9, 'knn_top_1': 0.8,
            'linear_head_top_1': 0.7, 'train_seconds': 12.25, 'images_per_second': 116.3}
  summary = small_batch.summarize([record], settings)
  assert summary[0]['global_objective']['difference'] == {}
  assert small_batch.markdown_table(summary).splitlines()[2] == (
      '| 16 | 89 | iSogCLR | 5.000 |  | 90.0 |  | 80.0 |  | 12 | 116 |')


def test_fashion_mnist_runs_record_a_knn_curve_and_the_baselines_make_a_table(small_batch):
  settings = small_batch.FASHION
  flags = small_batch.run_flags(settings, 'sogclr', 64, 1, 'm', None)
  assert '--dataset=fashion_mnist' in flags and '--eval_every_epochs=1' in flags
  assert '--knn_monitor' in flags and '--knn_k=200' in flags
  # The ceiling: the same network trained supervised from scratch, every layer.
  supervised = small_batch.run_flags(settings, 'supervised', 64, 0, 'm', None)
  assert '--train_mode=finetune' in supervised and '--fine_tune_after_block=-1' in supervised
  assert not any(f.startswith(('--loss', '--temperature', '--knn')) for f in supervised)
  table = small_batch.baselines_table({
      'raw_pixels': {'linear_top_1': 0.8461, 'knn_top_1': 0.8552},
      'random_network': {'linear_top_1': 0.5, 'knn_top_1': 0.45},
      'supervised': {'top_1': 0.9012, 'batch_size': 64}})
  assert '| raw pixels | 84.6 | 85.5 |' in table
  assert '| supervised, same network and epochs (batch 64) | 90.1 (its own head) | |' in table


def test_reused_runs_are_copied_once_with_their_source(small_batch, tmp_path):
  settings = small_batch.FULL
  runs = [{'method': method, 'batch_size': 256, 'seed': 0, 'global_objective': value,
           'settings': small_batch.run_settings(settings, method)}
          for method, value in (('simclr', 8.5), ('sogclr', 8.3))]
  runs.append({'method': 'sogclr', 'batch_size': 16, 'seed': 0, 'global_objective': 1.0,
               'settings': small_batch.run_settings(settings) | {'gamma': 1.0}})
  earlier = tmp_path / 'results.json'
  earlier.write_text(json.dumps({'runs': runs}))
  work_dir = tmp_path / 'work'
  work_dir.mkdir()
  assert small_batch.reuse_runs(str(earlier), str(work_dir), settings) == 2  # not other settings
  record = json.loads((work_dir / 'sogclr_b256_s0.json').read_text())
  assert record['global_objective'] == 8.3 and record['reused_from'] == str(earlier)
  assert not (work_dir / 'sogclr_b16_s0.json').exists()
  assert small_batch.reuse_runs(str(earlier), str(work_dir), settings) == 0  # already there
  # A results.json inside the repository is named relative to it (a published record names no
  # machine's directories).
  assert small_batch._portable(os.path.join(small_batch.REPO, 'bench', 'results', 'x.json')) == \
      os.path.join('bench', 'results', 'x.json')
  # --collect reads the records there (the copied ones too) and trains nothing.
  assert small_batch.cached_record(settings, 'simclr', 256, 0, str(work_dir))['global_objective'] \
      == 8.5
  assert small_batch.cached_record(settings, 'isogclr', 256, 0, str(work_dir)) is None
  with pytest.raises(ValueError, match='other settings'):
    small_batch.cached_record(dataclasses.replace(settings, gamma=0.5), 'sogclr', 256, 0,
                              str(work_dir))
  # An iSogCLR run depends on its temperature updates too.
  assert small_batch.run_settings(settings, 'isogclr')['isogclr'] == small_batch.ISOGCLR
  assert '--isogclr_eta=0.01' in small_batch.run_flags(settings, 'isogclr', 16, 0, 'm', None)


@pytest.mark.slow
def test_quick_run_writes_table_plot_and_json(tmp_path, small_batch):
  # Two of the quick grid's six runs (the script's loop and its outputs are the same).
  out_dir, work_dir, data_dir = (str(tmp_path / name) for name in ('out', 'work', 'tfds'))
  command = [sys.executable, SCRIPT, '--quick', '--methods=simclr,sogclr', '--batch_sizes=256',
             f'--out_dir={out_dir}', f'--work_dir={work_dir}', f'--data_dir={data_dir}']
  subprocess.run(command, check=True, timeout=600, cwd=REPO)
  results = json.load(open(os.path.join(out_dir, 'results.json')))
  assert results['settings']['quick'] is True
  assert len(results['runs']) == 2
  assert [row['batch_size'] for row in results['summary']] == [256]
  # 1,437 training digits: 5 steps of 256 in one epoch.
  assert [row['steps'] for row in results['summary']] == [5]
  # Each run says where it was measured: the dtypes --mixed_precision=auto chose on this CPU.
  import distribution  # noqa: PLC0415
  expected = 'mixed_bfloat16' if distribution.cpu_supports_bfloat16() else 'float32'
  assert [run['precision'] for run in results['runs']] == [expected] * 2
  assert results['runs'][0]['cpu'] == results['machine']['cpu'] == small_batch.cpu_model()
  cpuinfo = tmp_path / 'cpuinfo'
  cpuinfo.write_text('processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t: fpu\n')
  assert small_batch.cpu_model(str(cpuinfo)) == 'Some CPU @ 2.0GHz'
  for run in results['runs']:
    # At chance, 2 * log(2N - 1): after 5 steps the projections in inference mode are nearly
    # one vector (the projection head's BatchNorm statistics still hold most of their initial
    # 1s; docs/results.md).
    assert run['global_objective'] == pytest.approx(2 * math.log(2 * 1437 - 1), abs=0.01)
    assert 0 <= run['linear_top_1'] <= 1 and 0 <= run['knn_top_1'] <= 1
    # Features of even one epoch beat chance (10%) on the held-out digits.
    assert run['linear_top_1'] > 0.3
  difference = results['summary'][0]['global_objective']['difference']['sogclr']
  assert math.isfinite(difference['mean']) and math.isnan(difference['sd'])  # one seed
  table = open(os.path.join(out_dir, 'results.md')).read()
  assert table.startswith('| batch | steps | method | global objective |')
  assert '\n| 256 | 5 | SimCLR |' in table and '\n| 256 | 5 | SogCLR |' in table
  with open(os.path.join(out_dir, 'small_batch.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  # A second invocation reuses the finished runs (resuming an interrupted benchmark).
  os.remove(os.path.join(out_dir, 'results.json'))
  subprocess.run(command, check=True, timeout=600, cwd=REPO)
  again = json.load(open(os.path.join(out_dir, 'results.json')))
  assert again['runs'] == results['runs']


def test_the_published_runs_are_measured_with_their_presets_settings(small_batch):
  # --reuse_runs takes a published run only if it was measured with the preset's settings; a
  # field added to Settings later is read as the value every earlier run had.
  for preset, path in ((small_batch.FULL, 'results.json'),
                       (small_batch.FASHION, os.path.join('fashion_mnist', 'results.json'))):
    published = json.load(open(os.path.join(REPO, 'bench', 'results', path)))
    assert published['runs'] and all(small_batch.measured_with(run, preset)
                                      for run in published['runs']), path
    assert not any(small_batch.measured_with(run, dataclasses.replace(preset, resnet_depth=10))
                   for run in published['runs'])
  assert '--resnet_depth=10' in small_batch.run_flags(small_batch.QUICK, 'sogclr', 64, 0, 'm', None)
