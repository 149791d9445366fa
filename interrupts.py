"""How `python run.py` answers SIGTERM, SIGHUP and Ctrl-C, at every moment of the process.

Python runs a signal handler only when the main thread is back in the interpreter: while a
TensorFlow call runs (the first training call traces and runs for seconds to minutes; an
evaluation; the probe) the handler waits, and two Ctrl-C within that time reach it as one.
The C-level handler, though, writes each signal's number at once to a wakeup file descriptor;
`watch()` starts a thread that reads it and so sees every signal as it arrives:

* outside training (the imports, start-up, restoring, evaluation, the export, the probe),
  SIGTERM, SIGHUP (the terminal closed) and Ctrl-C end the process at once with one line
  (`preempted:`, exit code 143 or 129, or `interrupted:`, 130): nothing is being trained, the
  newest checkpoint stays, and the locks this process holds are removed on the way out
  (`on_exit_at_once`);
* while training (`set_training(True)`, from trainer.stop_on_signals), the Python handler
  asks the loop to save at the next step boundary and stop; a second Ctrl-C ends the process at
  once (`interrupted: stopped by a second Ctrl-C, at once`).

Only the command line starts the watch: a notebook or a test calling run.cli keeps Python's
own handling (KeyboardInterrupt).
"""
import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
NAMES = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'Ctrl-C', signal.SIGHUP: 'SIGHUP'}

_state = {'training': False, 'ctrl_c': 0}
_exiting = threading.Lock()
_on_exit = {}  # key -> a quick callable run before an at-once exit (removing a lock file)


def on_exit_at_once(key, callback):
  """Runs `callback()` before an at-once exit (until `forget(key)`): a quick step that needs no
  other thread, such as removing this process' lock file. Its errors are ignored."""
  _on_exit[key] = callback


def forget(key):
  _on_exit.pop(key, None)


def exit_with_error(line):
  """exit_at_once with `error: <line>` and exit code 1."""
  exit_at_once(f'error: {line}', 1)


@contextlib.contextmanager
def deadline(seconds, line, on_timeout=exit_with_error):
  """Ends the process at once with `error: <line>` (exit code 1; or calls `on_timeout(line)`)
  unless the block ends within `seconds` (0: never): a bound on a wait inside a call that no
  Python code can interrupt."""
  if not seconds:
    yield
    return
  timer = threading.Timer(seconds, on_timeout, (line,))
  timer.daemon = True
  timer.start()
  try:
    yield
  finally:
    timer.cancel()


def exit_at_once(line, code):
  """Writes `line` to stderr and ends the process with `code` without unwinding (threads hold
  TensorFlow's locks while a call traces or runs), after the `on_exit_at_once` callbacks. Of two
  callers (the watch thread and a handler), the first wins: the watch thread waits for the end,
  the main thread returns (see below) and the exit follows. One
  write, on a line of its own, and the last: a log line or a progress bar written meanwhile
  cannot split it or follow it."""
  if threading.current_thread() is threading.main_thread():
    # The main thread runs Python's signal handlers, nested in whatever it runs, this call
    # included: it never waits here (a second SIGTERM arriving during this call, as `timeout`
    # sends one to the process and one to its group, waited for this very call: a hang).
    if not _exiting.acquire(blocking=False):
      return  # an exit is under way, this call's own or the watch thread's
  else:
    _exiting.acquire()
  for callback in list(_on_exit.values()):
    try:
      callback()
    except Exception:  # noqa: BLE001  (the exit must happen whatever a callback meets)
      pass
  try:
    sys.stderr.flush()
    # The line is the last one: stderr is pointed at /dev/null first (another thread's log
    # line written meanwhile goes nowhere), the line goes to a copy of it.
    stderr = os.dup(sys.stderr.fileno())
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
    os.write(stderr, f'\n{line}\n'.encode())
  except (OSError, ValueError):  # a terminal gone (SIGHUP), a closed stderr
    pass
  os._exit(code)


def _outside_training(signum):
  if signum == signal.SIGINT:
    exit_at_once('interrupted: stopped by Ctrl-C outside the training loop, at once; nothing '
                 'was saved since the last checkpoint', 128 + signal.SIGINT)
    return
  exit_at_once(f'preempted: stopped by {NAMES[signum]} outside the training loop, at once; '
               'nothing was saved since the last checkpoint: rerun the same command to resume '
               '(a finished run is evaluated again)', 128 + signum)


def second_ctrl_c():
  exit_at_once('interrupted: stopped by a second Ctrl-C, at once; nothing was saved since the '
               'last checkpoint', 128 + signal.SIGINT)


def _handle(signum, frame):
  """The Python handler outside training (the watch thread usually acts first)."""
  del frame
  _outside_training(signum)


def _read(descriptor):
  while True:
    try:
      numbers = os.read(descriptor, 64)
    except InterruptedError:
      continue
    for signum in numbers:
      if signum not in SIGNALS:
        continue
      if not _state['training']:
        _outside_training(signum)
      elif signum == signal.SIGINT:
        _state['ctrl_c'] += 1
        if _state['ctrl_c'] >= 2:
          second_ctrl_c()


def watch():
  """From now on, SIGTERM, SIGHUP and Ctrl-C act as the module says. Call from the main thread,
  as early as possible (before the imports of TensorFlow)."""
  read_end, write_end = os.pipe()
  os.set_blocking(write_end, False)
  for signum in SIGNALS:
    signal.signal(signum, _handle)
  signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
  threading.Thread(target=_read, args=(read_end,), name='signal-watch', daemon=True).start()


def set_training(active):
  """Whether the training loop runs (trainer.stop_on_signals sets it): while it does, the watch
  leaves SIGTERM, SIGHUP and a first Ctrl-C to the Python handler (save, then stop) and ends the
  process at a second Ctrl-C."""
  _state['training'], _state['ctrl_c'] = bool(active), 0
