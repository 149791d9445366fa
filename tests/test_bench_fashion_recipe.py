"""bench/fashion_recipe.py: each variant changes the benchmark's recipe in what it names only,
and the table reports what each run measured."""
import dataclasses
import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def recipe():
  sys.path.insert(0, os.path.join(REPO, 'bench'))
  spec = importlib.util.spec_from_file_location(
      'fashion_recipe', os.path.join(REPO, 'bench', 'fashion_recipe.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_each_variant_is_the_benchmark_recipe_with_what_it_names_changed(recipe):
  base = dataclasses.asdict(recipe.small_batch.FASHION)
  for name, (_, changes) in recipe.VARIANTS.items():
    settings = dataclasses.asdict(recipe.variant_settings(name, train_epochs=3))
    changed = {k for k in settings if settings[k] != base[k]}
    assert changed == {'batch_sizes', 'seeds', 'methods', 'train_epochs', *changes}, name
    assert settings['batch_sizes'] == (64,) and settings['methods'] == ('sogclr',)
  peak = recipe.variant_settings('lr4e-3', 1).peak_learning_rate(64)
  assert peak == pytest.approx(4e-3)
  assert recipe.variant_settings('base', 1).peak_learning_rate(64) == pytest.approx(2e-3)


def test_the_table_has_a_row_per_run_with_its_curve(recipe):
  run = {'linear_top_1': 0.8359, 'knn_top_1': 0.787, 'curve': [[1, 0.787]],
         'train_seconds': 280.4, 'images_per_second': 214.0}
  table = recipe.markdown_table({'base': run, 't0.5': run | {'linear_top_1': 0.8262}})
  lines = table.splitlines()
  assert lines[2] == '| the benchmark recipe | 83.6 | 78.7 | 78.7 | 280 | 214 |'
  assert lines[3].startswith('| temperature 0.5 | 82.6 |')


def test_an_unknown_variant_is_refused(recipe, capsys):
  with pytest.raises(SystemExit):
    recipe.parse_args(['--variants=base,huge'])
  assert "unknown ['huge']" in capsys.readouterr().err
