"""errors.py: the one line a user reads."""
import pytest
import tensorflow as tf

import errors


def test_one_line_error_of_a_graph_error_is_its_cause_not_the_stack():
  # TF's layout of an error raised inside a tf.function: header, the node's definition (indented
  # frames), then the cause, here a dead peer's (UnavailableError in a two-worker run).
  message = ('Graph execution error:\n\nDetected at node CollectiveGatherV2 defined at (most '
             'recent call last):\n  File "/work/main/run.py", line 448, in <module>\n\n  File '
             '"/work/main/trainer.py", line 210, in _fewest_steps\n\nCollective ops is aborted '
             'by: Error reported from /job:worker/task:1: The following tasks are unhealthy '
             '(stopped sending heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have '
             'crashed. Check the task logs.\n\t [[{{node CollectiveGatherV2}}]] '
             '[Op:__inference__fewest_steps_123]')
  error = tf.errors.UnavailableError(None, None, message)
  assert errors.one_line_error(error) == (
      'UnavailableError: Collective ops is aborted by: Error reported from /job:worker/task:1: '
      'The following tasks are unhealthy (stopped sending heartbeats): '
      '/job:worker/replica:0/task:1')


def test_one_line_error_of_an_eager_error_keeps_the_line_its_first_line_announces():
  # As a chief saw it outside a tf.function when its peer stopped sending heartbeats.
  message = ('Collective ops is aborted by: Error reported from /job:worker/task:1: The '
             'following tasks are unhealthy (stopped sending heartbeats):\n'
             '/job:worker/replica:0/task:1\nThe tasks have crashed. Check the task logs.')
  error = tf.errors.UnavailableError(None, None, message)
  assert errors.one_line_error(error) == (
      'UnavailableError: Collective ops is aborted by: Error reported from /job:worker/task:1: '
      'The following tasks are unhealthy (stopped sending heartbeats): '
      '/job:worker/replica:0/task:1')


@pytest.mark.parametrize('message, expected', [
    # data.py's checks: [what] [record] [key] [value]
    ('assertion failed: [label outside [0, K)] [record 17 of shard-00001] [image/class/label] [12]',
     'label outside [0, K) record 17 of shard-00001: image/class/label 12'),
    ('{{function_node __inference_step_9}} No space left on device [Op:SaveV2]',
     'ResourceExhaustedError: No space left on device'),
])
def test_one_line_error_names_the_record_or_the_cause(message, expected):
  error = (tf.errors.InvalidArgumentError if 'assertion' in message else
           tf.errors.ResourceExhaustedError)(None, None, message)
  assert errors.one_line_error(error) == expected


def test_a_dead_worker_gets_the_restart_advice_and_other_errors_do_not():
  dead = tf.errors.UnavailableError(None, None, 'x')
  line = errors.advice(dead, 'UnavailableError: Collective ops is aborted by: recvmsg')
  assert line.endswith('restart every worker with the same command (each resumes from the '
                       'newest checkpoint)')
  assert errors.advice(ValueError('x'), '--gamma must be in (0, 1], got 2') == (
      '--gamma must be in (0, 1], got 2')
