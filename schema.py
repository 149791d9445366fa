"""What each setting is to a run, declared once on the config field that holds it.

A field declared with `setting(default, ...)` says whether it defines the run (a resume with
another value is another run, refused unless allowed by name), whether it is architecture (it
shapes the checkpoint's variables: fine-tuning inherits it from the pretraining run), and
whether `--mode=eval` inherits it from the run it evaluates, and the values it allows. A field
declared without a role (or plainly) is free to change on resume and never inherited. Its flag
is the field's name unless `flag` says otherwise. run_record and settings derive their lists and
range checks from these declarations:

  run_defining(Config), architecture(Config), inherited_by_eval(Config), locations(Config),
  check_ranges(Config, values), check(ConfigSection, field=value, ...)
"""
import dataclasses

_KEY = 'sogclr_setting'


@dataclasses.dataclass(frozen=True)
class Range:
  """The numbers a setting allows: from `low` to `high` (None: unbounded), a bound excluded when
  its `*_open` is set. str() is how an error says it: '>= 0', '> 0', 'in (0, 1]'."""
  low: float = None
  high: float = None
  low_open: bool = False
  high_open: bool = False

  def __contains__(self, value):
    if value != value:  # NaN: outside every range (it fails every comparison below)
      return False
    if self.low is not None and (value < self.low or self.low_open and value == self.low):
      return False
    return self.high is None or not (value > self.high or self.high_open and value == self.high)

  def __str__(self):
    if self.high is None:
      return f'{">" if self.low_open else ">="} {self.low}'
    if self.low is None:
      return f'{"<" if self.high_open else "<="} {self.high}'
    return (f'in {"(" if self.low_open else "["}{self.low}, '
            f'{self.high}{")" if self.high_open else "]"}')


def at_least(low):
  return Range(low)


def above(low):
  return Range(low, low_open=True)


def setting(default, *, defines_run=False, architecture=False, eval_inherits=False, flag=None,
            allowed=None):
  """A dataclass field with its role in a run (architecture implies both others) and the
  values it allows (a Range; None: any)."""
  return dataclasses.field(default=default, metadata={_KEY: {
      'defines_run': defines_run or architecture, 'architecture': architecture,
      'eval_inherits': eval_inherits or architecture, 'flag': flag, 'allowed': allowed}})


def flag_of(field):
  """The flag that sets `field` (a dataclasses.Field): its name unless declared otherwise."""
  return (field.metadata.get(_KEY) or {}).get('flag') or field.name


def _leaves(config_class, section=None):
  """(field, section) of every field of `config_class` and of its nested config classes that is
  not itself a config (section: the attribute holding the nested config; None: top level)."""
  for field in dataclasses.fields(config_class):
    if dataclasses.is_dataclass(field.type if isinstance(field.type, type) else None):
      yield from _leaves(field.type, field.name)
    else:
      yield field, section


def _declared(config_class):
  """(flag, (section, field name), declaration) of every declared field of `config_class` and
  of its nested config classes."""
  for field, section in _leaves(config_class):
    if _KEY in field.metadata:
      yield flag_of(field), (section, field.name), field.metadata[_KEY]


def locations(config_class):
  """{flag: (section, field name)} of the run-defining settings (section None: top level)."""
  found = {}
  for flag, where, declaration in _declared(config_class):
    if declaration['defines_run']:
      found.setdefault(flag, where)
  return found


def every_location(config_class):
  """{flag: (section, field name)} of every setting of `config_class` and its nested config
  classes, declared or not (the first of a flag two fields read)."""
  found = {}
  for field, section in _leaves(config_class):
    found.setdefault(flag_of(field), (section, field.name))
  return found


def ranges(config_class):
  """{flag: Range} of the settings that declare the values they allow."""
  found = {}
  for flag, _, declaration in _declared(config_class):
    if declaration['allowed'] is not None:
      found.setdefault(flag, declaration['allowed'])
  return found


def check_ranges(config_class, values):
  """Raises ValueError naming the first flag of `values` ({flag: value}) outside its range."""
  for flag, allowed in ranges(config_class).items():
    if flag in values and values[flag] not in allowed:
      raise ValueError(f'--{flag} must be {allowed}, got {values[flag]}')


def check(config_class, **values):
  """Raises ValueError naming the first of `values` ({field name: value}) outside the range its
  field of `config_class` declares: a library class's check of its arguments, from the same
  declaration as the flag's."""
  allowed = {field.name: (field.metadata.get(_KEY) or {}).get('allowed')
             for field in dataclasses.fields(config_class)}
  for name, value in values.items():
    if allowed[name] is not None and value not in allowed[name]:
      raise ValueError(f'{name} must be {allowed[name]}, got {value}')


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
