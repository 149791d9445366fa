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
