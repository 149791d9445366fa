"""examples/: the library used from Python without run.py or flags, run as a user runs it."""
import json
import os
import subprocess
import sys

import pytest

# The example in a fresh interpreter: 4 steps, then the same directory to 6 (a resume), then
# again to 6 (nothing left to train), each result reporting whether run.py or absl flags were
# touched.
RUN_EXAMPLE = '''
import json, sys
sys.path.insert(0, 'examples')
from absl import flags
import pretrain_from_python
for steps in (4, 6, 6):
  results = pretrain_from_python.pretrain(sys.argv[1], sys.argv[2], steps)
  results.update(run_imported='run' in sys.modules, flags_parsed=flags.FLAGS.is_parsed())
  print(json.dumps(results))
'''


@pytest.mark.slow
def test_the_python_example_pretrains_sogclr_evaluates_and_resumes_without_flags(
    repo, data_dir, tmp_path):
  completed = subprocess.run(
      [sys.executable, '-c', RUN_EXAMPLE, data_dir, str(tmp_path / 'example')], cwd=repo,
      capture_output=True, text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert completed.returncode == 0, completed.stderr[-3000:]
  first, second, third = (json.loads(line) for line in completed.stdout.strip().splitlines()[-3:])
  assert first['run_imported'] is False and first['flags_parsed'] is False
  assert first['step'] == 4 and first['checkpoints'] == [2, 4]
  # 4 steps of 32 distinct digits: each visited image has its u.
  assert first['u_visited'] == pytest.approx(4 * 32 / 1437)
  for key in ('eval/top_1', 'eval/knn_top_1', 'probe/top_1'):
    assert 0 <= first[key] <= 1
  # The second call resumes from step 4 (u included) and the pipeline goes on with the epoch's
  # next images: 6 steps, 192 distinct digits visited.
  assert second['step'] == 6 and second['checkpoints'] == [4, 6]
  assert second['u_visited'] == pytest.approx(6 * 32 / 1437)
  assert first['objective_loss'] is not None and second['objective_loss'] is not None
  # Finding (red team): a directory already trained to `steps` ended in an IndexError; it is
  # evaluated as it is, with the same numbers as the second call's.
  assert third['step'] == 6 and third['checkpoints'] == [4, 6] and third['objective_loss'] is None
  for key in ('u_visited', 'eval/top_1', 'eval/knn_top_1', 'probe/top_1'):
    assert third[key] == pytest.approx(second[key]), key
