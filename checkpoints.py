"""Everything that reads or writes a run's model_dir: resume, restore from another run's
checkpoint or export, SavedModel export, result_<step>.json and flags.json.

A checkpoint holds `model`, `optimizer` (whose iteration count is the step) and, for an
objective with per-image tables, those tables under `sogclr` (SogCLR's u table, `sogclr/log_u`;
iSogCLR adds `sogclr/tau` and `sogclr/tau_momentum`); checkpoints are numbered by their step
(`ckpt-<step>`).
"""
import collections
import json
import os
import re
import socket
import threading
import time

from absl import logging
import numpy as np
import tensorflow as tf


def prepare_write_dir(model_dir, chief=True, task_id=0):
  """The directory this worker saves into, checked writable before anything is built.

  Non-chief workers of a multi-worker job save checkpoints (saving is collective) into a
  temporary directory of their own, deleted at the end, as TensorFlow documents.
  """
  write_dir = model_dir if chief else os.path.join(model_dir, f'.worker_{task_id}_tmp')
  try:
    tf.io.gfile.makedirs(write_dir)
    probe_file = os.path.join(write_dir, f'.write_test_{os.getpid()}')
    with tf.io.gfile.GFile(probe_file, 'w') as f:
      f.write('')
    tf.io.gfile.remove(probe_file)
  except (OSError, tf.errors.OpError) as e:
    raise ValueError(f'--model_dir={model_dir!r} is not writable: '
                     f'{getattr(e, "message", e)}') from None
  return write_dir


# Where a checkpoint keeps the objective's per-image tables (the official code's name).
OBJECTIVE_KEY = 'sogclr'


def restore_or_initialize(model, optimizer, objective=None, *, model_dir, write_dir=None,
                          keep_checkpoint_max=5, checkpoint=None, zero_init_logits_layer=False,
                          start_over=False, chief=True):
  """Resumes from `model_dir`'s newest readable checkpoint first (the same run, restarted); only
  then initializes the model from `checkpoint` (another run's checkpoint or export), if given.

  Never starts from step 0 over checkpoints it cannot read: that is a ValueError naming them,
  unless `start_over`, which moves them aside (chief only). Returns the CheckpointManager that
  saves model, optimizer (with the step) and the objective's per-image tables (SogCLR's u)
  into `write_dir` (default: model_dir).
  """
  trackables = {'model': model, 'optimizer': optimizer}
  if objective is not None and objective.tables():
    trackables[OBJECTIVE_KEY] = objective
  state = tf.train.Checkpoint(**trackables)
  resumed = _resume(state, model_dir, start_over=start_over, chief=chief)
  # After _resume: a repaired state file names the checkpoint resumed from.
  manager = tf.train.CheckpointManager(state, write_dir or model_dir,
                                       max_to_keep=keep_checkpoint_max)
  if resumed:
    # The state restored (u included), comparable with the 'Final state' line of any run.
    logging.info('Resumed from %s at step %d: %s', resumed, int(optimizer.iterations.numpy()),
                 state_fingerprint(model, objective))
  elif checkpoint:
    restore_pretrained(model, checkpoint)
    if zero_init_logits_layer and model.has_supervised_head:
      # After the restore, or the pretraining run's head would overwrite the zeros.
      for variable in model.supervised_head.weights:
        variable.assign(tf.zeros_like(variable))
  return manager


STATE_FILE = 'checkpoint'


def _step_of(prefix):
  match = re.search(r'ckpt-(\d+)$', prefix)
  return int(match.group(1)) if match else -1


def _state_file_latest(model_dir):
  """The checkpoint the state file names as latest, or None (missing or unparsable file)."""
  if not tf.io.gfile.exists(os.path.join(model_dir, STATE_FILE)):
    return None
  state = tf.train.get_checkpoint_state(model_dir)  # None (and a warning) when garbled
  if state is None or not state.model_checkpoint_path:
    return None
  path = state.model_checkpoint_path
  return path if os.path.isabs(path) or '://' in path else os.path.join(model_dir, path)


def list_checkpoints(model_dir):
  """The checkpoint prefixes in model_dir, newest first: the state file's latest (when its
  index is present), then every ckpt-<step>.index present by decreasing step."""
  present = {name[:-len('.index')] for name in tf.io.gfile.glob(
      os.path.join(model_dir, 'ckpt-*.index'))}
  ordered = sorted((p for p in present if _step_of(p) >= 0), key=_step_of, reverse=True)
  latest = _state_file_latest(model_dir)
  if latest is not None and latest in present:
    ordered.remove(latest)
    ordered.insert(0, latest)
  return ordered


def short_reason(error):
  """An error in one line: its type and the first line of its message (paths shortened)."""
  message = getattr(error, 'message', None) or str(error) or repr(error)
  message = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', message.strip().splitlines()[0])
  if len(message) > 320:  # long paths: keep the start and the cause at the end
    message = f'{message[:120]} ... {message[-180:]}'
  return f'{type(error).__name__}: {message}'


def _unreadable(path):
  """Why checkpoint `path` cannot be read (a missing or truncated file, a checksum mismatch:
  every tensor is read once), or None when it can."""
  try:
    reader = tf.train.load_checkpoint(path)
    for key in reader.get_variable_to_shape_map():
      reader.get_tensor(key)
  except (tf.errors.OpError, IndexError, OSError, ValueError) as e:
    return short_reason(e)
  return None


def _resume(state, model_dir, *, start_over, chief):
  """Restores `state` from the newest readable checkpoint of model_dir; returns its path, or
  None when model_dir holds no checkpoint (or start_over moved them aside)."""
  skipped = []
  for path in list_checkpoints(model_dir):
    try:
      state.restore(path).assert_existing_objects_matched()
    except (ValueError, AssertionError, IndexError, OSError, tf.errors.OpError) as e:
      # Damaged files (read once more, only now that the restore failed): try the next older
      # checkpoint. Sound files that do not restore: another configuration. A later restore
      # overwrites whatever this one assigned before failing.
      reason = _unreadable(path)
      if reason:
        skipped.append((os.path.basename(path), reason))
        continue
      raise ValueError(
          f'--model_dir={model_dir!r} holds a checkpoint of another configuration '
          f'({str(e).splitlines()[0][:300]}); resume with the flags in its flags.json or use '
          'a new --model_dir') from None
    for name, reason in skipped:
      logging.warning('Skipped checkpoint %s (unreadable: %s); resuming from the next older '
                      'one.', os.path.join(model_dir, name), reason)
    if chief and (skipped or _state_file_latest(model_dir) != path):
      _write_state_file(model_dir, path)
    return path
  traces = [p for p in (STATE_FILE, 'ckpt-*')
            if tf.io.gfile.glob(os.path.join(model_dir, p))]
  if not traces:
    return None
  what = ('; '.join(f'{name} ({reason})' for name, reason in skipped) if skipped else
          f'a state file ({STATE_FILE}) naming checkpoints that are gone')
  if not start_over:
    raise ValueError(
        f'--model_dir={model_dir!r} holds checkpoints but none can be read: {what}; restore '
        'them, use another --model_dir, or pass --start_over to train from step 0 (they are '
        'moved aside, not deleted)')
  if chief:
    aside = _move_checkpoints_aside(model_dir)
    logging.warning('--start_over: moved the unreadable checkpoints to %s; training from step 0.',
                    aside)
  return None


def _write_state_file(model_dir, latest):
  """Rewrites model_dir's state file: `latest` and the older checkpoints present, oldest first."""
  older = [p for p in list_checkpoints(model_dir) if 0 <= _step_of(p) < _step_of(latest)]
  paths = [os.path.basename(p) for p in sorted(older, key=_step_of)] + [
      os.path.basename(latest)]
  text = f'model_checkpoint_path: "{paths[-1]}"\n' + ''.join(
      f'all_model_checkpoint_paths: "{p}"\n' for p in paths)
  _write_atomically(os.path.join(model_dir, STATE_FILE), text)
  logging.warning('Rewrote %s: latest checkpoint %s.', os.path.join(model_dir, STATE_FILE),
                  paths[-1])


def _move_checkpoints_aside(model_dir):
  aside = os.path.join(model_dir, time.strftime('discarded-%Y%m%d-%H%M%S', time.gmtime()))
  tf.io.gfile.makedirs(aside)
  for pattern in (STATE_FILE, 'ckpt-*'):
    for path in tf.io.gfile.glob(os.path.join(model_dir, pattern)):
      tf.io.gfile.rename(path, os.path.join(aside, os.path.basename(path)))
  return aside


def _write_atomically(path, text):
  """Writes `text` to `path` under another name, then renames it: `path` is never half-written,
  and a failed write (a full disk) leaves no temporary file behind."""
  temporary = f'{path}.tmp_{os.getpid()}'
  try:
    with tf.io.gfile.GFile(temporary, 'w') as f:
      f.write(text)
    tf.io.gfile.rename(temporary, path, overwrite=True)
  except BaseException:
    try:
      if tf.io.gfile.exists(temporary):
        tf.io.gfile.remove(temporary)
    except (tf.errors.OpError, OSError):
      pass
    raise


def latest(directory):
  """The newest checkpoint of `directory` (its state file's), or None."""
  return tf.train.latest_checkpoint(directory)


def discard(manager, step):
  """Deletes checkpoint ckpt-<step> of `manager` (a state training cannot continue from) and
  points the state file at the newest one left (or removes it when none is)."""
  directory = manager.directory
  for path in tf.io.gfile.glob(os.path.join(directory, f'ckpt-{step}.*')):
    tf.io.gfile.remove(path)
  left = list_checkpoints(directory)
  if left:
    _write_state_file(directory, max(left, key=_step_of))
  elif tf.io.gfile.exists(os.path.join(directory, STATE_FILE)):
    tf.io.gfile.remove(os.path.join(directory, STATE_FILE))


def remove_stale_saves(model_dir):
  """Removes what interrupted saves leave in model_dir (ckpt-<n>_temp folders, half-written
  exports and results); call only while holding the run's lock. Returns the paths removed."""
  removed = []
  for pattern in ('ckpt-*_temp', os.path.join('saved_model', '.tmp_*'), '.result_*.json.tmp_*',
                  f'{STATE_FILE}.tmp_*'):
    for path in tf.io.gfile.glob(os.path.join(model_dir, pattern)):
      if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
      else:
        tf.io.gfile.remove(path)
      removed.append(path)
  if removed:
    logging.warning('Removed what interrupted saves left: %s', ', '.join(removed))
  return removed


def remove_abandoned_exports(model_dir, min_age_seconds=600):
  """Removes the half-written exports (saved_model/.tmp_<step>_<pid>) of processes that no
  longer run on this host and that were last touched over `min_age_seconds` ago (an evaluation
  killed while exporting; an export of another host is written within seconds); local
  directories only. For --mode=eval, which takes no lock. Returns the paths removed."""
  if '://' in model_dir:
    return []
  removed = []
  for path in tf.io.gfile.glob(os.path.join(model_dir, 'saved_model', '.tmp_*_*')):
    pid = os.path.basename(path).rsplit('_', 1)[1]
    try:
      age = time.time() - max(os.path.getmtime(os.path.join(root, name))
                              for root, dirs, files in os.walk(path)
                              for name in ['.', *dirs, *files])
    except OSError:
      continue
    if pid.isdigit() and _process_start_ticks(int(pid)) is None and age > min_age_seconds:
      tf.io.gfile.rmtree(path)
      removed.append(path)
  if removed:
    logging.warning('Removed half-written exports of processes that are gone: %s',
                    ', '.join(removed))
  return removed


def save(manager, step):
  """manager.save(step); a failed save (a full disk, say) leaves no partial checkpoint and is a
  ValueError naming the checkpoint, the last complete one and the cause."""
  try:
    return manager.save(checkpoint_number=step)
  except (tf.errors.OpError, OSError) as e:
    for path in tf.io.gfile.glob(os.path.join(manager.directory, f'ckpt-{step}_temp*')):
      tf.io.gfile.rmtree(path) if tf.io.gfile.isdir(path) else tf.io.gfile.remove(path)
    raise ValueError(f'could not save checkpoint ckpt-{step} in {manager.directory} '
                     f'({short_reason(e)}); the last complete checkpoint '
                     f'({manager.latest_checkpoint}) is kept') from None


def checkpoint_prefix(path):
  """The checkpoint prefix --checkpoint names: a prefix, a directory of checkpoints (its
  newest) or a SavedModel export (whose variables are a checkpoint of {'model': model})."""
  if tf.io.gfile.exists(os.path.join(path, 'saved_model.pb')):
    return os.path.join(path, 'variables', 'variables')
  if tf.io.gfile.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is None:
      raise ValueError(f'--checkpoint={path!r} is a directory without checkpoints')
    path = latest
  if not tf.io.gfile.exists(path + '.index'):
    raise ValueError(f'--checkpoint={path!r} does not exist (expected a checkpoint prefix, a '
                     'directory holding checkpoints or a SavedModel export)')
  try:
    tf.train.list_variables(path)
  except (tf.errors.OpError, ValueError) as e:
    raise ValueError(f'--checkpoint={path!r} cannot be read ({short_reason(e)}): its '
                     f'{os.path.basename(path)}.index is damaged or not a checkpoint '
                     'index') from None
  return path


def resolve_evaluated(path):
  """(checkpoint prefix, training step) of what --mode=eval --checkpoint names; an export's
  step is the name of its directory (saved_model/<step>)."""
  prefix = checkpoint_prefix(path)
  if prefix.endswith(os.path.join('variables', 'variables')):
    name = os.path.basename(os.path.normpath(path))
    if not name.isdigit():
      raise ValueError(f'--checkpoint={path!r} is a SavedModel export not named by its step '
                       '(saved_model/<step>)')
    return prefix, int(name)
  return prefix, checkpoint_step(prefix)


def restore_pretrained(model, path):
  """Initializes `model` from another run's checkpoint or SavedModel export (weights only; no
  optimizer or step)."""
  path = checkpoint_prefix(path)
  # Every trunk and projection-head variable must come from the checkpoint (restore_model
  # names the missing and mismatched ones). The linear head may be new (a first fine-tuning
  # starts it from scratch) or for another number of classes (fine-tuning on another dataset):
  # then it starts as initialized. The pretraining run's optimizer state, step and SogCLR's u
  # table (or an export's signatures) are left unmatched.
  head_names = ('supervised_head', 'supervised_head_bn')
  head = {id(v) for name, layer in model.named_layers().items() if name in head_names
          for v in layer.variables}
  try:
    left_out = restore_model(model, path, [v for v in model.variables if id(v) not in head],
                             replaceable=head_names)
  except ValueError as e:
    message = str(e).replace(f'checkpoint {path} ', '')
    raise ValueError(f'--checkpoint={path!r} {message}; repeat the pretraining run\'s model '
                     'flags (its flags.json lists them)') from None
  logging.info('Initialized the model from %s', path)
  for name in left_out:
    logging.info('%s: the checkpoint holds another shape (another number of classes, or another '
                 'input width: --ft_proj_selector reads another layer); it starts as initialized',
                 name)


# Where a pretraining checkpoint keeps SogCLR's u table (log domain, one float per image).
LOG_U_KEY = 'sogclr/log_u/.ATTRIBUTES/VARIABLE_VALUE'
# iSogCLR's per-image temperatures and the moving average of their gradients.
TAU_KEY = 'sogclr/tau/.ATTRIBUTES/VARIABLE_VALUE'
TAU_MOMENTUM_KEY = 'sogclr/tau_momentum/.ATTRIBUTES/VARIABLE_VALUE'

# Where a checkpoint of run.py keeps the step: the optimizer's iteration count (a
# LossScaleOptimizer's own counter stays 0; its inner optimizer's counts).
STEP_KEYS = ('optimizer/inner_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE',
             'optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE')


def checkpoint_step(path):
  """The training step of checkpoint `path`, read without restoring the optimizer.

  Falls back to the number of the file name, ckpt-<n>, for a checkpoint without an optimizer:
  run.py's CheckpointManager numbers checkpoints by their step.
  """
  names = dict(tf.train.list_variables(path))
  for key in STEP_KEYS:
    if key in names:
      return int(tf.train.load_variable(path, key))
  match = re.search(r'ckpt-(\d+)$', path)
  if match:
    return int(match.group(1))
  raise ValueError(f'checkpoint {path!r} holds no step (no optimizer, no ckpt-<step> name)')


def _variable_keys(model, path):
  """{id(variable): its key in checkpoint `path`} for the model's variables found there."""
  view = tf.train.CheckpointView(path)
  # A variable's key is its object path from the root, each name escaped as TensorFlow does.
  paths = {0: ()}
  queue = collections.deque([0])
  while queue:
    node = queue.popleft()
    for name, child in view.children(node).items():
      if child not in paths:
        paths[child] = paths[node] + (name.replace('.', '..').replace('/', '.S'),)
        queue.append(child)
  return {id(obj): '/'.join(paths[node]) + '/.ATTRIBUTES/VARIABLE_VALUE'
          for node, obj in view.match(tf.train.Checkpoint(model=model)).items() if node in paths}


def restore_model(model, path, required=None, replaceable=()):
  """Restores the variables of `model` from checkpoint `path`, ignoring the rest (optimizer,
  step, SogCLR's u table); returns the names of the layers it left as they were.

  Raises ValueError, before anything is assigned, naming the `required` variables (default: all
  of the model's) that the checkpoint lacks and any variable it holds with another shape. A layer
  named in `replaceable` (see ContrastiveModel.named_layers) that the checkpoint holds with other
  shapes is not an error: the whole layer keeps its values (a linear head for another number of
  classes).
  """
  keys = _variable_keys(model, path)
  shapes = dict(tf.train.list_variables(path))
  layer_of = {id(v): name for name, layer in model.named_layers().items()
              for v in layer.variables}
  problems, left_out = [], set()
  required = {id(v) for v in (model.variables if required is None else required)}
  for variable in model.variables:
    key = keys.get(id(variable))
    if key is None:
      if id(variable) in required:
        problems.append(f'{variable.path} {tuple(variable.shape)} missing')
    elif key in shapes and list(variable.shape) != list(shapes[key]):
      if layer_of.get(id(variable)) in replaceable:
        left_out.add(layer_of[id(variable)])
      else:
        problems.append(f'{variable.path} {tuple(variable.shape)} is {tuple(shapes[key])} there')
  if problems:
    more = f' and {len(problems) - 5} more' if len(problems) > 5 else ''
    raise ValueError(f'checkpoint {path} holds another architecture: '
                     f'{", ".join(problems[:5])}{more}')
  root = model
  if left_out:  # the same object paths as the model's own checkpoints, without those layers
    root = tf.train.Checkpoint(**{name: layer for name, layer in model.named_layers().items()
                                  if name not in left_out})
  # expect_partial: the optimizer, step and u table of the checkpoint are not the model's.
  tf.train.Checkpoint(model=root).restore(path).expect_partial()
  return sorted(left_out)


def iterate_checkpoints(model_dir, timeout_seconds, poll_seconds=1.0):
  """Yields every checkpoint of `model_dir` once, in step order, including those written while
  it iterates; stops after `timeout_seconds` without a new one. A checkpoint deleted (the
  training run keeps only its newest) before its turn is skipped with a warning."""
  seen = set()
  last_new = time.time()
  while True:
    fresh = sorted((p for p in list_checkpoints(model_dir) if _step_of(p) not in seen),
                   key=_step_of)
    for path in fresh:
      seen.add(_step_of(path))
      if tf.io.gfile.exists(path + '.index'):
        yield path
      else:
        logging.warning('%s was deleted before it could be evaluated; skipped.', path)
    if fresh:
      last_new = time.time()
    elif time.time() - last_new > timeout_seconds:
      return
    else:
      time.sleep(poll_seconds)


def state_fingerprint(model, objective=None):
  """Sums of the weights and of the objective's tables (float64; Objective.fingerprint): equal
  on every worker of a run."""
  weights = sum(float(np.sum(v.numpy(), dtype=np.float64)) for v in model.variables)
  tables = objective.fingerprint() if objective is not None else ''
  return f'weights sum {weights:.10e}' + (f', {tables}' if tables else '')


def _file_name_part(text):
  """`text` (an eval name or split such as 'test[:50%]') as a part of a file name."""
  return re.sub(r'[^A-Za-z0-9_.=-]', '_', text)


def _read_results(path):
  """The dict in result file `path`, {} when there is none; a file that is not json is moved to
  `path`.unreadable (kept, not overwritten)."""
  if not tf.io.gfile.exists(path):
    return {}
  with tf.io.gfile.GFile(path) as f:
    text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    aside = f'{path}.unreadable'
    logging.warning('%s is not valid json; moved to %s', path, aside)
    tf.io.gfile.rename(path, aside, overwrite=True)
    return {}


def write_results(model_dir, step, results):
  """Merges `results` into model_dir/result_<step>.json (result_<step>_<eval_name>.json when
  results['eval_name'] is set) and returns the merged dict.

  Keys already there and not recomputed (the probe's, after a --mode=eval run) are kept. An
  evaluation never overwrites one on another split: when the file records another
  `eval_split` (or evaluation results without a split), the results go to
  result_<step>[_<eval_name>]_<split>.json instead. The file is written under another name, then
  renamed: a crash never leaves a truncated json.
  """
  name = results.get('eval_name')
  split = results.get('eval_split')
  path = os.path.join(model_dir, f'result_{step}' + (
      f'_{_file_name_part(name)}' if name else '') + '.json')
  merged = _read_results(path)
  recorded_split = merged.get('eval_split')
  if recorded_split is None and any(k.startswith(('eval/', 'probe/')) for k in merged):
    recorded_split = '(not recorded)'
  if split is not None and recorded_split is not None and recorded_split != split:
    other = f'{path[:-len(".json")]}_{_file_name_part(split)}.json'
    logging.warning('%s holds the evaluation on split %s; this one, on split %s, goes to %s.',
                    path, recorded_split, split, other)
    path = other
    merged = _read_results(path)
  merged.update(results)
  temporary = os.path.join(model_dir, f'.{os.path.basename(path)}.tmp_{os.getpid()}')
  with tf.io.gfile.GFile(temporary, 'w') as f:
    f.write(json.dumps(merged, indent=2, sort_keys=True))
  tf.io.gfile.rename(temporary, path, overwrite=True)
  logging.info('Results of step %d written to %s.', step, path)
  return merged


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
  _write_atomically(path, text + json.dumps(entry, sort_keys=True) + '\n')


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
  _write_atomically(os.path.join(model_dir, HISTORY_FILE), ''.join(
      json.dumps(e, sort_keys=True) + '\n' for e in entries))
  return True


def read_text(path):
  """The text of file `path`, or None when there is none."""
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path, 'rb') as f:
    return f.read()


def put_back(path, data):
  """Writes `data` (bytes, as read_text read it) back to `path`, or removes `path` when None."""
  if data is None:
    if tf.io.gfile.exists(path):
      tf.io.gfile.remove(path)
    return
  temporary = f'{path}.tmp_{os.getpid()}'
  with tf.io.gfile.GFile(temporary, 'wb') as f:
    f.write(data)
  tf.io.gfile.rename(temporary, path, overwrite=True)


def export(model, step, write_dir, *, image_size, keep, model_dir, chief=True):
  """Exports the model to write_dir/saved_model/<step> unless keep == 0 (no export), with the
  run's flags.json from model_dir."""
  if keep:
    path = export_saved_model(
        model, os.path.join(write_dir, 'saved_model'), step, image_size=image_size, keep=keep,
        flags_file=os.path.join(model_dir, FLAGS_FILE), chief=chief)
    if path:
      logging.info('Exported the model at step %d to %s', step, path)


def export_saved_model(model, export_dir, step, *, image_size, keep, flags_file=None,
                       chief=True):
  """Writes `model` as a SavedModel to export_dir/<step>; keeps the newest `keep` exports.

  The export holds the model as attribute `model` (tf.train.Checkpoint(model=...) restores
  <export>/variables/variables) and a `serving_default` signature: float32 `images`
  [N, image_size, image_size, 3] in [0, 1], preprocessed as for evaluation -> float32
  'features', 'projection' (pretraining models) and 'supervised_logits' (with a linear head),
  in inference mode. `flags_file` is copied in as flags.json. Returns the path, or None on a
  non-chief worker: saving is collective, so those save into export_dir and delete it.
  """
  assert keep >= 1, keep
  module = tf.Module()
  module.model = model

  @tf.function(input_signature=[
      tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name='images')])
  def serve(images):
    return {k: tf.cast(v, tf.float32) for k, v in model(images, training=False).items()}

  # Written under another name, then renamed: export_dir/<step> is never a partial export.
  temporary = os.path.join(export_dir, f'.tmp_{step}_{os.getpid()}')
  tf.saved_model.save(module, temporary, signatures={'serving_default': serve})
  if not chief:
    tf.io.gfile.rmtree(temporary)
    return None
  if flags_file and tf.io.gfile.exists(flags_file):
    tf.io.gfile.copy(flags_file, os.path.join(temporary, FLAGS_FILE), overwrite=True)
  final = os.path.join(export_dir, str(step))
  if tf.io.gfile.exists(final):  # The same step again: a rerun, or training and an eval job.
    tf.io.gfile.rmtree(final)
  tf.io.gfile.rename(temporary, final)
  steps = sorted(int(name.rstrip('/')) for name in tf.io.gfile.listdir(export_dir)
                 if name.rstrip('/').isdigit())
  for old in steps[:-keep]:
    tf.io.gfile.rmtree(os.path.join(export_dir, str(old)))
  return final


LOCK_FILE = 'run.lock'


def _process_start_ticks(pid):
  """A local process' start time (clock ticks since boot), or None when it does not exist:
  with the pid it identifies the process even after the pid is reused."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return int(f.read().rsplit(')', 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


class RunLock:
  """model_dir/run.lock: at most one live training run per model_dir.

  The file names its holder (host, pid, start) and a heartbeat the holder refreshes every
  `heartbeat_seconds`. A lock is stale, and is taken over with a warning, when its holder is on
  this host and that process no longer exists (pid and start time, so a reused pid does not
  count), or, for a holder on another host, when its heartbeat is older than `stale_seconds`
  (a killed host stops refreshing it). Locally the file is created exclusively (O_EXCL); on
  gs:// creation is a write followed by a read-back, so two starts within a second of each
  other can both pass.
  """

  def __init__(self, model_dir, heartbeat_seconds=60.0, stale_seconds=600.0):
    self.path = os.path.join(model_dir, LOCK_FILE)
    self.heartbeat_seconds = heartbeat_seconds
    self.stale_seconds = stale_seconds
    self.record = None
    self._stop = threading.Event()
    self._thread = None

  def _read(self):
    try:
      with tf.io.gfile.GFile(self.path) as f:
        return json.loads(f.read())
    except tf.errors.NotFoundError:
      return None
    except (json.JSONDecodeError, tf.errors.OpError):
      return {}  # half-written or garbled: its writer's heartbeat decides below

  def _stale_reason(self, holder):
    if not holder:
      return 'the lock file is unreadable'
    if holder.get('host') == socket.gethostname():
      ticks = _process_start_ticks(holder.get('pid', -1))
      if ticks is None or ticks != holder.get('start_ticks', ticks):
        return f"process {holder.get('pid')} on this host no longer runs"
      return None
    age = time.time() - holder.get('heartbeat', 0)
    if age > self.stale_seconds:
      return f'its heartbeat is {age:.0f} s old'
    return None

  def _create(self, text):
    """Creates the lock file holding `text` unless it exists; True when this call created it."""
    if '://' in self.path:
      with tf.io.gfile.GFile(self.path, 'w') as f:
        f.write(text)
      time.sleep(1.0)
      return self._read() == json.loads(text)
    # Written whole under a name of its own, then linked into place: the lock file appears
    # with its content (a reader never sees it empty) and link() fails if it exists.
    temporary = f'{self.path}.new_{os.getpid()}_{threading.get_ident()}'
    try:
      with open(temporary, 'w') as f:
        f.write(text)
      os.link(temporary, self.path)
      return True
    except FileExistsError:
      return False
    finally:
      if os.path.exists(temporary):
        os.remove(temporary)

  def _take_over(self, holder):
    """Removes the stale lock file `holder` was read from, unless another process did so (or
    took the lock) first; True when it was removed here. Locally the removal happens under
    run.lock.takeover, created exclusively, so two processes that both saw the stale lock
    cannot remove each other's fresh one."""
    if '://' in self.path:
      try:
        tf.io.gfile.remove(self.path)
      except tf.errors.NotFoundError:
        pass
      return True
    mutex = f'{self.path}.takeover'
    try:
      descriptor = os.open(mutex, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      try:  # left by a process killed while taking over (it takes milliseconds)
        if time.time() - os.path.getmtime(mutex) > 30:
          os.remove(mutex)
      except OSError:
        pass
      return False
    try:
      os.close(descriptor)
      if self._read() != holder:  # taken over (or released) meanwhile: decide afresh
        return False
      os.remove(self.path)
      return True
    finally:
      os.remove(mutex)

  def acquire(self):
    """Takes the lock or raises ValueError naming the live run that holds it."""
    now = time.time()
    self.record = {'host': socket.gethostname(), 'pid': os.getpid(),
                   'start_ticks': _process_start_ticks(os.getpid()), 'since': now,
                   'since_utc': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(now)),
                   'heartbeat': now}
    for _ in range(200):  # each round is decided by another process' progress
      holder = self._read()
      if holder is None:
        if self._create(json.dumps(self.record)):
          break
        continue  # created by another start meanwhile: read who holds it
      reason = self._stale_reason(holder)
      if reason is None:
        self.record = None
        raise ValueError(self._held_message(holder))
      if self._take_over(holder):
        logging.warning('Taking over %s from a run that is gone (%s): %s', self.path, reason,
                        holder)
      else:
        time.sleep(0.01)
    else:
      self.record = None
      raise ValueError(f'could not take {self.path}: other starts kept changing it; retry')
    self._thread = threading.Thread(target=self._beat, daemon=True, name='run-lock-heartbeat')
    self._thread.start()
    return self

  def _held_message(self, holder):
    return (f"--model_dir={os.path.dirname(self.path)!r} is in use by another run (host "
            f"{holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since_utc')}; "
            f'lock file {self.path}); wait for it to end or use another --model_dir')

  def _beat(self):
    while not self._stop.wait(self.heartbeat_seconds):
      self.record['heartbeat'] = time.time()
      try:
        _write_atomically(self.path, json.dumps(self.record))
      except (tf.errors.OpError, OSError) as e:  # a full disk must not end the run
        logging.warning('Could not refresh %s: %s', self.path, e)

  def release(self):
    """Stops the heartbeat and removes the lock file if this process still holds it."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    holder = self._read() or {}
    if self.record is not None and all(holder.get(k) == self.record[k]
                                       for k in ('host', 'pid', 'since')):
      tf.io.gfile.remove(self.path)
    self.record = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
