"""settings.py: the checks of the flag values and the config built from them."""
import re

import pytest

import experiment
import run
import run_record
import schema
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


@pytest.mark.parametrize('name, allowed', sorted(schema.ranges(experiment.Config).items()))
def test_a_number_out_of_range_is_an_error_naming_its_flag(name, allowed):
  outside = []  # just outside each bound
  if allowed.low is not None:
    outside.append(allowed.low if allowed.low_open else allowed.low - 1)
  if allowed.high is not None:
    outside.append(allowed.high if allowed.high_open else allowed.high + 1)
  assert outside
  for value in outside:
    with pytest.raises(ValueError, match=f'^--{name} must be {re.escape(str(allowed))}, got '):
      settings.validate_flags(default_values(**{name: value}))


def test_config_of_leaves_its_values_alone_and_records_them():
  values = default_values(temperature=0.2)
  before = dict(values)
  config = settings.config_of(values, given={'model_dir', 'temperature'})
  assert values == before
  assert config.objective.temperature == 0.2 and dict(config.flags) == values
  with pytest.raises(ValueError, match='^--temperature must be > 0, got 0'):
    settings.config_of(default_values(temperature=0.0), given=set())


@pytest.mark.parametrize('name', ['learning_rate', 'temperature', 'momentum', 'weight_decay',
                                  'color_jitter_strength', 'warmup_epochs'])
def test_a_float_flag_that_is_not_a_finite_number_is_an_error_naming_it(name):
  # Finding (issue 24): NaN passed every range check, trained and was reported as divergence
  # ("lower --learning_rate"), NaN written to flags.json; --warmup_epochs=nan a ValueError about
  # converting NaN to an integer.
  for value in (float('nan'), float('inf')):
    with pytest.raises(ValueError, match=f'^--{name} must be a finite number, got {value}$'):
      settings.validate_flags(default_values(**{name: value}))


@pytest.mark.parametrize('changes, message', [
    (dict(eval_name='../../../escaped_eval'),
     "--eval_name='../../../escaped_eval' must be a plain name"),
    (dict(eval_name='a/b'), "--eval_name='a/b' must be a plain name"),
    (dict(resnet_depth=7), '--resnet_depth=7 is not one of [10, 18, 34, 50, 101, 152, 200]'),
    (dict(train_batch_size=1), '--train_batch_size=1 leaves a contrastive batch without '
                               'negatives'),
    (dict(seed=-5), '--seed must be >= 0, got -5'),
    (dict(label_offset=-1), '--label_offset must be >= 0, got -1'),
])
def test_values_that_cannot_be_right_are_errors_naming_the_flag(changes, message):
  with pytest.raises(ValueError, match=f'^{re.escape(message)}'):
    settings.validate_flags(default_values(**changes))
  settings.validate_flags(default_values(eval_name='on_train-2'))


def test_only_an_objective_with_per_image_tables_needs_distinct_ids():
  # Two records with one id would share a u slot: SogCLR's pipeline stops on them (the check
  # itself: test_data.py), SimCLR's and fine-tuning's read such data.
  for changes, unique in ((dict(loss='sogclr'), True), (dict(loss='isogclr'), True),
                          (dict(loss='simclr'), False), (dict(train_mode='finetune'), False)):
    config = settings.build_config(default_values(**changes))
    assert experiment.train_input_config(config, initial_step=0).unique_ids is unique, changes


def test_what_flags_json_records_of_a_command_line_config_is_its_flags():
  # run_record.recorded_values reads the run-defining values from the config: for a config of
  # flags they are the flags' own, so flags.json stays the flag values.
  for changes in ({}, dict(temperature=0.2, optimizer='adam', width_multiplier=0.5, seed=7,
                           train_split='train[:10%]', num_proj_layers=0, ft_proj_selector=-1,
                           loss='simclr', train_mode='finetune', checkpoint='/tmp/c')):
    values = default_values(**changes)
    config = settings.build_config(values)
    recorded = run_record.recorded_values(config)
    assert recorded.pop('resolved_loss') == ('cross_entropy' if changes else 'sogclr')
    assert recorded == values
  assert set(schema.locations(experiment.Config)) | {'resolved_loss'} == set(
      run_record.run_defining_flags(experiment.Config))
