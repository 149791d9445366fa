"""schema.py: the roles declared on the config fields, and the lists derived from them."""
import dataclasses

import pytest

import experiment
import run
import schema


def test_the_derived_lists_are_the_declared_roles():
  config = experiment.Config
  architecture = {'resnet_depth', 'width_multiplier', 'sk_ratio', 'se_ratio', 'image_size',
                  'proj_head_mode', 'num_proj_layers', 'proj_out_dim'}
  assert set(schema.architecture(config)) == architecture
  objective = {'temperature', 'gamma', 'gamma_schedule', 'gamma_decay_epochs', 'hidden_norm',
               'isogclr_rho', 'isogclr_eta', 'isogclr_beta', 'isogclr_tau_min',
               'isogclr_tau_max'}
  assert set(schema.run_defining(config)) == architecture | objective | {
      'train_mode', 'train_batch_size', 'seed', 'dataset', 'train_split', 'num_classes',
      'lineareval_while_pretraining', 'ft_proj_selector', 'fine_tune_after_block',
      'supervised_head_bn', 'optimizer', 'learning_rate_scaling'}
  assert set(schema.inherited_by_eval(config)) == architecture | {
      'train_mode', 'lineareval_while_pretraining', 'ft_proj_selector', 'fine_tune_after_block',
      'num_classes', 'label_offset', 'dataset', 'data_dir', 'train_split', 'eval_split',
      'weight_decay', 'train_batch_size', 'train_epochs', 'train_steps', 'mixed_precision',
      'supervised_head_bn', 'batch_norm_decay'}
  # Each run-defining flag is read where it is declared (the first of two fields with one flag:
  # Config.train_mode, DataConfig.num_classes).
  locations = schema.locations(config)
  assert locations['optimizer'] == ('optimizer', 'name')
  assert locations['train_mode'] == (None, 'train_mode')
  assert locations['num_classes'] == ('data', 'num_classes')
  assert set(locations) == set(schema.run_defining(config))


def test_every_declared_setting_is_a_flag_of_run_py_with_the_fields_default():
  # The flag's default and the field's are one value (a Config built without flags is the
  # command line's default run).
  run.FLAGS.unparse_flags()
  run.FLAGS(['run.py'])
  for flag, (section, name) in schema.locations(experiment.Config).items():
    holder = experiment.Config if section is None else {
        f.name: f.type for f in dataclasses.fields(experiment.Config)}[section]
    field = {f.name: f for f in dataclasses.fields(holder)}[name]
    assert flag in run.FLAGS, flag
    assert run.FLAGS[flag].default == field.default, flag
  run.FLAGS.unparse_flags()


def test_a_plain_field_is_free_and_keeps_its_name_as_flag():
  @dataclasses.dataclass(frozen=True)
  class Inner:
    plain: int = 1
    renamed: str = schema.setting('a', defines_run=True, flag='other')

  @dataclasses.dataclass(frozen=True)
  class Outer:
    inner: Inner = Inner()
    shape: int = schema.setting(3, architecture=True)

  assert schema.run_defining(Outer) == ('other', 'shape')
  assert schema.architecture(Outer) == ('shape',)
  assert schema.inherited_by_eval(Outer) == ('shape',)
  assert schema.locations(Outer) == {'other': ('inner', 'renamed'), 'shape': (None, 'shape')}
  assert [schema.flag_of(f) for f in dataclasses.fields(Inner)] == ['plain', 'other']


def test_a_range_says_what_it_allows_and_the_check_names_the_flag():
  assert (str(schema.at_least(0)), str(schema.above(0))) == ('>= 0', '> 0')
  assert str(schema.Range(0, 1, low_open=True)) == 'in (0, 1]'
  assert str(schema.Range(-1, 4)) == 'in [-1, 4]'
  unit = schema.Range(0, 1, high_open=True)
  assert [x in unit for x in (-0.1, 0, 0.5, 1, 2)] == [False, True, True, False, False]
  assert [x in schema.above(0) for x in (-1, 0, 1e-9)] == [False, False, True]

  @dataclasses.dataclass(frozen=True)
  class Inner:
    rate: float = schema.setting(0.1, allowed=schema.above(0), flag='the_rate')

  @dataclasses.dataclass(frozen=True)
  class Outer:
    inner: Inner = Inner()
    depth: int = schema.setting(3, architecture=True, allowed=schema.at_least(1))

  assert schema.ranges(Outer) == {'the_rate': schema.above(0), 'depth': schema.at_least(1)}
  assert schema.run_defining(Outer) == ('depth',)  # a range alone gives no role
  schema.check_ranges(Outer, {'the_rate': 0.5, 'depth': 1, 'other': -7})
  with pytest.raises(ValueError, match=r'^--the_rate must be > 0, got 0\.0$'):
    schema.check_ranges(Outer, {'the_rate': 0.0, 'depth': 1})
  with pytest.raises(ValueError, match=r'^--depth must be >= 1, got 0$'):
    schema.check_ranges(Outer, {'depth': 0})


def test_a_class_checks_its_arguments_against_the_declared_ranges():
  import objective  # noqa: PLC0415
  schema.check(objective.ObjectiveConfig, gamma=1.0, temperature=0.01, loss='anything')
  with pytest.raises(ValueError, match=r'^gamma must be in \(0, 1\], got 0$'):
    schema.check(objective.ObjectiveConfig, temperature=0.1, gamma=0)
  # NaN is outside every range (it fails every comparison).
  assert float('nan') not in schema.Range(0, 1) and float('nan') not in schema.at_least(0)
  assert 0.5 in schema.Range(0, 1) and 0 not in schema.above(0) and 1 not in schema.Range(
      0, 1, high_open=True)
