"""Flag values to one frozen experiment config: the checks, the inheritance of a training run's
flags from its flags.json, and the build.

Takes a plain dict {flag name: value} (run.py passes the parsed flags), so a notebook can build a
config the command line would, without absl:

  config = settings.config_of(values, given=set(values))   # ValueError names the flag
"""
import dataclasses
import math
import re
import types

from absl import logging
import tensorflow as tf

import data as data_lib
import distribution
import evaluation
import experiment
import model as model_lib
import objective as objective_lib
import resnet
import run_record
import schema
import trainer as trainer_lib


def resolve_loss(loss, aliases):
  """The canonical loss from --loss and the alias flags; disagreeing flags are an error.

  aliases: {flag name: True/False/None}, True meaning SogCLR.
  """
  chosen = {}
  if loss is not None:
    chosen['loss'] = loss
  for name, value in aliases.items():
    if value is not None:
      chosen[name] = 'sogclr' if value else 'simclr'
  if len(set(chosen.values())) > 1:
    given = ', '.join(f'--{k}={v}' for k, v in chosen.items())
    raise ValueError(f'Conflicting loss flags ({given}); set them to agree or keep only one')
  return next(iter(chosen.values()), 'sogclr')


def validate_flags(values):
  """Cross-flag checks of the flag values (a dict), before anything is built."""
  v = types.SimpleNamespace(**values)
  if not v.model_dir:
    raise ValueError('--model_dir is required (checkpoints, summaries and flags.json go there)')
  for name, value in values.items():  # NaN passes every comparison below
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f'--{name} must be a finite number, got {value}')
  if v.resnet_depth not in resnet.DEPTHS:
    raise ValueError(f'--resnet_depth={v.resnet_depth} is not one of {list(resnet.DEPTHS)}')
  schema.check_ranges(experiment.Config, values)  # each setting's declared range
  _check_objective(values)
  if not v.train_steps and not v.train_epochs and v.mode != 'eval':
    raise ValueError('--train_epochs=0 trains nothing; give --train_epochs or --train_steps > 0')
  if v.eval_name is not None and not re.fullmatch(r'[A-Za-z0-9_.=-]+', v.eval_name):
    raise ValueError(f'--eval_name={v.eval_name!r} must be a plain name (letters, digits, '
                     "'_', '-', '.', '='): it names the directory model_dir/eval_<name>")
  if v.train_mode == 'pretrain' and v.mode != 'eval' and v.train_batch_size < 2:
    raise ValueError(f'--train_batch_size={v.train_batch_size} leaves a contrastive batch '
                     'without negatives; pretraining needs at least 2 images')
  if v.train_mode == 'finetune' and v.mode != 'eval' and not v.checkpoint:
    logging.warning('--train_mode=finetune without --checkpoint trains from scratch.')
  # The standard stem divides the image by 32, the CIFAR stem by 8.
  min_size = 8 if v.image_size <= data_lib.SMALL_IMAGE_SIZE else 32
  if v.image_size < min_size:
    raise ValueError(f'--image_size={v.image_size} is too small for the ResNet '
                     f'(at least {min_size} px)')


def _check_objective(values):
  """The objective's settings that depend on each other (each one's range: schema)."""
  v = types.SimpleNamespace(**values)
  if v.gamma_schedule == 'cosine' and v.gamma_decay_epochs <= 0:
    raise ValueError('--gamma_decay_epochs must be > 0 with --gamma_schedule=cosine, got '
                     f'{v.gamma_decay_epochs}')
  if v.isogclr_tau_max < v.isogclr_tau_min:
    raise ValueError(f'--isogclr_tau_max={v.isogclr_tau_max} is below '
                     f'--isogclr_tau_min={v.isogclr_tau_min}')
  loss = resolve_loss(v.loss, {'DCL_mode': v.DCL_mode, 'GCL_mode': v.GCL_mode,
                               'BI_mode': v.BI_mode})
  if loss == 'isogclr' and not v.isogclr_tau_min <= v.temperature <= v.isogclr_tau_max:
    raise ValueError(f'--temperature={v.temperature} (the initial temperature of iSogCLR) must '
                     f'be within [--isogclr_tau_min, --isogclr_tau_max] = '
                     f'[{v.isogclr_tau_min}, {v.isogclr_tau_max}]')


def _section(config_class, values, **derived):
  """A config of `config_class` with each field from its flag's value (schema.flag_of), but
  those `derived` from several flags; fields whose flag is not among `values` keep defaults."""
  fields = {f.name: values[schema.flag_of(f)] for f in dataclasses.fields(config_class)
            if f.name not in derived and schema.flag_of(f) in values}
  return config_class(**fields, **derived)


def build_config(values):
  """The frozen experiment config of the (validated) flag values: every field takes the flag of
  its name (or the one its schema.setting names); the derived ones are set here."""
  loss = resolve_loss(values['loss'], {name: values[name]
                                       for name in ('DCL_mode', 'GCL_mode', 'BI_mode')})
  sections = dict(
      data=_section(data_lib.DataConfig, values),
      model=_section(model_lib.ModelConfig, values,
                     cifar_stem=values['image_size'] <= data_lib.SMALL_IMAGE_SIZE),
      objective=_section(objective_lib.ObjectiveConfig, values, loss=loss),
      optimizer=_section(trainer_lib.OptimizerConfig, values),
      loop=_section(trainer_lib.LoopConfig, values),
      eval=_section(evaluation.EvalConfig, values),
      distribution=_section(distribution.DistributionConfig, values))
  return _section(experiment.Config, values, **sections,
                  allow_flag_changes=tuple(values['allow_flag_changes']),
                  flags=types.MappingProxyType(dict(values)))


def _check_evaluated_run(model_dir, given):
  """--mode=eval of model_dir's checkpoints: the directory exists and, unless the data is given,
  records the training run's flags (else the default dataset would be the one named missing)."""
  if not tf.io.gfile.isdir(model_dir):
    raise ValueError(f'--model_dir={model_dir!r} does not exist: --mode=eval evaluates the '
                     'checkpoints of a training run there (check the path, or start the '
                     'training run first)')
  if 'dataset' not in given and run_record.read_flags(model_dir)[0] is None:
    raise ValueError(f'--model_dir={model_dir!r} holds no {run_record.FLAGS_FILE} (its training '
                     'run has not started yet, or it is not a run\'s directory): start the '
                     'training run first, or give its --dataset and model flags')


def config_of(values, given):
  """The config of flag values `values` (names `given` on the command line), with the flags a
  training run defines taken from its flags.json when not given (--mode=eval: from model_dir;
  fine-tuning: from --checkpoint); ValueError names a bad flag."""
  if values['mode'] == 'eval' and values['checkpoint']:  # one checkpoint or export
    values = run_record.inherit_flags(values, given, values['checkpoint'],
                                        schema.inherited_by_eval(experiment.Config))
  elif values['mode'] == 'eval' and values['model_dir']:
    _check_evaluated_run(values['model_dir'], given)
    values = run_record.inherit_flags(values, given, values['model_dir'],
                                        schema.inherited_by_eval(experiment.Config))
  elif values['checkpoint'] and values['train_mode'] == 'finetune':
    values = run_record.inherit_flags(values, given, values['checkpoint'],
                                      schema.architecture(experiment.Config))
  validate_flags(values)
  return build_config(values)
