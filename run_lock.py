"""model_dir/run.lock: at most one live training run per model_dir (RunLock); and one live
--mode=eval job per evaluation log directory (evaluation_lock)."""
import json
import os
import socket
import threading
import time

from absl import logging
import tensorflow as tf

import files
import interrupts

LOCK_FILE = 'run.lock'


def process_start_ticks(pid):
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

  def __init__(self, model_dir, heartbeat_seconds=60.0, stale_seconds=600.0, *,
               file_name=LOCK_FILE, held_by=None):
    self.path = os.path.join(model_dir, file_name)
    # holder description -> the error line when a live holder has it (default: another run's).
    self.held_by = held_by
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
      ticks = process_start_ticks(holder.get('pid', -1))
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
                   'start_ticks': process_start_ticks(os.getpid()), 'since': now,
                   'since_utc': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(now)),
                   'heartbeat': now}
    for _ in range(200):  # each round is decided by another process' progress
      holder = self._read()
      if holder is None:
        try:
          created = self._create(json.dumps(self.record))
        except (OSError, tf.errors.OpError) as e:  # a full disk, a read-only directory
          self.record = None
          reason = getattr(e, 'strerror', None) or getattr(e, 'message', None) or str(e)
          raise ValueError(f'cannot write the run lock {self.path} ({reason}); make room in '
                           'or give write access to --model_dir, then rerun') from None
        if created:
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
    # A signal outside training (or out of memory) ends the process at once: a local lock goes
    # too (plain file calls: the main thread may hold TensorFlow's locks; one on gs:// stays
    # until its heartbeat is stale).
    if '://' not in self.path:
      interrupts.on_exit_at_once(id(self), self._remove_local_file_if_held)
    return self

  def _held_message(self, holder):
    who = (f"host {holder.get('host')}, pid {holder.get('pid')}, since "
           f"{holder.get('since_utc')}; lock file {self.path}")
    if self.held_by is not None:
      return self.held_by(who)
    return (f'--model_dir={os.path.dirname(self.path)!r} is in use by another run ({who}); '
            'wait for it to end or use another --model_dir')

  def _beat(self):
    while not self._stop.wait(self.heartbeat_seconds):
      self.record['heartbeat'] = time.time()
      try:
        files.write_atomically(self.path, json.dumps(self.record))
      except (tf.errors.OpError, OSError) as e:  # a full disk must not end the run
        logging.warning('Could not refresh %s: %s', self.path, e)

  def release(self):
    """Stops the heartbeat and removes the lock file if this process still holds it."""
    interrupts.forget(id(self))
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    self._remove_if_held()
    self.record = None

  def _held_here(self, holder):
    return self.record is not None and all(holder.get(k) == self.record[k]
                                           for k in ('host', 'pid', 'since'))

  def _remove_if_held(self):
    if self._held_here(self._read() or {}):
      tf.io.gfile.remove(self.path)

  def _remove_local_file_if_held(self):
    """_remove_if_held without TensorFlow, for an exit at once."""
    self._stop.set()  # no heartbeat after this (an at-once exit does not wait for the thread)
    with open(self.path) as f:
      holder = json.loads(f.read())
    if self._held_here(holder):
      os.remove(self.path)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def evaluation_lock(model_dir, logdir):
  """The lock of a --mode=eval job writing its summaries to `logdir` (model_dir, or a
  subdirectory eval_<name>): model_dir/eval.lock or model_dir/eval_<name>.lock. Evaluation runs
  beside training by design, but two evaluations writing the same log directory would write
  every step's scalars twice and race on its result files."""
  name = 'eval' if os.path.normpath(logdir) == os.path.normpath(model_dir) else (
      os.path.basename(os.path.normpath(logdir)))

  def held_by(who):
    where = 'model_dir' if name == 'eval' else name
    return (f'--model_dir={model_dir!r}: its evaluation in {where} is being written by another '
            f'--mode=eval job ({who}); wait for it to end, or give another --eval_name to '
            'evaluate beside it')

  return RunLock(model_dir, file_name=f'{name}.lock', held_by=held_by)
