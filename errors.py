"""The one line a user reads when a run stops on an error: what went wrong, named."""
import re

import tensorflow as tf


def one_line_error(error):
  """The line that says what went wrong: for an error raised inside a TensorFlow graph (the
  input pipeline's checks, an I/O failure), its assertion or cause, not 'Graph execution
  error:'."""
  message = (error.message if isinstance(error, tf.errors.OpError) else str(error)).strip()
  if not message:
    return repr(error)
  assertion = re.search(r'assertion failed: (.*)', message)
  if assertion:  # data.py's checks: [what] [record] [key] [value]
    parts = re.findall(r'\[([^\[\]]*(?:\[[^\]]*\)[^\[\]]*)*)\]', assertion.group(1))
    if len(parts) >= 4:
      return f'{parts[0]} {parts[1]}: {parts[2]} {parts[3]}'
    return assertion.group(0)
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  if lines[0].startswith('Graph execution error'):
    # Below the header: where the node was defined (indented stack frames), then the cause,
    # whose first line may end in ':' and name what it is about on the next (a dead worker).
    causes = [line.strip() for line in message.splitlines()[1:]
              if line.strip() and not line[0].isspace() and
              not line.startswith(('Detected at', '<stack', '[['))]
    if causes:
      cause = causes[0]
      if cause.endswith(':') and len(causes) > 1:
        cause = f'{cause} {causes[1]}'
      lines = [re.sub(r'^Error in user-defined function.*?transformation with iterator: \S+: ',
                      '', cause)]
  if lines[0].endswith(':') and len(lines) > 1:  # what it is about is on the next line
    lines = [f'{lines[0]} {lines[1]}']
  # TF prefixes errors raised inside functions with the function's name.
  line = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', lines[0])
  if isinstance(error, tf.errors.OpError):
    line = f'{type(error).__name__}: {line}'
  return re.sub(r'\s*\[Op:[^\]]*\]( name:[^\s);]*)?', '', line)


def advice(error, line):
  """`line` with what to do next where the error says more than it names (a dead worker)."""
  if isinstance(error, tf.errors.UnavailableError) and (
      'task' in line or 'Collective ops is aborted' in line):
    line += ('; a worker of this job stopped: restart every worker with the same command '
             '(each resumes from the newest checkpoint)')
  return line
