"""Keeps glibc's malloc from handing the train step's memory back to the OS between steps.

TensorFlow frees a step's activations and gradients when it ends and allocates them again in
the next one. With glibc's defaults the freed top of each heap is handed back to the OS (brk,
madvise) and grown again in the next step, so every step page-faults much of its memory in
afresh: ~35,000 (ResNet-18 at 32x32, batch 64) to ~59,000 (ResNet-50 at 64x64, batch 32) minor
faults and ~0.2 s of kernel time per step on a 2-core CPU. Keeping freed memory mapped takes that
to ~1,000 faults per step; docs/performance.md gives the measured speed-up. The peak resident
size stays within a few percent of the default's.

Call `tune()` before TensorFlow allocates (run.py and the benchmarks do it before importing it);
set SOGCLR_MALLOC_TUNING=0 to keep the defaults. Other C libraries are left alone.
"""
import ctypes
import os
import platform

import interrupts

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap, not their own mmap (glibc's maximum: 32 MB on 64 bits).
MMAP_THRESHOLD = 32 << 20
# Never give a free heap top back (the next step needs it again).
TRIM_THRESHOLD = 2**31 - 1
# Grow (and, in thread arenas, keep) heaps in steps of this much.
TOP_PAD = 256 << 20

ENV_VAR = 'SOGCLR_MALLOC_TUNING'

_applied = None


def tune():
  """Sets glibc's malloc to keep freed memory; returns True when it did (once per process)."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if os.environ.get(ENV_VAR, '1').lower() in ('0', 'false', 'no', 'off'):
    return False
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  libc = ctypes.CDLL(None)  # the C library this process already runs on
  _applied = all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
      (_M_TOP_PAD, TOP_PAD)))
  return _applied


# -- Out of memory: one line before the kernel's OOM killer ends the run without one --------------

LIMIT_ENV_VAR = 'SOGCLR_MEMORY_LIMIT_MB'
_PAGE = os.sysconf('SC_PAGE_SIZE') if hasattr(os, 'sysconf') else 4096
_UNLIMITED = 1 << 60


def _read(path):
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return None


def _fields(text):
  """{'key': int} of 'key value' or 'Key: value kB' lines."""
  values = {}
  for line in (text or '').splitlines():
    parts = line.replace(':', ' ').split()
    if len(parts) >= 2 and parts[1].isdigit():
      values[parts[0]] = int(parts[1]) * (1024 if parts[2:3] == ['kB'] else 1)
  return values


def own_resident_bytes():
  statm = _read('/proc/self/statm')
  return int(statm.split()[1]) * _PAGE if statm else 0


def _cgroup_dirs():
  """This process's memory cgroup directories (v2 and v1) that exist, innermost first."""
  dirs = []
  for line in (_read('/proc/self/cgroup') or '').splitlines():
    _, controllers, path = line.split(':', 2)
    if controllers == '':
      roots = ['/sys/fs/cgroup', '/sys/fs/cgroup/unified']
    elif 'memory' in controllers.split(','):
      roots = ['/sys/fs/cgroup/memory']
    else:
      continue
    for root in roots:
      # Inside a container the path may be the host's; its mount is then the cgroup itself.
      for candidate in (root + path.rstrip('/'), root):
        if os.path.isdir(candidate) and candidate not in dirs:
          dirs.append(candidate)
          break
  return dirs


def _cgroup_left(directory):
  """(bytes left, limit) of a memory cgroup with a limit, else None. Page cache it could drop
  (inactive files) counts as left, as the kernel reclaims it before it kills."""
  limit = _read(f'{directory}/memory.max') or _read(f'{directory}/memory.limit_in_bytes')
  usage = _read(f'{directory}/memory.current') or _read(f'{directory}/memory.usage_in_bytes')
  if not limit or not usage or not limit.strip().isdigit():  # 'max': no limit
    return None
  limit, usage = int(limit), int(usage)
  if limit >= _UNLIMITED:
    return None
  stat = _fields(_read(f'{directory}/memory.stat'))
  reclaimable = stat.get('total_inactive_file', stat.get('inactive_file', 0))
  return limit - max(usage - reclaimable, 0), limit


def memory_cap():
  """SOGCLR_MEMORY_LIMIT_MB in bytes (a cap on this process's resident size), or None."""
  cap = os.environ.get(LIMIT_ENV_VAR, '').strip()
  if not cap:
    return None
  try:
    value = float(cap)
  except ValueError:
    value = float('nan')
  if not value > 0 or value == float('inf'):
    raise ValueError(f'{LIMIT_ENV_VAR}={cap!r} is not a positive number of megabytes')
  return int(value * (1 << 20))


def memory_left(cgroup_dirs=None):
  """(bytes left, of a limit of bytes): the tightest of the host's available memory, this
  process's memory cgroups and SOGCLR_MEMORY_LIMIT_MB (a cap on this process's resident size)."""
  meminfo = _fields(_read('/proc/meminfo'))
  candidates = []
  if 'MemAvailable' in meminfo:
    candidates.append((meminfo['MemAvailable'], meminfo['MemTotal']))
  for directory in _cgroup_dirs() if cgroup_dirs is None else cgroup_dirs:
    left = _cgroup_left(directory)
    if left is not None:
      candidates.append(left)
  cap = memory_cap()
  if cap is not None:
    candidates.append((cap - own_resident_bytes(), cap))
  return min(candidates) if candidates else (_UNLIMITED, _UNLIMITED)


class MemoryWatch:
  """A daemon thread that ends the process with one line when memory is nearly exhausted.

  The kernel's OOM killer ends a process with SIGKILL (exit 137) and no word; this ends it first,
  with `error: out of memory: ...` and exit 1, when less than `reserve` of the tightest limit is
  left (memory_left) and this process holds at least a quarter of that limit (another process's
  growth is not this run's fault). Checked every `interval` seconds; the process exits at once
  (no cleanup can run without memory): the run resumes from its newest checkpoint.
  """

  def __init__(self, advice, interval=0.05, reserve_fraction=0.03, min_reserve=256 << 20):
    self.advice = advice
    self.interval = interval
    self.reserve_fraction = reserve_fraction
    self.min_reserve = min_reserve
    self._stop = None
    memory_cap()  # a bad SOGCLR_MEMORY_LIMIT_MB is an error now, not in the thread
    self._cgroup_dirs = _cgroup_dirs()

  def exhausted(self):
    """The line to end with when memory is nearly exhausted, else None."""
    left, limit = memory_left(self._cgroup_dirs)
    resident = own_resident_bytes()
    if left >= max(self.min_reserve, self.reserve_fraction * limit) or resident < limit / 4:
      return None
    gib = 1 << 30
    return (f'error: out of memory: this run holds {resident / gib:.1f} GiB and '
            f'{max(left, 0) / gib:.1f} GiB are left of a limit of {limit / gib:.1f} GiB; '
            f'{self.advice}')

  def _watch(self):
    while not self._stop.wait(self.interval):
      try:
        line = self.exhausted()
      except (OSError, ValueError):  # /proc or a cgroup file unreadable: stop watching, quietly
        return
      if line is not None:
        interrupts.exit_at_once(line, 1)  # the run's lock is removed on the way

  def start(self):
    import threading  # noqa: PLC0415  (only the command line watches)
    self._stop = threading.Event()
    threading.Thread(target=self._watch, name='memory-watch', daemon=True).start()
    return self

  def stop(self):
    if self._stop is not None:
      self._stop.set()
