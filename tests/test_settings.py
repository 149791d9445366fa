"""settings.py: the checks of the flag values and the config built from them."""
import pytest

import experiment
import run
import settings


def default_values(**changes):
  """run.py's flag values at their defaults (and a model_dir), with `changes`."""
  run.FLAGS.unparse_flags()
  run.FLAGS(['run.py', '--model_dir=/tmp/unused'])
  values, _ = run.flag_values()
  return values | changes


# -- Loss aliases ----------------------------------------------------------------------------------

@pytest.mark.parametrize('aliases, expected', [
    ({}, 'sogclr'),
    ({'DCL_mode': True}, 'sogclr'),
    ({'DCL_mode': True, 'GCL_mode': True}, 'sogclr'),
    ({'BI_mode': False}, 'simclr'),
    ({'DCL_mode': False, 'GCL_mode': None, 'BI_mode': False}, 'simclr'),
])
def test_loss_aliases_agreeing(aliases, expected):
  assert settings.resolve_loss(None, aliases) == expected


@pytest.mark.parametrize('loss, aliases', [
    (None, {'DCL_mode': True, 'BI_mode': False}),
    (None, {'DCL_mode': False, 'GCL_mode': True}),
    ('simclr', {'GCL_mode': True}),
])
def test_loss_aliases_conflicting_is_an_error(loss, aliases):
  with pytest.raises(ValueError, match='Conflicting loss flags'):
    settings.resolve_loss(loss, aliases)


@pytest.mark.parametrize('name, lowest, excluded', settings.RANGES)
def test_a_number_out_of_range_is_an_error_naming_its_flag(name, lowest, excluded):
  low = lowest if excluded else lowest - 1  # just outside
  with pytest.raises(ValueError, match=f'^--{name} must be >'):
    settings.validate_flags(default_values(**{name: low}))


def test_config_of_leaves_its_values_alone_and_records_them():
  values = default_values(temperature=0.2)
  before = dict(values)
  config = settings.config_of(values, given={'model_dir', 'temperature'})
  assert values == before
  assert config.objective.temperature == 0.2 and dict(config.flags) == values
  with pytest.raises(ValueError, match='^--temperature must be positive, got 0'):
    settings.config_of(default_values(temperature=0.0), given=set())


def test_what_flags_json_records_of_a_command_line_config_is_its_flags():
  # experiment.recorded_values reads the run-defining values from the config: for a config of
  # flags they are the flags' own, so flags.json stays the flag values.
  for changes in ({}, dict(temperature=0.2, optimizer='adam', width_multiplier=0.5, seed=7,
                           train_split='train[:10%]', num_proj_layers=0, ft_proj_selector=-1,
                           loss='simclr', train_mode='finetune', checkpoint='/tmp/c')):
    values = default_values(**changes)
    config = settings.build_config(values)
    recorded = experiment.recorded_values(config)
    assert recorded.pop('resolved_loss') == ('cross_entropy' if changes else 'sogclr')
    assert recorded == values
  assert set(experiment._DEFINING_FIELDS) | {'resolved_loss'} == set(
      experiment.RUN_DEFINING_FLAGS)
