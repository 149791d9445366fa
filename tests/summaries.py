"""Reading TensorBoard summaries back in tests: the one helper every test file uses."""
import glob
import os

import tensorflow as tf


def events(directory):
  """[(step, tag, summary value)] of the events files directly in `directory`, in file order."""
  found = []
  for event_file in sorted(glob.glob(os.path.join(directory, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(event_file):
      found += [(event.step, value.tag, value) for value in event.summary.value]
  return found


def tags(directory):
  """The set of tags written in `directory`."""
  return {tag for _, tag, _ in events(directory)}


def values(directory, tag):
  """{step: ndarray} of `tag` (a scalar's, a histogram's [left, right, count] rows)."""
  return {step: tf.make_ndarray(value.tensor) for step, t, value in events(directory)
          if t == tag}


def scalars(directory, tag):
  """([steps], [values]) of scalar `tag`, in the order written."""
  found = [(step, float(tf.make_ndarray(value.tensor))) for step, t, value in events(directory)
           if t == tag]
  return [step for step, _ in found], [value for _, value in found]


def steps(directory, tag):
  """The sorted steps at which `tag` was written (once per write)."""
  return sorted(step for step, t, _ in events(directory) if t == tag)
