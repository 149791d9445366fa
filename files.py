"""Files of a run directory (local or gs://) written whole or not at all."""
import os

import tensorflow as tf


def write_atomically(path, text):
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


def read_bytes(path):
  """The bytes of file `path`, or None when there is none."""
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path, 'rb') as f:
    return f.read()


def put_back(path, data):
  """Writes `data` (bytes, as read_bytes read them) back to `path`, or removes `path` when None."""
  if data is None:
    if tf.io.gfile.exists(path):
      tf.io.gfile.remove(path)
    return
  temporary = f'{path}.tmp_{os.getpid()}'
  with tf.io.gfile.GFile(temporary, 'wb') as f:
    f.write(data)
  tf.io.gfile.rename(temporary, path, overwrite=True)
