"""What each setting is to a run, declared once on the config field that holds it.

A field declared with `setting(default, ...)` says whether it defines the run (a resume with
another value is another run, refused unless allowed by name), whether it is architecture (it
shapes the checkpoint's variables: fine-tuning inherits it from the pretraining run), and
whether `--mode=eval` inherits it from the run it evaluates. A field declared plainly is free
to change on resume and never inherited. Its flag is the field's name unless `flag` says
otherwise. run_record and settings derive their lists from these declarations:

  run_defining(Config), architecture(Config), inherited_by_eval(Config), locations(Config)
"""
import dataclasses

_KEY = 'sogclr_setting'


def setting(default, *, defines_run=False, architecture=False, eval_inherits=False, flag=None):
  """A dataclass field with its role in a run (architecture implies both others)."""
  return dataclasses.field(default=default, metadata={_KEY: {
      'defines_run': defines_run or architecture, 'architecture': architecture,
      'eval_inherits': eval_inherits or architecture, 'flag': flag}})


def flag_of(field):
  """The flag that sets `field` (a dataclasses.Field): its name unless declared otherwise."""
  return (field.metadata.get(_KEY) or {}).get('flag') or field.name


def _declared(config_class, section=None):
  """(flag, (section, field name), declaration) of every declared field of `config_class` and
  of its nested config classes (section: the attribute holding the nested config)."""
  for field in dataclasses.fields(config_class):
    if dataclasses.is_dataclass(field.type if isinstance(field.type, type) else None):
      yield from _declared(field.type, field.name)
    elif _KEY in field.metadata:
      yield flag_of(field), (section, field.name), field.metadata[_KEY]


def locations(config_class):
  """{flag: (section, field name)} of the run-defining settings (section None: top level)."""
  found = {}
  for flag, where, declaration in _declared(config_class):
    if declaration['defines_run']:
      found.setdefault(flag, where)
  return found


def _flags(config_class, role):
  return tuple(dict.fromkeys(flag for flag, _, declaration in _declared(config_class)
                             if declaration[role]))


def run_defining(config_class):
  """The flags whose change on resume makes another run."""
  return _flags(config_class, 'defines_run')


def architecture(config_class):
  """The flags that shape the checkpoint's variables (fine-tuning inherits them)."""
  return _flags(config_class, 'architecture')


def inherited_by_eval(config_class):
  """The flags --mode=eval takes from the evaluated run's flags.json when not given."""
  return _flags(config_class, 'eval_inherits')
