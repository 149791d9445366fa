"""run_record.py: flags.json and its history, inheritance, the resume identity check."""
import dataclasses
import json
import os
import re

import pytest

import data as data_lib
import experiment
import objective as objective_lib
import run_record
import schema
import trainer as trainer_lib


def test_flags_file_round_trips_from_its_directory_or_a_checkpoint_prefix_in_it(tmp_path):
  values = {'resnet_depth': 18, 'dataset': 'digits', 'use_tpu': None, 'learning_rate': 0.3}
  run_record.write_flags(str(tmp_path), values)
  flags_file = str(tmp_path / 'flags.json')
  assert run_record.read_flags(str(tmp_path)) == (values, flags_file)
  # A checkpoint prefix (not a file itself) names the directory it is in.
  assert run_record.read_flags(str(tmp_path / 'ckpt-3')) == (values, flags_file)
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert run_record.read_flags(str(empty)) == (None, str(empty / 'flags.json'))
  assert run_record.read_flags(str(empty / 'ckpt-3')) == (None, str(empty / 'flags.json'))


def test_flags_history_appends_one_line_per_start(tmp_path):
  for step in (0, 10):
    run_record.append_flags_history(str(tmp_path), {'from_step': step})
  lines = open(os.path.join(tmp_path, run_record.HISTORY_FILE)).read().splitlines()
  assert [json.loads(line)['from_step'] for line in lines] == [0, 10]


def test_unreadable_flags_json_is_an_error_naming_the_file(tmp_path):
  open(os.path.join(tmp_path, 'flags.json'), 'w').close()
  with pytest.raises(ValueError, match=r'flags\.json is not valid json \(Expecting value'):
    run_record.read_flags(str(tmp_path))
  for text in ('null', '[]', '"a string"'):  # issue 24: a TypeError later
    open(os.path.join(tmp_path, 'flags.json'), 'w').write(text)
    with pytest.raises(ValueError, match=rf'flags\.json does not hold flags \(a json object\), '
                                         rf'but {re.escape(text)}'):
      run_record.read_flags(str(tmp_path))


def _recorded_run(tmp_path, flags):
  model_dir = tmp_path / 'run'
  model_dir.mkdir(parents=True)
  (model_dir / 'ckpt-5.index').write_bytes(b'')  # listed; never read by the identity check
  run_record.write_flags(str(model_dir), flags)
  return str(model_dir)


def _config(model_dir, **objective):
  objective = objective_lib.ObjectiveConfig(**objective)
  flags = {f: getattr(objective, f) for f in run_record.OBJECTIVE_FLAGS}
  return experiment.Config(model_dir=model_dir, objective=objective, flags=flags)


def test_resume_identity_covers_the_gamma_schedule_and_isogclr_flags(tmp_path):
  before = {'resolved_loss': 'isogclr', 'temperature': 0.1, 'gamma': 0.9,
            'gamma_schedule': 'cosine', 'gamma_decay_epochs': 10, 'isogclr_rho': 0.3,
            'isogclr_eta': 0.01, 'isogclr_beta': 0.9, 'isogclr_tau_min': 0.05,
            'isogclr_tau_max': 0.7}
  model_dir = _recorded_run(tmp_path, before)
  same = dict(loss='isogclr', gamma_schedule='cosine', gamma_decay_epochs=10)
  run_record.check_same_run(_config(model_dir, **same), 100)
  for change, flag in ((dict(isogclr_rho=0.5), 'isogclr_rho'),
                       (dict(gamma_decay_epochs=20), 'gamma_decay_epochs'),
                       (dict(loss='sogclr'), 'loss')):
    with pytest.raises(ValueError, match=f'--{flag}='):
      run_record.check_same_run(_config(model_dir, **(same | change)), 100)


def test_a_notebook_run_is_recorded_and_its_identity_checked_on_resume(tmp_path):
  # Finding: a Config built without flags recorded only its resolved loss, so a resume with
  # another temperature or seed went unnoticed.
  # Finding (red team): it then recorded only the run-defining ones, so --mode=eval of its
  # model_dir looked for --eval_split='validation' of digits in the default data_dir.
  config = experiment.Config(model_dir=str(tmp_path / 'run'),
                             objective=objective_lib.ObjectiveConfig(temperature=0.2),
                             loop=trainer_lib.LoopConfig(seed=3),
                             data=data_lib.DataConfig(dataset='digits', data_dir='/tmp/tfds',
                                                      eval_split='test'))
  os.makedirs(config.model_dir)
  run_record.record_start(config, initial_step=0)
  recorded = json.load(open(os.path.join(config.model_dir, 'flags.json')))
  assert set(recorded) > set(run_record.run_defining_flags(experiment.Config))
  assert (recorded['temperature'], recorded['seed'], recorded['resolved_loss'],
          recorded['resnet_depth'], recorded['optimizer']) == (0.2, 3, 'sogclr', 50, 'lars')
  evaluated = run_record.inherit_flags(
      {name: None for name in recorded}, {'mode', 'model_dir'}, config.model_dir,
      schema.inherited_by_eval(experiment.Config))
  assert {name: evaluated[name] for name in ('dataset', 'data_dir', 'eval_split',
                                             'weight_decay', 'train_steps')} == {
      'dataset': 'digits', 'data_dir': '/tmp/tfds', 'eval_split': 'test',
      'weight_decay': trainer_lib.OptimizerConfig().weight_decay, 'train_steps': 0}
  (tmp_path / 'run' / 'ckpt-5.index').write_bytes(b'')  # a checkpoint to resume
  run_record.check_same_run(config, 100)
  changed = dataclasses.replace(config, objective=objective_lib.ObjectiveConfig(temperature=0.5),
                                loop=trainer_lib.LoopConfig(seed=4))
  with pytest.raises(ValueError, match=r'--temperature=0\.5 \(was 0\.2\), --seed=4 \(was 3\)'):
    run_record.check_same_run(changed, 100)


def test_a_run_recorded_before_the_gamma_schedule_ran_with_a_constant_gamma(tmp_path):
  model_dir = _recorded_run(tmp_path, {'resolved_loss': 'sogclr', 'temperature': 0.1,
                                       'gamma': 0.9})
  run_record.check_same_run(_config(model_dir, loss='sogclr'), 100)
  with pytest.raises(ValueError, match="--gamma_schedule='cosine' \\(was 'constant'\\)"):
    run_record.check_same_run(_config(model_dir, loss='sogclr', gamma_schedule='cosine',
                                      gamma_decay_epochs=5), 100)
  # SimCLR has no gamma: its schedule flags never make another run.
  simclr_dir = _recorded_run(tmp_path / 'simclr', {'resolved_loss': 'simclr', 'gamma': 0.9,
                                                   'temperature': 0.1})
  run_record.check_same_run(_config(simclr_dir, loss='simclr', gamma=0.5,
                                    gamma_schedule='cosine', isogclr_rho=1.0), 100)


@pytest.mark.parametrize('damage', ['missing', 'null', 'list', 'string', 'garbled'])
def test_resume_identity_falls_back_to_the_history_when_flags_json_cannot_be_read(
    tmp_path, damage, caplog):
  # Finding (issue 24): a missing or null flags.json turned the identity check off (the resume
  # with another temperature, batch and loss went through); [] or a string was a TypeError.
  recorded = {'resolved_loss': 'sogclr', 'temperature': 0.1, 'gamma': 0.9}
  model_dir = _recorded_run(tmp_path, recorded)
  run_record.append_flags_history(model_dir, {'started_utc': 'then', 'from_step': 0,
                                               'flags': recorded})
  flags_file = os.path.join(model_dir, 'flags.json')
  if damage == 'missing':
    os.remove(flags_file)
  else:
    text = {'null': 'null', 'list': '[]', 'string': '"x"', 'garbled': '{"tempera'}[damage]
    open(flags_file, 'w').write(text)
  run_record.check_same_run(_config(model_dir, loss='sogclr'), 100)
  assert 'checking the run\'s identity against the flags of' in caplog.text
  with pytest.raises(ValueError, match=r"--temperature=0\.5 \(was 0\.1\); recorded in "
                                       r'.*flags_history\.jsonl \(its start of then'):
    run_record.check_same_run(_config(model_dir, loss='sogclr', temperature=0.5), 100)


def test_a_flags_json_that_lacks_flags_is_completed_from_the_history(tmp_path, caplog):
  # Finding (issue 24, rerun): flags.json holding a json object without some flags
  # ({"dataset": "digits"}) turned the check off for those: a resume with another seed and
  # batch size went through and rewrote flags.json.
  model_dir = str(tmp_path / 'run')
  os.makedirs(model_dir)
  run_record.record_start(experiment.Config(model_dir=model_dir), initial_step=0)
  (tmp_path / 'run' / 'ckpt-5.index').write_bytes(b'')
  json.dump({'dataset': 'imagenet2012', 'temperature': 0.1},
            open(os.path.join(model_dir, 'flags.json'), 'w'))
  config = experiment.Config(model_dir=model_dir, loop=trainer_lib.LoopConfig(seed=3))
  with pytest.raises(ValueError, match=r'--seed=3 \(was 0\); recorded in .*flags\.json and '
                                       r'.*flags_history\.jsonl'):
    run_record.check_same_run(config, 100)
  assert re.search(r'flags\.json does not record .*seed.*; checking the run\'s identity against '
                   r'the flags of .*flags_history\.jsonl', caplog.text)
  # flags.json's own values count where it has them (it is the newest start's record).
  with pytest.raises(ValueError, match=r"--dataset='digits' \(was 'imagenet2012'\)"):
    run_record.check_same_run(dataclasses.replace(
        experiment.Config(model_dir=model_dir),
        data=dataclasses.replace(config.data, dataset='digits')), 100)
  run_record.check_same_run(experiment.Config(model_dir=model_dir), 100)
  # Without any other record, what flags.json has is checked and the rest named in a warning.
  os.remove(os.path.join(model_dir, 'flags_history.jsonl'))
  run_record.check_same_run(config, 100)
  assert 'nor does any other record of the run: resuming without checking them' in caplog.text


def test_resume_identity_skips_a_diverged_start_and_needs_some_record(tmp_path):
  model_dir = _recorded_run(tmp_path, {'resolved_loss': 'sogclr', 'temperature': 0.1})
  os.remove(os.path.join(model_dir, 'flags.json'))
  with pytest.raises(ValueError, match=r'holds checkpoints but no record of the flags its run was '
                                       r'started with \(.*flags\.json is missing'):
    run_record.check_same_run(_config(model_dir, loss='sogclr', temperature=0.5), 100)
  run_record.check_same_run(dataclasses.replace(
      _config(model_dir, loss='sogclr', temperature=0.5), allow_flag_changes=('all',)), 100)
  for temperature, diverged in ((0.1, None), (0.5, 12)):
    run_record.append_flags_history(model_dir, {'flags': {'resolved_loss': 'sogclr',
                                                           'temperature': temperature}})
    if diverged:
      assert run_record.mark_diverged(model_dir, 1, diverged)
  with pytest.raises(ValueError, match=r'--temperature=0\.5 \(was 0\.1\)'):
    run_record.check_same_run(_config(model_dir, loss='sogclr', temperature=0.5), 100)


def test_a_history_that_is_not_utf8_is_an_error_naming_it_before_training(tmp_path):
  model_dir = _recorded_run(tmp_path, {'resolved_loss': 'sogclr', 'temperature': 0.1})
  open(os.path.join(model_dir, 'flags_history.jsonl'), 'wb').write(b'{"a": 1}\n\xff\xfe\n')
  with pytest.raises(ValueError, match=r'flags_history\.jsonl line 2 is not a json record of a '
                                       r"start \('utf-8' codec"):
    run_record.check_same_run(_config(model_dir, loss='sogclr'), 100)




def test_a_resumed_fine_tuning_records_the_checkpoint_it_was_initialized_from(tmp_path):
  # Finding (red team): resuming with another --checkpoint (which a resume does not read)
  # recorded that one in flags.json as the run's source.
  model_dir = str(tmp_path / 'run')
  os.makedirs(model_dir)
  first = experiment.Config(model_dir=model_dir, train_mode='finetune', checkpoint='/runs/a')
  run_record.record_start(first, initial_step=0)
  run_record.record_start(dataclasses.replace(first, checkpoint='/runs/b'), initial_step=5)
  assert json.load(open(os.path.join(model_dir, 'flags.json')))['checkpoint'] == '/runs/a'
  assert [s['flags']['checkpoint'] for s in run_record.read_flags_history(model_dir)] == [
      '/runs/a', '/runs/a']
  # A run that started from nothing did not start from a --checkpoint given on resume.
  run_record.record_start(dataclasses.replace(first, model_dir=str(tmp_path), checkpoint=None),
                          initial_step=0)
  run_record.record_start(dataclasses.replace(first, model_dir=str(tmp_path)), initial_step=3)
  assert json.load(open(tmp_path / 'flags.json'))['checkpoint'] is None
