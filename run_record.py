"""The run's record in its model_dir: flags.json (the flags of the run's last clean start) and
flags_history.jsonl (every start, in order), what --mode=eval and fine-tuning inherit from them,
the resume identity check (a run's defining flags cannot change under it) and the hparams
TensorBoard compares runs by.

A config here is an experiment.Config (read by attribute; this module does not import it).
"""
import contextlib
import dataclasses
import json
import os
import socket
import time

from absl import logging
import tensorflow as tf

import checkpoints
import files
import objective as objective_lib
import schema

# -- flags.json and flags_history.jsonl -----------------------------------------------------------

FLAGS_FILE = 'flags.json'


def write_flags(model_dir, values):
  """Writes the run's flag values (a dict) to model_dir/flags.json."""
  with tf.io.gfile.GFile(os.path.join(model_dir, FLAGS_FILE), 'w') as f:
    json.dump(values, f, indent=2, sort_keys=True)


HISTORY_FILE = 'flags_history.jsonl'


def append_flags_history(model_dir, entry):
  """Appends `entry` (a dict: when, where, from which step, the flags) as one json line to
  model_dir/flags_history.jsonl: every start of the run, in order."""
  path = os.path.join(model_dir, HISTORY_FILE)
  text = ''
  if tf.io.gfile.exists(path):  # gs:// has no append: read and rewrite (a few KB)
    with tf.io.gfile.GFile(path) as f:
      text = f.read()
  files.write_atomically(path, text + json.dumps(entry, sort_keys=True) + '\n')


def read_flags(path):
  """(flags dict, file path) of the training run's flags.json in directory `path` (or next to
  checkpoint prefix `path`; an export holds one), or (None, file path) when there is none.
  A file that is not a json object of flags (garbled, `null`, a list) is a ValueError naming it."""
  directory = path if tf.io.gfile.isdir(path) else os.path.dirname(path)
  flags_file = os.path.join(directory, FLAGS_FILE)
  if not tf.io.gfile.exists(flags_file):
    return None, flags_file
  try:
    with tf.io.gfile.GFile(flags_file, 'rb') as f:
      values = json.loads(f.read().decode('utf-8'))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{flags_file} is not valid json ({e}); restore it from the run\'s '
                     f'saved_model/<step>/{FLAGS_FILE} or give the model flags') from None
  if not isinstance(values, dict):
    raise ValueError(f'{flags_file} does not hold flags (a json object), but '
                     f'{json.dumps(values)[:40]}; restore it from the run\'s '
                     f'saved_model/<step>/{FLAGS_FILE} or give the model flags')
  return values, flags_file


def read_flags_history(model_dir):
  """The entries (dicts, oldest first) of model_dir/flags_history.jsonl; [] when there is none.
  A line that is not a json object (or a file that is not UTF-8) is a ValueError naming the file
  and the line."""
  path = os.path.join(model_dir, HISTORY_FILE)
  if not tf.io.gfile.exists(path):
    return []
  with tf.io.gfile.GFile(path, 'rb') as f:
    data = f.read()
  entries = []
  for number, line in enumerate(data.split(b'\n'), 1):
    if not line.strip():
      continue
    try:
      entry = json.loads(line.decode('utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      entry = e
    if not isinstance(entry, dict):
      reason = f' ({entry})' if isinstance(entry, Exception) else ''
      raise ValueError(f'{path} line {number} is not a json record of a start{reason}; move '
                       'the file aside (it is the log of the run\'s starts) and rerun')
    entries.append(entry)
  return entries


def mark_diverged(model_dir, starts_before, step):
  """Marks the start that flags_history.jsonl recorded after its first `starts_before` entries
  (this process' start, if it got that far) as diverged at `step`: it is no longer the run's
  record of its flags."""
  entries = read_flags_history(model_dir)
  if len(entries) <= starts_before:
    return False
  entries[-1]['diverged_at_step'] = step
  files.write_atomically(os.path.join(model_dir, HISTORY_FILE), ''.join(
      json.dumps(e, sort_keys=True) + '\n' for e in entries))
  return True


@contextlib.contextmanager
def kept_on_divergence(model_dir, chief, step_of):
  """A start that diverges inside is not the run's record of its flags: on FloatingPointError
  flags.json is put back as it was before and this start's history line is marked diverged at
  step `step_of()` (chief only), then the error goes on."""
  flags_file = os.path.join(model_dir, FLAGS_FILE)
  recorded_before = files.read_bytes(flags_file) if chief else None
  starts_before = len(read_flags_history(model_dir)) if chief else 0
  try:
    yield
  except FloatingPointError:
    if chief:
      files.put_back(flags_file, recorded_before)
      mark_diverged(model_dir, starts_before, step_of())
    raise


def flags_path(model_dir):
  """model_dir/flags.json."""
  return os.path.join(model_dir, FLAGS_FILE)


# -- Inheritance: --mode=eval and fine-tuning take the training run's flags ----------------------

def inherit_flags(values, given, path, names):
  """The flag values (a dict) with the flags `names` not `given` on the command line taken
  from the training run's flags.json in directory `path` (or next to checkpoint prefix `path`;
  an export holds one), so fine-tuning needs only --checkpoint and --mode=eval only --model_dir.
  Fine-tuning inherits schema.architecture(Config), --mode=eval schema.inherited_by_eval(Config)
  (what an evaluation depends on: the heads, the data, the weight decay, the final step).
  """
  trained, flags_file = read_flags(path)
  if trained is None:
    return values
  values = dict(values)
  for name in names:
    if name not in given and name in trained and values[name] != trained[name]:
      logging.info('--%s=%s from %s', name, trained[name], flags_file)
      values[name] = trained[name]
  return values


# -- The identity check on resume -----------------------------------------------------------------

def run_defining_flags(config_class):
  """The flags whose change makes a resumed run another run (its data order, objective or
  network; declared on the config fields, schema.py) and the loss the aliases resolve to;
  changing one on resume is an error unless allowed by name (allow_flag_changes)."""
  return ('resolved_loss', *schema.run_defining(config_class))


# The objective's hyperparameters: every ObjectiveConfig field but the loss (its own flag).
OBJECTIVE_FLAGS = tuple(f.name for f in dataclasses.fields(objective_lib.ObjectiveConfig)
                        if f.name != 'loss')


def recorded_values(config):
  """What flags.json records of a run: its flag values (config.flags), every run-defining value
  from the config itself and the resolved loss. A Config built in a notebook carries no flag
  values: then every setting of the config, so its run is recorded whole, checked on resume and
  inherited by --mode=eval like a command line's."""

  def values(found):
    return {name: getattr(config if section is None else getattr(config, section), field)
            for name, (section, field) in found.items() if name != 'flags'}

  recorded = dict(config.flags) or values(schema.every_location(type(config)))
  return recorded | values(schema.locations(type(config))) | {
      'resolved_loss': _resolved_loss(config)}


def _resolved_loss(config):
  # The contrastive loss the aliases resolved to; fine-tuning trains cross-entropy only.
  return config.objective.loss if config.pretrain else 'cross_entropy'


def check_same_run(config, total_steps):
  """Raises ValueError listing the run-defining flags that differ from those recorded in
  model_dir/flags.json when model_dir holds checkpoints to resume (unless allowed by name);
  logs the other changes (a longer training, another learning rate)."""
  # Read first, whatever else: a history that cannot be appended to later stops the run now.
  history = read_flags_history(config.model_dir)
  if not checkpoints.list_checkpoints(config.model_dir):
    return
  if 'all' in config.allow_flag_changes:
    logging.warning('--allow_flag_changes=all: resuming %s without checking its flags.',
                    config.model_dir)
    return
  # A run recorded before the gamma schedule and iSogCLR existed ran with their defaults.
  required = set(run_defining_flags(type(config))) - set(OBJECTIVE_FLAGS)
  recorded, flags_file = recorded_flags(config.model_dir, history, sorted(required))
  defaults = dataclasses.asdict(objective_lib.ObjectiveConfig())
  recorded = {name: defaults[name] for name in OBJECTIVE_FLAGS} | recorded
  current = recorded_values(config)
  changed = {name: (recorded[name], value) for name, value in current.items()
             if name in recorded and recorded[name] != value}
  # Hyperparameters the objective does not read (SimCLR's gamma; fine-tuning has none) cannot
  # make it another run.
  used = config.objective.hyperparameters() if config.pretrain else ()
  for name in set(OBJECTIVE_FLAGS) - set(used):
    changed.pop(name, None)
  allowed = set(config.allow_flag_changes)
  if 'loss' in allowed:
    allowed.add('resolved_loss')
  defining = {k: v for k, v in changed.items()
              if k in run_defining_flags(type(config)) and k not in allowed}
  if defining:
    listed = ', '.join(f'--{"loss" if k == "resolved_loss" else k}={new!r} (was {old!r})'
                       for k, (old, new) in defining.items())
    names = ','.join('loss' if k == 'resolved_loss' else k for k in defining)
    raise ValueError(f'--model_dir={config.model_dir!r} holds a run with other flags ({listed}; '
                     f'recorded in {flags_file}); resume with its flags, use another '
                     f'--model_dir, or pass --allow_flag_changes={names}')
  for name, (old, new) in changed.items():
    logging.info('Resuming with --%s=%r (was %r in %s).', name, new, old, flags_file)


def recorded_flags(model_dir, history=None, required=()):
  """(the flags the run in model_dir was started with, where they were read): its flags.json;
  when that is missing, unreadable or lacks one of the flags `required`, the newest start in
  flags_history.jsonl that did not diverge, then the flags.json of its newest export (a warning
  says which; flags.json's own values still count). A ValueError when none of them is there: a
  resume never goes unchecked."""
  try:
    recorded, flags_file = read_flags(model_dir)
    problem = f'{flags_file} is missing'
  except ValueError as e:
    recorded, flags_file, problem = None, None, str(e).split('; restore')[0]
  missing = [name for name in required if name not in (recorded or {})]
  if recorded is not None and not missing:
    return recorded, flags_file
  if history is None:
    history = read_flags_history(model_dir)
  if recorded is not None:
    problem = f'{flags_file} does not record {", ".join(missing)}'
  found = _other_record(model_dir, history, problem)
  if found is not None and recorded is not None:
    return found[0] | recorded, f'{flags_file} and {found[1]}'
  if found is not None:
    return found
  if recorded is not None:
    logging.warning('%s, nor does any other record of the run: resuming without checking '
                    'them.', problem)
    return recorded, flags_file
  raise ValueError(f'--model_dir={model_dir!r} holds checkpoints but no record of the flags its '
                   f'run was started with ({problem}; {os.path.join(model_dir, HISTORY_FILE)} '
                   f'holds no start): restore {FLAGS_FILE}, or pass --allow_flag_changes=all to '
                   'resume with the flags given')


def _other_record(model_dir, history, problem):
  """(flags, where) of the newest start in the history that did not diverge, else of the
  newest export's flags.json, with a warning naming `problem` and the record used; None."""
  history_file = os.path.join(model_dir, HISTORY_FILE)
  starts = [e for e in history
            if isinstance(e.get('flags'), dict) and 'diverged_at_step' not in e]
  if starts:
    source = f"{history_file} (its start of {starts[-1].get('started_utc', '?')})"
    logging.warning('%s; checking the run\'s identity against the flags of %s.', problem,
                    source)
    return starts[-1]['flags'], source
  exports = os.path.join(model_dir, 'saved_model')
  steps = sorted((int(n.rstrip('/')) for n in (
      tf.io.gfile.listdir(exports) if tf.io.gfile.isdir(exports) else [])
      if n.rstrip('/').isdigit()), reverse=True)
  for step in steps:
    try:
      recorded, source = read_flags(os.path.join(exports, str(step)))
    except ValueError:
      continue
    if recorded is not None:
      logging.warning('%s and %s holds no start; checking the run\'s identity against %s.',
                      problem, history_file, source)
      return recorded, source
  return None


def record_start(config, initial_step):
  """flags.json (the flags of this start) and one more line of flags_history.jsonl. A resumed
  run records the --checkpoint its first start was initialized from (a resume does not read
  --checkpoint)."""
  record = recorded_values(config)
  if initial_step:
    first = [s['flags'] for s in read_flags_history(config.model_dir)
             if s.get('from_step') == 0 and isinstance(s.get('flags'), dict)]
    if first and first[0].get('checkpoint') != record.get('checkpoint'):
      record['checkpoint'] = first[0].get('checkpoint')
  append_flags_history(config.model_dir, {
      'started_utc': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()),
      'host': socket.gethostname(), 'pid': os.getpid(), 'from_step': initial_step,
      'flags': record})
  write_flags(config.model_dir, record)


# -- TensorBoard's HParams ------------------------------------------------------------------------

# The results the HParams dashboard shows next to the run-defining flags.
HPARAMS_METRICS = {'eval/top_1': 'hparams/head_top_1', 'eval/knn_top_1': 'hparams/knn_top_1',
                   'probe/top_1': 'hparams/probe_top_1'}


def hparams_of(config):
  """{name: value} of the run-defining flags (and the length and learning rate), as TensorBoard's
  HParams plugin takes them: bool, int, float or str."""
  record = recorded_values(config)
  names = (*run_defining_flags(type(config)), 'learning_rate', 'weight_decay', 'train_epochs',
           'train_steps')
  return {name: record[name] if isinstance(record[name], (bool, int, float, str))
          else str(record[name]) for name in names if name in record}


def write_hparams(summary_writer, config, step, results):
  """The run's hparams (hparams_of) and its final metrics (hparams/*), once, for TensorBoard's
  HParams dashboard (it compares runs under one --logdir: SimCLR against SogCLR, batch sizes)."""
  from tensorboard.plugins.hparams import api as hparams_api  # noqa: PLC0415  (TF's own)

  # Without --knn_monitor the final evaluation has no kNN; an evaluation while training at the
  # final step has.
  last = results.get('monitor', [{}])[-1]
  metrics = (last if last.get('global_step') == step else {}) | results
  with summary_writer.as_default(step=step):
    hparams_api.hparams(hparams_of(config), trial_id=os.path.basename(
        os.path.normpath(config.model_dir)))
    for key, tag in HPARAMS_METRICS.items():
      if key in metrics:
        tf.summary.scalar(tag, metrics[key])
  summary_writer.flush()
