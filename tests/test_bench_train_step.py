"""bench/train_step.py: its model specs, its peak-memory measurement, and `--quick` end to end
(a tiny model, no XLA)."""
import importlib.util
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'bench', 'train_step.py')


@pytest.fixture(scope='module')
def train_step():
  spec = importlib.util.spec_from_file_location('bench_train_step', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_model_spec_parses_depth_size_batch_and_width(train_step):
  assert train_step.ModelSpec.parse('50:64:32') == train_step.ModelSpec(50, 64, 32, 1.0)
  assert train_step.ModelSpec.parse('18:16:8:0.25').label == 'R18 w0.25 16px b8'
  with pytest.raises(ValueError, match='depth:image_size:batch'):
    train_step.ModelSpec.parse('18x32')


def test_batch_larger_than_u_table_is_an_error(train_step):
  with pytest.raises(ValueError, match='distinct within a batch'):
    train_step.parse_args(['--models=18:16:64', '--num_examples=32'])


def test_peak_rss_sees_memory_touched_and_freed_inside_the_block(train_step):
  size = 256 * 2**20
  with train_step.PeakRss() as memory:
    block = np.ones(size, np.uint8)  # touched, then freed before the block ends
    del block
  assert memory.peak - memory.before >= 0.9 * size
  with train_step.PeakRss() as quiet:  # the mark was reset: the earlier peak is not reported
    pass
  assert quiet.peak - quiet.before < 0.5 * size


@pytest.mark.slow
def test_quick_run_prints_rates_ratios_and_loss_curves(train_step, tmp_path):
  # float32 only for the timed variants (each costs a trace); the loss curves run bfloat16 too.
  tables = train_step.main(['--quick', '--rounds=1', '--precisions=float32',
                            f'--data_dir={tmp_path}'])
  rows = [line for line in tables.splitlines() if line.startswith('| R10 w0.125 16px b8 |')]
  timed = [row for row in rows if row.count('|') == 13]
  assert [row.split('|')[2].strip() for row in timed] == ['simclr', 'sogclr']
  for row in timed:
    assert float(row.split('|')[5].split()[0]) > 0  # images/s
    assert float(row.split('|')[9]) >= 0  # kernel ms/step
  assert sum('SogCLR / SimCLR (float32, XLA off)' in row for row in rows) == 1
  assert tables.count('| matmul 512x512x512 |') == 2  # float32 and bfloat16 (--quick's size)
  curve = [line for line in tables.splitlines() if line.startswith('| 1-2 |')]
  assert len(curve) == 1
  loss_float32, loss_bfloat16 = (float(x) for x in curve[0].split('|')[2:4])
  # Same weights and batches: bfloat16 round-off moves the loss a little, not a lot.
  assert abs(loss_bfloat16 - loss_float32) < 0.1 * abs(loss_float32)
