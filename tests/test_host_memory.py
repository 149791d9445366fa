"""host_memory.tune: glibc keeps a 4 MB block in its heap (not a fresh mmap), and run.py tunes."""
import os
import platform
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc', reason='glibc only')

# Prints tune()'s result and whether a fresh 4 MB malloc got its own mmap (glibc marks such a
# chunk with bit 2 of the size word before the pointer).
PROBE = """
import ctypes, sys
sys.path.insert(0, {repo!r})
import host_memory
print(host_memory.tune())
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
pointer = libc.malloc(4 << 20)
size_word = ctypes.c_size_t.from_address(pointer - ctypes.sizeof(ctypes.c_size_t)).value
print(bool(size_word & 2))
"""


def probe(**env):
  output = subprocess.run(
      [sys.executable, '-c', PROBE.format(repo=REPO)], env={**os.environ, **env},
      capture_output=True, text=True, check=True).stdout.split()
  return output == ['True', 'False'], output


def test_tuned_malloc_keeps_a_4mb_block_in_the_heap():
  assert probe(SOGCLR_MALLOC_TUNING='1') == (True, ['True', 'False'])


def test_opting_out_keeps_glibc_defaults():
  assert probe(SOGCLR_MALLOC_TUNING='0') == (False, ['False', 'True'])


@pytest.mark.slow
def test_importing_run_tunes_malloc():
  code = ('import sys; sys.path.insert(0, {repo!r}); import run, host_memory; '
          'print(host_memory._applied)').format(repo=REPO)
  env = {k: v for k, v in os.environ.items() if k != 'SOGCLR_MALLOC_TUNING'}
  output = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                          check=True).stdout.split()
  assert output[-1] == 'True'


def test_memory_watch_speaks_only_when_this_process_holds_nearly_all_of_the_limit(monkeypatch):
  sys.path.insert(0, REPO)
  import host_memory  # noqa: PLC0415
  resident_mb = host_memory.own_resident_bytes() / 2**20
  watch = host_memory.MemoryWatch('lower --train_batch_size')
  monkeypatch.setenv(host_memory.LIMIT_ENV_VAR, str(resident_mb + 2000))
  assert watch.exhausted() is None
  # Within the reserve (256 MB) of the cap: the line, naming what to lower.
  monkeypatch.setenv(host_memory.LIMIT_ENV_VAR, str(resident_mb + 100))
  line = watch.exhausted()
  assert line.startswith('error: out of memory: this run holds ') and line.endswith(
      'GiB; lower --train_batch_size'), line
  # Little left of a limit this process holds under a quarter of: another process's doing.
  monkeypatch.setattr(host_memory, 'memory_left', lambda dirs=None: (100 << 20, 400 * (1 << 30)))
  assert watch.exhausted() is None


@pytest.mark.parametrize('cap', ['abc', '0', '-5', 'nan', 'inf'])
def test_a_memory_cap_that_is_no_size_is_refused_before_the_watch_starts(monkeypatch, cap):
  sys.path.insert(0, REPO)
  import host_memory  # noqa: PLC0415
  monkeypatch.setenv(host_memory.LIMIT_ENV_VAR, cap)
  with pytest.raises(ValueError, match=f"SOGCLR_MEMORY_LIMIT_MB='{cap}' is not a positive"):
    host_memory.MemoryWatch('advice')
