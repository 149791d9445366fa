"""Checkpoints and exports in a run's model_dir: resume, restore from another run's checkpoint or
export, SavedModel export, result_<step>.json (the run's flags: run_record; its lock: run_lock).

A checkpoint holds `model`, `optimizer` (whose iteration count is the step) and, for an
objective with per-image tables, those tables under `sogclr` (SogCLR's u table, `sogclr/log_u`;
iSogCLR adds `sogclr/tau` and `sogclr/tau_momentum`); checkpoints are numbered by their step
(`ckpt-<step>`).
"""
import collections
import json
import os
import re
import time

from absl import logging
import numpy as np
import tensorflow as tf

import files
import run_lock


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
    if checkpoint:
      logging.info('--checkpoint=%s not read: a resumed run goes on from its own weights (its '
                   'first start\'s --checkpoint is in flags_history.jsonl).', checkpoint)
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
  files.write_atomically(os.path.join(model_dir, STATE_FILE), text)
  logging.warning('Rewrote %s: latest checkpoint %s.', os.path.join(model_dir, STATE_FILE),
                  paths[-1])


def _move_checkpoints_aside(model_dir):
  aside = os.path.join(model_dir, time.strftime('discarded-%Y%m%d-%H%M%S', time.gmtime()))
  tf.io.gfile.makedirs(aside)
  for pattern in (STATE_FILE, 'ckpt-*'):
    for path in tf.io.gfile.glob(os.path.join(model_dir, pattern)):
      tf.io.gfile.rename(path, os.path.join(aside, os.path.basename(path)))
  return aside


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
    if pid.isdigit() and run_lock.process_start_ticks(int(pid)) is None and age > min_age_seconds:
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
    what = 'is a file, not a checkpoint' if tf.io.gfile.exists(path) else 'does not exist'
    raise ValueError(f'--checkpoint={path!r} {what} (expected a checkpoint prefix, the path '
                     'of its files without .index, a directory holding checkpoints or a '
                     'SavedModel export)')
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
  reasons = {'shape': 'the checkpoint holds another shape (another number of classes, or another '
                      'input width: --ft_proj_selector reads another layer)',
             'absent': 'not in the checkpoint (its run trained no linear head)'}
  for name, why in left_out.items():
    logging.info('%s: %s; it starts as initialized', name, reasons[why])


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
  step, SogCLR's u table); returns {layer name: why} of the `replaceable` layers it left as they
  were: 'shape' (held with another shape) or 'absent' (none of its variables there).

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
  absent = [name for name, layer in model.named_layers().items() if name in replaceable
            and layer.variables and not any(id(v) in keys for v in layer.variables)]
  return {name: 'shape' for name in sorted(left_out)} | {name: 'absent' for name in absent}


def iterate_checkpoints(model_dir, timeout_seconds, poll_seconds=1.0):
  """Yields every checkpoint of `model_dir` once, in step order, including those written while
  it iterates; stops after `timeout_seconds` without a new one. A checkpoint deleted (the
  training run keeps only its newest) before its turn is skipped with a warning."""
  seen = set()
  last_new = time.time()
  waiting = False
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
      last_new, waiting = time.time(), False
    elif time.time() - last_new > timeout_seconds:
      return
    else:
      if not waiting:
        logging.info('Waiting for a new checkpoint in %s (at most %.0f s more: '
                     '--eval_timeout_seconds).', model_dir,
                     timeout_seconds - (time.time() - last_new))
        waiting = True
      time.sleep(poll_seconds)


def state_fingerprint(model, objective=None):
  """Sums of the weights and of the objective's tables (float64; Objective.fingerprint): equal
  on every worker of a run."""
  weights = sum(float(np.sum(v.numpy(), dtype=np.float64)) for v in model.variables)
  tables = objective.fingerprint() if objective is not None else ''
  return f'weights sum {weights:.10e}' + (f', {tables}' if tables else '')


def file_name_part(text):
  """`text` (an eval name or split such as 'test[:50%]') as a part of a file name."""
  return re.sub(r'[^A-Za-z0-9_.=-]', '_', text)


def read_results(model_dir, step, eval_name=None):
  """The results recorded for `step` in model_dir (write_results' file of `eval_name`); {} when
  there are none or the file is not json (left as it is: any worker may read)."""
  text = files.read_bytes(_results_path(model_dir, step, eval_name))
  try:
    return json.loads(text) if text is not None else {}
  except (json.JSONDecodeError, UnicodeDecodeError):
    return {}


def _results_path(model_dir, step, eval_name):
  return os.path.join(model_dir, f'result_{step}' + (
      f'_{file_name_part(eval_name)}' if eval_name else '') + '.json')


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
  split = results.get('eval_split')
  path = _results_path(model_dir, step, results.get('eval_name'))
  merged = _read_results(path)
  recorded_split = merged.get('eval_split')
  if recorded_split is None and any(k.startswith(('eval/', 'probe/')) for k in merged):
    recorded_split = '(not recorded)'
  if split is not None and recorded_split is not None and recorded_split != split:
    other = f'{path[:-len(".json")]}_{file_name_part(split)}.json'
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


def export(model, step, write_dir, *, image_size, keep, flags_file, chief=True):
  """Exports the model to write_dir/saved_model/<step> unless keep == 0 (no export), with the
  run's flags.json (`flags_file`)."""
  if keep:
    path = export_saved_model(
        model, os.path.join(write_dir, 'saved_model'), step, image_size=image_size, keep=keep,
        flags_file=flags_file, chief=chief)
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

  @tf.function(autograph=False, input_signature=[
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
    tf.io.gfile.copy(flags_file, os.path.join(temporary, os.path.basename(flags_file)),
                     overwrite=True)
  final = os.path.join(export_dir, str(step))
  if tf.io.gfile.exists(final):  # The same step again: a rerun, or training and an eval job.
    tf.io.gfile.rmtree(final)
  tf.io.gfile.rename(temporary, final)
  steps = sorted(int(name.rstrip('/')) for name in tf.io.gfile.listdir(export_dir)
                 if name.rstrip('/').isdigit())
  for old in steps[:-keep]:
    tf.io.gfile.rmtree(os.path.join(export_dir, str(old)))
  return final


