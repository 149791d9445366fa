"""run.py, the command line: flags, their checks, the config built from them and the process.

The in-process tests parse flags and build configs; the subprocess tests (marked slow) run
`python run.py` as a user does: exit codes, one-line errors, SIGTERM and SIGKILL.
"""
import ast
import dataclasses
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import types

from absl import flags
import numpy as np
import pytest
import tensorflow as tf

import checkpoints
from conftest import wait_for_a_checkpoint
import data as data_lib
import distribution
import evaluation
import experiment
import model as model_lib
import objective as objective_lib
import run
import run_lock
import run_record
import schema
import settings
import summaries
import trainer as trainer_lib


def parse(*args):
  """Parses these flags afresh (as run.py's command line would) and returns run.FLAGS."""
  run.FLAGS.unparse_flags()
  run.FLAGS(['run.py', *args])
  return run.FLAGS


def all_flag_values():
  """{name: value} of every defined flag (run.py's and absl's)."""
  return {name: run.FLAGS[name].value for name in run.FLAGS}


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tiny, run_main):
  """A 2-step tiny run: its model_dir (checkpoints, flags.json) and the flags it ran with."""
  model_dir = str(tmp_path_factory.mktemp('trained'))
  args = [*tiny, f'--model_dir={model_dir}', '--train_steps=2', '--keep_hub_module_max=1']
  run_main(*args)
  return types.SimpleNamespace(model_dir=model_dir, args=args)


# -- The config built from the flags ---------------------------------------------------------------

def test_default_flags_build_the_library_default_config():
  parse('--model_dir=/tmp/unused')
  values, given = run.flag_values()
  assert given == {'model_dir'}
  config = settings.build_config(values)
  default = experiment.Config(model_dir='/tmp/unused')
  # A notebook building Config() gets what the command line does without flags ...
  assert config.objective == objective_lib.ObjectiveConfig()
  assert config.optimizer == trainer_lib.OptimizerConfig()
  assert config.loop == trainer_lib.LoopConfig()
  assert config.eval == evaluation.EvalConfig()
  assert config.distribution == distribution.DistributionConfig()
  assert config.data == data_lib.DataConfig()
  for field in dataclasses.fields(experiment.Config):
    if field.name not in ('model', 'flags'):
      assert getattr(config, field.name) == getattr(default, field.name), field.name
  # ... except the number of classes: the flag's 0 reads it from the dataset (run() does).
  assert config.model == dataclasses.replace(model_lib.ModelConfig(), num_classes=0)
  assert dict(config.flags) == values


def _other_value(flag):
  """A valid value of `flag` other than its default."""
  if isinstance(flag, flags.EnumFlag) or getattr(flag.parser, 'enum_values', None):
    return next(v for v in flag.parser.enum_values if v != flag.default)
  if isinstance(flag, flags.BooleanFlag):
    return not flag.default
  if isinstance(flag.default, (int, float)):
    return flag.default + 1
  return 'other'


# Flags of the command line itself (how cli() reports errors), not of the experiment.
CLI_FLAGS = {'debug'}


def test_every_flag_reaches_the_config():
  """build_config passes every flag on: changing one changes the config beyond config.flags."""
  parse('--model_dir=/tmp/unused')
  values, _ = run.flag_values()
  default = settings.build_config(values)
  ignored = []
  for name in set(values) - CLI_FLAGS:
    changed = dict(values)
    # An alias set to its default loss (True = sogclr) would change nothing.
    changed[name] = False if name in ('DCL_mode', 'GCL_mode', 'BI_mode') else _other_value(
        run.FLAGS[name])
    config = settings.build_config(changed)
    if dataclasses.replace(config, flags=default.flags) == default:
      ignored.append(name)
  assert len(values) > 60
  assert not ignored, f'flags build_config ignores: {ignored}'


def test_config_flags_are_what_flags_json_records(trained):
  parse(*trained.args)
  config = run.config_from_flags()
  recorded = json.load(open(os.path.join(trained.model_dir, 'flags.json')))
  assert recorded.pop('resolved_loss') == 'sogclr'
  assert dict(config.flags) == recorded


def test_eval_mode_inherits_into_the_config_and_never_assigns_to_flags(trained):
  # Only the model_dir, and one architecture flag given: it wins over flags.json.
  parse('--mode=eval', f'--model_dir={trained.model_dir}', '--proj_out_dim=32')
  parsed = all_flag_values()
  values, given = run.flag_values()
  as_parsed = dict(values)
  inherited = run_record.inherit_flags(values, given, trained.model_dir,
                                         schema.inherited_by_eval(experiment.Config))
  assert values == as_parsed  # a new dict; the argument is left as it was
  assert inherited['resnet_depth'] == 10 and inherited['proj_out_dim'] == 32

  config = run.config_from_flags()
  # The trained run's architecture, data and length ...
  assert (config.model.resnet_depth, config.model.width_multiplier, config.model.num_proj_layers,
          config.model.cifar_stem) == (10, 0.125, 2, True)
  assert (config.data.dataset, config.data.image_size, config.data.eval_split) == (
      'digits', 16, 'test')
  assert config.loop.train_steps == 2 and config.loop.train_batch_size == 16
  assert config.flags['resnet_depth'] == 10 and config.flags['dataset'] == 'digits'
  # ... but the command line's proj_out_dim.
  assert config.model.proj_out_dim == 32 and config.flags['proj_out_dim'] == 32
  # FLAGS still holds what was parsed: the defaults, and the one flag given.
  assert all_flag_values() == parsed
  assert (run.FLAGS.resnet_depth, run.FLAGS.width_multiplier, run.FLAGS.image_size,
          run.FLAGS.dataset, run.FLAGS.train_steps) == (50, 1.0, 224, 'imagenet2012', 0)
  assert run.FLAGS.proj_out_dim == 32


def test_finetuning_inherits_only_the_architecture_and_never_assigns_to_flags(trained):
  parse('--train_mode=finetune', f'--checkpoint={trained.model_dir}', '--model_dir=/tmp/ft',
        '--width_multiplier=0.25')
  parsed = all_flag_values()
  config = run.config_from_flags()
  assert (config.model.resnet_depth, config.data.image_size, config.model.proj_out_dim) == (
      10, 16, 16)
  assert config.model.width_multiplier == 0.25  # given on the command line
  # The data and training length are the fine-tuning run's own.
  assert config.data.dataset == 'imagenet2012' and config.loop.train_steps == 0
  assert all_flag_values() == parsed
  assert run.FLAGS.resnet_depth == 50 and run.FLAGS.image_size == 224


def test_only_run_py_reads_flags(repo):
  paths = sorted(glob.glob(os.path.join(repo, '*.py')) +
                 glob.glob(os.path.join(repo, 'bench', '*.py')))
  assert len(paths) > 15
  readers = {}
  for path in paths:
    if os.path.basename(path) == 'run.py':
      continue
    lines = [n for n, line in enumerate(open(path), 1) if re.search(r'\bFLAGS\b', line)]
    if lines:
      readers[os.path.relpath(path, repo)] = lines
  assert not readers, f'FLAGS outside run.py: {readers}'

  # run.py itself never assigns a flag's value.
  assert not _flag_assignments(open(os.path.join(repo, 'run.py')).read())


def test_no_function_is_over_60_lines(repo):
  """Small functions: each reads on one screen (the project's, the benchmarks' and the tests')."""
  paths = [*glob.glob(os.path.join(repo, '*.py')), *glob.glob(os.path.join(repo, 'bench', '*.py')),
           *glob.glob(os.path.join(repo, 'tests', '*.py')),
           *glob.glob(os.path.join(repo, 'examples', '*.py'))]
  long = [f'{os.path.relpath(path, repo)}:{node.lineno} {node.name} '
          f'({node.end_lineno - node.lineno + 1} lines)'
          for path in paths for node in ast.walk(ast.parse(open(path).read()))
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.end_lineno - node.lineno + 1 > 60]
  assert not long, long


def _flag_assignments(source):
  """[(line, code)] of the statements of `source` that set a flag's value: FLAGS.x = ...,
  FLAGS['x'].value = ..., setattr(FLAGS, ...), FLAGS.set_default(...)."""
  found = []
  for node in ast.walk(ast.parse(source)):
    targets = (node.targets if isinstance(node, ast.Assign) else
               [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
    for target in targets:
      for part in ast.walk(target):
        if isinstance(part, ast.Attribute) and isinstance(part.ctx, ast.Store) and (
            part.attr == 'value' or ast.unparse(part.value).endswith('FLAGS')):
          found.append((node.lineno, ast.unparse(node)))
    if isinstance(node, ast.Call):
      function = ast.unparse(node.func)
      if (function == 'setattr' and 'FLAGS' in ast.unparse(node.args[0])) or (
          function.endswith('FLAGS.set_default')):
        found.append((node.lineno, ast.unparse(node)))
  return found


def test_the_flag_assignment_check_finds_assignments():
  source = ("FLAGS.resnet_depth = 18\nFLAGS['dataset'].value = 'digits'\n"
            "flags.FLAGS.image_size += 1\nsetattr(FLAGS, 'seed', 1)\n"
            "FLAGS.set_default('seed', 2)\nvalues['resnet_depth'] = 18\nx = FLAGS.seed\n")
  assert [line for line, _ in _flag_assignments(source)] == [1, 2, 3, 4, 5]


# -- The README ------------------------------------------------------------------------------------

def _bench_flags(repo):
  """{script: flags it defines}, read from the bench scripts' argparse calls."""
  found = {}
  for path in glob.glob(os.path.join(repo, 'bench', '*.py')):
    source = open(path).read()
    found['bench/' + os.path.basename(path)] = set(
        re.findall(r"add_argument\(\s*'--(\w+)'", source))
  return found


def test_every_flag_named_in_the_readme_and_docs_exists(repo):
  pages = [os.path.join(repo, 'README.md'), *glob.glob(os.path.join(repo, 'docs', '*.md'))]
  text = re.sub(r'\\\n', ' ', '\n'.join(open(page).read() for page in pages))
  bench = _bench_flags(repo)
  assert bench['bench/train_step.py'] >= {'models', 'precisions', 'xla'}
  # A command of a bench script names that script's flags.
  for line in text.splitlines():
    for script in re.findall(r'bench/\w+\.py', line):
      if script in bench and re.search(r'python ' + re.escape(script), line):
        named = set(re.findall(r'--([A-Za-z_]\w*)', line.split(script, 1)[1]))
        assert named <= bench[script], (script, sorted(named - bench[script]))
  # Every other flag is run.py's; a bench flag may be named in prose about the benchmarks.
  # Commands of other tools (imagenet.py, fashion_mnist.py, tfds, tensorboard) have their own.
  text = '\n'.join(
      line for line in text.splitlines()
      if not re.search(r'(imagenet\.py|fashion_mnist\.py|bench/\w+\.py|tfds build|tensorboard) ',
                       line))
  named = set(re.findall(r'--([A-Za-z_][A-Za-z0-9_]*)', text))
  defined = set(run.FLAGS) | set().union(*bench.values())
  missing = sorted(named - defined - {'help', 'helpfull'})
  assert not missing, f'README names flags neither run.py nor a bench script defines: {missing}'
  assert len(named) > 20


# -- Bad input: one-line errors, nothing written touched -------------------------------------------

def test_unknown_enum_value_names_the_flag():
  run.FLAGS.unparse_flags()
  with pytest.raises(flags.IllegalFlagValueError, match='optimizer'):
    run.FLAGS(['run.py', '--optimizer=sgd'])
  run.FLAGS.unparse_flags()


# Flag values rejected before anything is built or written.
INVALID_VALUES = [
    (['--eval_split=validation'], "--eval_split='validation' is not a split"),
    (['--train_split=unlabeled'], "--train_split='unlabeled' is not a split"),
    (['--train_batch_size=5000'], 'is larger than split'),
    (['--image_size=4'], '--image_size=4 is too small'),
    (['--gamma=0'], '--gamma must be in (0, 1]'),
    (['--gamma=1.5'], '--gamma must be in (0, 1]'),
    (['--temperature=0'], '--temperature must be > 0'),
    (['--DCL_mode=True', '--BI_mode=False'], 'Conflicting loss flags'),
    (['--DCL_mode=False', '--GCL_mode=True'], 'Conflicting loss flags'),
    (['--eval_every_epochs=-1'], '--eval_every_epochs must be >= 0'),
    (['--gamma_schedule=cosine'],
     '--gamma_decay_epochs must be > 0 with --gamma_schedule=cosine, got 0'),
    (['--gamma_decay_epochs=-1'], '--gamma_decay_epochs must be >= 0, got -1'),
    (['--loss=isogclr', '--temperature=0.01'],
     '--temperature=0.01 (the initial temperature of iSogCLR) must be within '
     '[--isogclr_tau_min, --isogclr_tau_max] = [0.05, 0.7]'),
    (['--isogclr_rho=-1'], '--isogclr_rho must be >= 0, got -1.0'),
    (['--isogclr_eta=0'], '--isogclr_eta must be > 0, got 0.0'),
    (['--isogclr_beta=1.5'], '--isogclr_beta must be in (0, 1], got 1.5'),
    (['--isogclr_tau_min=0'], '--isogclr_tau_min must be > 0, got 0.0'),
    (['--isogclr_tau_max=0.01'], '--isogclr_tau_max=0.01 is below --isogclr_tau_min=0.05'),
]

# Bad input found at start-up, each in process (run.cli, as the command line calls it); the
# flag values above too.
BAD_INPUT = [
    (['--dataset=no_such_dataset'], "--dataset='no_such_dataset' is neither a TFDS dataset"),
    (['--dataset=mnist', '--data_dir=/nonexistent/tfds'], 'is not prepared under'),
    *INVALID_VALUES,
    (['--train_mode=finetune', '--checkpoint=/nonexistent/ckpt-1'], 'does not exist'),
    (['--train_mode=finetune', '--width_multiplier=0.25', '--checkpoint=TRAINED'],
     'holds another architecture'),
    # Resuming with another run-defining flag is refused before the checkpoint is read ...
    (['--model_dir=TRAINED', '--optimizer=lars'],
     "holds a run with other flags (--optimizer='lars' (was 'adam')"),
    # ... and a checkpoint the allowed (or a non-defining) change cannot restore is one of
    # another configuration: not unreadable, and no reason to --start_over.
    (['--model_dir=TRAINED', '--optimizer=lars', '--allow_flag_changes=optimizer'],
     'holds a checkpoint of another configuration'),
    # Bad data found by the first batch of a resumed run: flags.json, its history and the
    # events files stay as they were.
    pytest.param(['--model_dir=TRAINED', '--label_offset=3'], 'label outside [3, 13)',
                 marks=pytest.mark.slow),  # 11 s: it traces the resumed run's first call
]


def _bad_input_command(tiny, trained_dir, args):
  """The tiny run's flags with `args`, aimed at the trained run's directory (a fine-tuning run
  reads it as --checkpoint and writes next to it)."""
  args = [a.replace('TRAINED', trained_dir) for a in args]
  target = trained_dir if '--train_mode=finetune' not in args else trained_dir + '_ft'
  return [*tiny, f'--model_dir={target}', '--train_steps=4', *args]


def _error_lines(err):
  return [line for line in err.splitlines() if line.startswith('error:')]


@pytest.mark.parametrize('args, message', BAD_INPUT)
def test_bad_input_is_a_one_line_error_and_keeps_what_was_written(run_cli, snapshot, tiny,
                                                                  trained, args, message):
  before = snapshot(trained.model_dir)
  code, err = run_cli(*_bad_input_command(tiny, trained.model_dir, args))
  assert code == 1
  lines = _error_lines(err)
  assert len(lines) == 1 and message in lines[0], err[-2000:]
  # Bad input aimed at an existing run directory must not touch it.
  assert snapshot(trained.model_dir) == before


@pytest.mark.slow
def test_bad_input_through_the_process_exits_1_with_one_line_and_keeps_the_run(
    run_command, snapshot, tiny, trained):
  # The process end to end (and a precision the pytest process must not switch to): a
  # checkpoint another precision cannot restore.
  before = snapshot(trained.model_dir)
  process = run_command(*_bad_input_command(tiny, trained.model_dir, [
      f'--model_dir={trained.model_dir}', '--mixed_precision=float16']))
  assert process.returncode == 1, process.stderr[-2000:]
  lines = _error_lines(process.stderr)
  assert len(lines) == 1 and 'holds a checkpoint of another configuration' in lines[0], (
      process.stderr[-2000:])
  assert snapshot(trained.model_dir) == before


@pytest.mark.slow
def test_help_prints_the_flags_on_stdout_and_exits_0(run_command):
  # absl ends --help with status 1, which reads as a failure to a script or a scheduler.
  result = run_command('--help', timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert '--train_mode' in result.stdout and 'Try --helpfull' in result.stdout
  assert '--log_dir' not in result.stdout  # absl's own flags: only under --helpfull


@pytest.mark.parametrize('args, asked', [
    (['--helpfull'], 'full'), (['-?'], 'short'), (['--seed=1', '--helpshort'], 'short'),
    (['--seed=1'], None), (['--seed=1', '--', '--help'], None), (['--nohelp'], None)])
def test_help_asked_reads_absl_s_help_forms_up_to_a_double_dash(args, asked):
  assert run.help_asked(['run.py', *args]) == asked


def test_full_help_lists_absl_s_flags_too_and_exits_0(capsys):
  with pytest.raises(SystemExit) as stop:
    run.help_or_run(['run.py', '--helpfull'])
  assert stop.value.code == 0
  out = capsys.readouterr().out
  assert '--train_mode' in out and '--log_dir' in out


@pytest.mark.slow
def test_the_command_line_starts_without_keras_optional_imports_which_still_load_later(
    run_command, tmp_path):
  # Keras imported scikit-learn (with scipy.stats), matplotlib and IPython while TensorFlow was
  # imported: 3.4 of 12 s of every start on a slow 2-core host, for nothing a run uses. The
  # demo data, prepared here in a new data_dir, imports scikit-learn after TensorFlow.
  result = run_command('--dataset=digits', f'--data_dir={tmp_path / "tfds"}',
                       f'--model_dir={tmp_path / "run"}', '--eval_split=nosuch',
                       env={'PYTHONPROFILEIMPORTTIME': '1'})
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      "error: --eval_split='nosuch' is not a split of dataset 'digits'")
  # Python's lines: 'import time: <self us> | <cumulative us> | <indented module name>'.
  imports = [(line.split('|')[2].strip(), int(line.split('|')[1]))
             for line in result.stderr.splitlines()
             if line.startswith('import time:') and 'cumulative' not in line]
  names = [name for name, _ in imports]
  tensorflow = names.index('tensorflow')
  # Before it, at most refused attempts (a few microseconds, nothing loaded).
  assert not [(name, us) for name, us in imports[:tensorflow]
              if name in ('sklearn', 'matplotlib', 'IPython') and us > 1000]
  assert ('sklearn', True) in [(name, us > 100_000) for name, us in imports[tensorflow:]]
  assert not os.path.exists(tmp_path / 'run')
  # TensorFlow's own log lines, once, in absl's format (its handler printed each a second time).
  assert 'INFO:tensorflow:' not in result.stderr
  assert re.search(r'^I\d{4} .* mirrored_strategy\.py:\d+\] Using MirroredStrategy', result.stderr,
                   re.M)


@pytest.mark.slow
def test_unwritable_model_dir_is_an_error(run_in_process, tmp_path, tiny):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  process = run_in_process(*tiny, f'--model_dir={blocker}/run', '--train_steps=1')
  assert process.returncode == 1
  lines = _error_lines(process.stderr)
  assert len(lines) == 1 and 'is not writable' in lines[0], process.stderr[-2000:]
  assert blocker.read_text() == 'not a directory'


# -- Preemption and kills --------------------------------------------------------------------------

def _start(repo, *args):
  """`python run.py` started in the background, as run_command runs it, reading its stderr."""
  return subprocess.Popen([sys.executable, os.path.join(repo, 'run.py'), *args],
                          stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                          cwd=repo, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))


def _stopped_by_sigterm(repo, *args, signal_number=signal.SIGTERM):
  """(process, stderr) of `python run.py *args` sent SIGTERM (or `signal_number`) once training
  is under way."""
  process = _start(repo, *args)
  try:
    _wait_for_progress(process)
    process.send_signal(signal_number)
    _, err = process.communicate(timeout=120)
  finally:
    process.kill()
  return process, err


def _wait_for_progress(process, timeout=120):
  """Reads the process' stderr until a progress line appears (training is under way)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    line = process.stderr.readline()
    if not line and process.poll() is not None:
      raise AssertionError(f'process ended early with code {process.returncode}')
    # trainer.ProgressLogger's line.
    if re.search(r'trainer\.py:\d+\] step \d+/\d+', line):
      return line
  raise AssertionError('no progress line in time')


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_then_resumes(repo, tmp_path, tiny, run_in_process):
  model_dir = str(tmp_path / 'run')
  common = [*tiny, f'--model_dir={model_dir}', '--DCL_mode=True', '--checkpoint_steps=100000']
  process, err = _stopped_by_sigterm(repo, *common, '--train_steps=100000')
  assert process.returncode == run.PREEMPTED_EXIT_CODE, err[-2000:]
  assert 'preempted: Stopped at step' in err and 'by SIGTERM; checkpoint saved' in err
  latest = tf.train.latest_checkpoint(model_dir)
  step = int(latest.rsplit('-', 1)[1])
  assert 0 < step < 100000
  resumed = run_in_process(*common, f'--train_steps={step + 2}')
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert tf.train.latest_checkpoint(model_dir).endswith(f'ckpt-{step + 2}')
  assert re.search(rf'Resumed from \S+ckpt-{step} at step {step}', resumed.stderr)
  # Its train_seconds are the resumed start's, and its results say from which step.
  assert checkpoints.read_results(model_dir, step + 2)['trained_from_step'] == step
  assert 'trained in ' in resumed.stdout
  assert f'(from step {step}, where it resumed)' in resumed.stdout


@pytest.mark.slow
def test_sighup_in_training_saves_a_checkpoint_and_exits_129(repo, tmp_path, tiny):
  # The terminal or ssh session closed: saved like a preemption, exit code 128 + SIGHUP.
  model_dir = str(tmp_path / 'run')
  process, err = _stopped_by_sigterm(repo, *tiny, f'--model_dir={model_dir}',
                                     '--train_steps=100000', '--checkpoint_steps=100000',
                                     signal_number=signal.SIGHUP)
  assert process.returncode == 128 + signal.SIGHUP, err[-2000:]
  step = int(tf.train.latest_checkpoint(model_dir).rsplit('-', 1)[1])
  assert re.search(rf'^preempted: Stopped at step {step}/100000 by SIGHUP; checkpoint saved',
                   err, re.M), err[-2000:]


@pytest.mark.slow
def test_sigkilled_deterministic_run_ends_equal_to_an_uninterrupted_one(repo, tmp_path, tiny,
                                                                        run_main, run_in_process):
  # iSogCLR: every per-image table (u, each image's temperature and its momentum) comes back
  # from the checkpoint, as the weights and the optimizer do; 100 steps of 16 are 1.1 epochs of
  # the 1,437 digits, so revisits read the tables restored.
  common = [*tiny, '--loss=isogclr', '--isogclr_eta=0.5', '--deterministic', '--train_steps=100',
            '--checkpoint_steps=10']
  straight = str(tmp_path / 'straight')
  run_main(*common, f'--model_dir={straight}')
  killed = str(tmp_path / 'killed')
  rng = random.Random(0)
  kills = 0
  while kills < 1:
    process = _start(repo, *common, f'--model_dir={killed}')
    try:
      _wait_for_progress(process)
      # A random point of the run after its first checkpoint (before it, the restart would
      # start over, as a run with nothing saved does).
      wait_for_a_checkpoint(killed, process, timeout=120)
      time.sleep(rng.uniform(0.0, 1.5))
      if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        kills += 1
      process.wait(timeout=60)
    finally:
      process.kill()
  # The kill is the process' own; the restart that resumes from it runs in this one.
  finished = run_in_process(*common, f'--model_dir={killed}')
  assert finished.returncode == 0, finished.stderr[-2000:]
  assert re.search(r'Resumed from \S+ckpt-\d+ at step \d+: .*tau sum', finished.stderr)
  final, expected = (tf.train.latest_checkpoint(d) for d in (killed, straight))
  assert final.endswith('ckpt-100') and expected.endswith('ckpt-100')
  names = [n for n, _ in tf.train.list_variables(expected)
           if n not in ('_CHECKPOINTABLE_OBJECT_GRAPH', 'save_counter/.ATTRIBUTES/VARIABLE_VALUE')]
  tables = (checkpoints.LOG_U_KEY, checkpoints.TAU_KEY, checkpoints.TAU_MOMENTUM_KEY)
  assert set(tables) <= set(names) and len(names) > 100
  tau = tf.train.load_variable(expected, checkpoints.TAU_KEY)
  assert np.sum(tau != np.float32(0.1)) > 1000  # the visited images' temperatures moved
  for name in names:
    np.testing.assert_allclose(tf.train.load_variable(final, name),
                               tf.train.load_variable(expected, name), rtol=1e-5, atol=1e-6,
                               err_msg=name)


# -- Reliability through the command line (each a real `python run.py`, as a user meets it) ----


@pytest.fixture(scope='module')
def ten_and_twenty(tmp_path_factory, tiny, run_main):
  """A pretraining model_dir holding ckpt-10 and ckpt-20 (and flags.json, results)."""
  model_dir = str(tmp_path_factory.mktemp('ten_and_twenty'))
  run_main(*tiny, f'--model_dir={model_dir}', '--train_steps=20', '--checkpoint_steps=10',
           '--deterministic')
  return model_dir


def _copy(source, tmp_path):
  target = str(tmp_path / 'run')
  shutil.copytree(source, target)
  return target


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_resumes_from_the_newest_readable_one(
    ten_and_twenty, tiny, tmp_path, run_in_process):
  # One damage through the command line; test_checkpoints.py holds every kind of damage.
  model_dir = _copy(ten_and_twenty, tmp_path)
  content = bytearray(open(f'{model_dir}/ckpt-20.data-00000-of-00001', 'rb').read())
  content[len(content) // 2] ^= 0xFF
  open(f'{model_dir}/ckpt-20.data-00000-of-00001', 'wb').write(bytes(content))
  expected = 'ckpt-10'
  ten = open(f'{model_dir}/ckpt-10.data-00000-of-00001', 'rb').read()
  result = run_in_process(*tiny, f'--model_dir={model_dir}', '--train_steps=30',
                          '--checkpoint_steps=10', '--deterministic')
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(rf'Resumed from \S+/{expected} at step {expected[5:]}', result.stderr)
  assert 'from step 0 ' not in result.stderr
  assert tf.train.latest_checkpoint(model_dir).endswith('ckpt-30')
  # The older good checkpoint was never rewritten.
  assert open(f'{model_dir}/ckpt-10.data-00000-of-00001', 'rb').read() == ten
  # The augmented views are the run's first batch, written at its start, not at each restart.
  assert summaries.steps(model_dir, 'train/augmented_views') == [0]


@pytest.mark.slow
def test_unreadable_checkpoints_are_an_error_unless_start_over_moves_them_aside(
    ten_and_twenty, tiny, tmp_path, run_in_process, snapshot):
  model_dir = _copy(ten_and_twenty, tmp_path)
  for step in (10, 20):
    os.truncate(f'{model_dir}/ckpt-{step}.data-00000-of-00001', 100)
  before = snapshot(model_dir)
  args = (*tiny, f'--model_dir={model_dir}', '--train_steps=30')
  result = run_in_process(*args)
  assert result.returncode == 1
  assert re.search(r'^error: --model_dir=.* holds checkpoints but none can be read: ckpt-20 '
                   r'\(.*\); ckpt-10 \(.*\); .* --start_over', result.stderr, re.M)
  assert snapshot(model_dir) == before
  result = run_in_process(*args, '--start_over')
  assert result.returncode == 0, result.stderr[-3000:]
  aside, = glob.glob(f'{model_dir}/discarded-*')
  assert sorted(os.listdir(aside))[:2] == ['checkpoint', 'ckpt-10.data-00000-of-00001']
  assert tf.train.latest_checkpoint(model_dir).endswith('ckpt-30')


@pytest.mark.slow
def test_a_second_run_on_a_live_model_dir_exits_at_once_naming_the_holder(
    ten_and_twenty, tiny, tmp_path, run_command, snapshot):
  model_dir = _copy(ten_and_twenty, tmp_path)
  # A live holder: this test's own process, on this host.
  holder = run_lock.RunLock(model_dir).acquire()
  try:
    before = snapshot(model_dir)
    result = run_command(*tiny, f'--model_dir={model_dir}', '--train_steps=30', '--seed=3')
    assert result.returncode == 1
    assert re.search(rf'^error: --model_dir=.* is in use by another run \(host \S+, pid '
                     rf'{os.getpid()}, since .*\)', result.stderr, re.M)
    assert snapshot(model_dir) == before
  finally:
    holder.release()


def test_a_second_evaluation_into_the_same_log_directory_is_refused(run_cli, snapshot, tiny,
                                                                      trained):
  # Two --mode=eval jobs writing one log directory would write each step's scalars twice.
  holder = run_lock.evaluation_lock(trained.model_dir, trained.model_dir).acquire()
  try:
    before = snapshot(trained.model_dir)
    code, err = run_cli(*tiny, f'--model_dir={trained.model_dir}', '--mode=eval')
    assert code == 1
    assert re.search(rf'^error: --model_dir=.*: its evaluation in model_dir is being written by '
                     rf'another --mode=eval job \(host \S+, pid {os.getpid()}, since .*\); wait '
                     'for it to end, or give another --eval_name', err, re.M), err[-2000:]
    assert snapshot(trained.model_dir) == before
  finally:
    holder.release()


@pytest.mark.slow
def test_resuming_with_run_defining_flags_changed_is_an_error_unless_allowed(
    ten_and_twenty, tiny, tmp_path, run_in_process, snapshot):
  model_dir = _copy(ten_and_twenty, tmp_path)
  before = snapshot(model_dir)
  common = (*tiny, f'--model_dir={model_dir}')
  for extra, message in [
      (['--train_steps=30', '--seed=3', '--temperature=0.2'],
       r"--temperature=0.2 \(was 0.1\), --seed=3 \(was 0\); recorded in .*flags\.json.*"
       r'--allow_flag_changes=temperature,seed'),
      (['--train_steps=30', '--loss=simclr'], r"--loss='simclr' \(was 'sogclr'\)"),
      (['--train_steps=30', '--loss=isogclr'], r"--loss='isogclr' \(was 'sogclr'\)"),
      (['--train_steps=30', '--gamma_schedule=cosine', '--gamma_decay_epochs=2'],
       r"--gamma_schedule='cosine' \(was 'constant'\), --gamma_decay_epochs=2 \(was 0\)"),
      (['--train_steps=10'], r'give 10 steps, fewer than the 20 this run'),
  ]:
    result = run_in_process(*common, *extra)
    assert result.returncode == 1, extra
    assert re.search(rf'^error: .*{message}', result.stderr, re.M), result.stderr[-2000:]
    assert snapshot(model_dir) == before
  result = run_in_process(*common, '--train_steps=30', '--seed=3', '--allow_flag_changes=seed')
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resuming with --seed=3 (was 0" in result.stderr
  starts = [json.loads(line) for line in open(f'{model_dir}/flags_history.jsonl')]
  assert [(s['from_step'], s['flags']['seed']) for s in starts] == [(0, 0), (20, 3)]


def _start_endless_run(repo, tiny, model_dir):
  """`python run.py` of a tiny run too long to finish, its stderr piped (for signal tests)."""
  return subprocess.Popen(
      [sys.executable, os.path.join(repo, 'run.py'), *tiny, f'--model_dir={model_dir}',
       '--train_steps=100000', '--checkpoint_steps=100000'],
      stderr=subprocess.PIPE, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tiny, tmp_path, repo):
  model_dir = str(tmp_path / 'run')
  process = _start_endless_run(repo, tiny, model_dir)
  deadline = time.time() + 180
  while time.time() < deadline and not re.search(r'\] step \d+/', process.stderr.readline()):
    pass
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 130, stderr[-3000:]
  # A Ctrl-C is an interruption, not a preemption (issue 24: it said 'preempted:').
  assert re.search(r'^interrupted: Stopped at step \d+/100000 by Ctrl-C; checkpoint saved',
                   stderr, re.M)
  assert 'KeyboardInterrupt' not in stderr
  assert tf.train.latest_checkpoint(model_dir) is not None


@pytest.mark.slow
def test_a_second_ctrl_c_while_the_first_call_traces_stops_at_once(tiny, tmp_path, repo):
  # Finding (issue 24): a second Ctrl-C during the first (tracing) call printed a
  # KeyboardInterrupt traceback from mirrored_run.py (3 in 7 tries) or blocked on a lock for
  # 6.5 minutes (1 in 7).
  model_dir = str(tmp_path / 'run')
  process = _start_endless_run(repo, tiny, model_dir)
  try:
    deadline = time.time() + 180
    while time.time() < deadline and 'Training pretrain from step' not in (
        process.stderr.readline()):
      pass
    process.send_signal(signal.SIGINT)
    time.sleep(1.0)  # the first call is tracing
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
  finally:
    process.kill()
  assert process.returncode == 130, stderr[-3000:]
  assert re.search(r'^interrupted: stopped by a second Ctrl-C, at once', stderr, re.M)
  assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr
  assert not os.path.exists(os.path.join(model_dir, run_lock.LOCK_FILE))  # removed on the way


@pytest.mark.slow
def test_sigterm_outside_training_ends_the_process_at_once_with_one_line(tiny, tmp_path, repo):
  # Finding (issue 24, rerun): SIGTERM during the end-of-run evaluation and probe ended the
  # process (143) with no line. Here an evaluation job waiting for a checkpoint.
  model_dir = tmp_path / 'run'
  model_dir.mkdir()
  process = _start(repo, *tiny, f'--model_dir={model_dir}', '--mode=eval',
                   '--eval_timeout_seconds=300')
  try:
    deadline = time.time() + 180
    while time.time() < deadline and 'Waiting for a new checkpoint' not in (
        process.stderr.readline()):
      assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
  finally:
    process.kill()
  assert process.returncode == 143
  assert stderr.strip().splitlines()[-1].startswith(
      'preempted: stopped by SIGTERM outside the training loop, at once')
  assert os.listdir(model_dir) == []


# A 'release-input' thread still deleting an iterator (its deletion waits for tf.data's
# autotuning thread), then the end of the process with app.run's SystemExit(code).
ENDING = """
import sys, threading
sys.argv = ['run.py']
import run
threading.Thread(target=threading.Event().wait, args=({wait},), name='release-input').start()
try:
  run.end_process(SystemExit({code}))
finally:
  print('unwound', flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize('code', [143, 0])
def test_a_stopped_run_does_not_wait_for_its_input_to_be_released(repo, code):
  # Finding (session): 47 s between the `preempted:` line and the end of a Fashion-MNIST run
  # stopped by SIGTERM after a minute of training, the interpreter waiting for the training
  # iterator's deletion. A stop ends at once; a finished run (0) ends as Python does, after the
  # thread (here a wait of 1 s; a stop's thread would wait 600).
  ended = subprocess.run([sys.executable, '-c', ENDING.format(wait=600 if code else 1,
                                                                code=code)],
                         cwd=repo, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert ended.returncode == code, ended.stderr
  assert ('unwound' in ended.stdout) == (code == 0)


@pytest.mark.slow
def test_eval_of_a_missing_model_dir_is_an_error_and_creates_nothing(tiny, tmp_path,
                                                                     run_in_process):
  missing = str(tmp_path / 'mistyped')
  result = run_in_process(*tiny, '--mode=eval', f'--model_dir={missing}')
  assert result.returncode == 1
  assert re.search(r"^error: --model_dir='.*mistyped' does not exist", result.stderr, re.M)
  assert not os.path.exists(missing)


def test_eval_of_a_model_dir_without_flags_json_names_it_not_the_default_dataset(run_cli,
                                                                                 tmp_path):
  # Issue 24: --mode=eval with only a missing or not-yet-written --model_dir said 'imagenet2012
  # is not prepared'.
  code, err = run_cli('--mode=eval', f'--model_dir={tmp_path / "missing"}')
  assert code == 1 and re.search(r"^error: --model_dir='.*missing' does not exist", err, re.M)
  code, err = run_cli('--mode=eval', f'--model_dir={tmp_path}')
  assert code == 1 and re.search(r"^error: --model_dir='.*' holds no flags\.json \(its training "
                                 r'run has not started yet', err, re.M), err[-2000:]
  assert os.listdir(tmp_path) == []


def _copy_of_the_demo_data(data_dir, tmp_path):
  data_lib.get_builder('digits', data_dir)  # prepared once
  target = tmp_path / 'tfds'
  shutil.copytree(os.path.join(data_dir, 'digits'), target / 'digits')
  return target, target / 'digits' / '1.0.0'


def test_a_garbled_dataset_info_json_is_an_error_naming_it(run_cli, tiny, data_dir, tmp_path):
  # Issue 24: a ParseError traceback.
  copy, version_dir = _copy_of_the_demo_data(data_dir, tmp_path)
  (version_dir / 'dataset_info.json').write_text('garbage{')
  args = [f for f in tiny if not f.startswith('--data_dir')]
  code, err = run_cli(*args, f'--data_dir={copy}', f'--model_dir={tmp_path / "run"}')
  assert code == 1
  assert re.search(rf"^error: dataset digits under --data_dir='{re.escape(str(copy))}': a "
                   r'metadata file of the prepared dataset \(dataset_info\.json or '
                   r'features\.json\) is not valid', err, re.M), err[-2000:]
  assert not (tmp_path / 'run').exists()


def test_a_shard_shorter_than_its_metadata_names_the_dataset_and_split(run_cli, tiny, data_dir,
                                                                       tmp_path):
  # Issue 24: 'FailedPreconditionError: Input dataset was expected to contain 1437 elements
  # but contained only 1000 elements.', no dataset, split or file named.
  copy, version_dir = _copy_of_the_demo_data(data_dir, tmp_path)
  shard = str(version_dir / 'digits-train.tfrecord-00000-of-00001')
  records = list(tf.data.TFRecordDataset(shard).take(40).as_numpy_iterator())
  with tf.io.TFRecordWriter(shard) as writer:
    for record in records:
      writer.write(record)
  args = [f for f in tiny if not f.startswith('--data_dir')]
  code, err = run_cli(*args, f'--data_dir={copy}', f'--model_dir={tmp_path / "run"}',
                      '--train_steps=20')
  assert code == 1
  assert re.search(rf"^error: reading dataset digits split train under --data_dir="
                   rf"'{re.escape(str(copy))}' failed: its shards hold fewer records than its "
                   r'dataset_info\.json lists \(Input dataset was expected to contain 1437 '
                   r'elements but contained only 40', err, re.M), err[-2000:]


def test_bad_input_found_after_model_dir_is_made_leaves_no_empty_model_dir(run_cli, tiny,
                                                                          tmp_path):
  # Issue 24: a garbage --checkpoint (found once model_dir was made) left an empty model_dir.
  (tmp_path / 'ckpt-5.index').write_text('garbage')
  model_dir = tmp_path / 'new_run'
  code, err = run_cli(*tiny, f'--model_dir={model_dir}', '--train_mode=finetune',
                      f'--checkpoint={tmp_path / "ckpt-5"}')
  assert code == 1 and re.search(r"^error: --checkpoint='.*ckpt-5' cannot be read", err, re.M)
  assert not model_dir.exists()


@pytest.mark.parametrize('flag, message', [
    ('--learning_rate=-1', '--learning_rate must be > 0, got -1.0'),
    ('--eval_steps=-1', '--eval_steps must be >= 0, got -1'),
    ('--train_epochs=0',
     '--train_epochs=0 trains nothing; give --train_epochs or --train_steps > 0'),
    ('--checkpoint_epochs=-1', '--checkpoint_epochs must be >= 1, got -1'),
    ('--checkpoint_steps=-5', '--checkpoint_steps must be >= 0, got -5'),
    ('--warmup_epochs=-3', '--warmup_epochs must be >= 0, got -3.0'),
    ('--train_steps=-5', '--train_steps must be >= 0, got -5'),
    ('--momentum=1', '--momentum must be in [0, 1), got 1.0'),
    ('--fine_tune_after_block=5', '--fine_tune_after_block must be in [-1, 4], got 5'),
    ('--step_timeout_seconds=-1', '--step_timeout_seconds must be >= 0, got -1.0'),
])
def test_numbers_that_cannot_be_right_are_one_line_errors(flag, message, run_cli, tiny,
                                                          tmp_path):
  code, err = run_cli(*tiny, f'--model_dir={tmp_path / "run"}', flag)
  assert code == 1
  assert err.strip().splitlines()[-1] == f'error: {message}'
  assert not os.path.exists(tmp_path / 'run')


def test_a_file_as_data_dir_is_a_one_line_error(run_cli, tiny, tmp_path):
  data_file = tmp_path / 'not_a_dir'
  data_file.write_text('')
  args = [f for f in tiny if not f.startswith('--data_dir')]
  code, err = run_cli(*args, f'--data_dir={data_file}', f'--model_dir={tmp_path / "run"}')
  assert code == 1
  assert err.strip().splitlines()[-1] == (f"error: --data_dir='{data_file}' is a file, not a "
                                          'directory of prepared datasets')


@pytest.mark.slow
def test_a_full_disk_is_a_one_line_error_keeping_the_last_complete_checkpoint(
    small_disk, tiny, run_in_process):
  model_dir = os.path.join(small_disk, 'run')
  result = run_in_process(*tiny, f'--model_dir={model_dir}', '--train_steps=40',
                          '--checkpoint_steps=5')
  assert result.returncode == 1
  assert re.search(r'^error: could not save checkpoint ckpt-\d+ in .* No space left on device.*'
                   r'the last complete checkpoint \(.*ckpt-\d+\) is kept', result.stderr, re.M), \
      result.stderr[-600:]
  assert not glob.glob(os.path.join(model_dir, '*_temp'))
  assert tf.train.latest_checkpoint(model_dir) is not None


@pytest.mark.slow
def test_running_out_of_memory_is_one_line_naming_the_sizes_not_a_silent_kill(
    ten_and_twenty, tiny, tmp_path, run_command, snapshot):
  # The kernel's OOM killer would end the run with SIGKILL (137) and no word; the memory watch
  # ends it first. SOGCLR_MEMORY_LIMIT_MB stands in for a small host: evaluation pads every batch
  # to --eval_batch_size, 100,000 images here, far past 1.5 GB.
  model_dir = _copy(ten_and_twenty, tmp_path)
  before = snapshot(model_dir)
  result = run_command(*tiny, f'--model_dir={model_dir}', '--mode=eval', '--eval_batch_size=100000',
                       env={'SOGCLR_MEMORY_LIMIT_MB': '1500'}, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  line = result.stderr.strip().splitlines()[-1]
  assert re.match(r'error: out of memory: this run holds \d+\.\d GiB and \d+\.\d GiB are left of '
                  r'a limit of 1\.5 GiB; lower --train_batch_size \(now 16\), --eval_batch_size '
                  r'\(now 100000\) or --image_size \(now 16\)', line), line
  assert snapshot(model_dir) == before


OFFICIAL_RUN = ['--train_mode=pretrain', '--dataset=imagenet2012', '--eval_split=validation',
                '--image_size=16', '--resnet_depth=10', '--width_multiplier=0.125',
                '--num_proj_layers=2', '--proj_out_dim=16', '--train_batch_size=6',
                '--eval_batch_size=8', '--optimizer=adam', '--learning_rate=0.01',
                '--warmup_epochs=0', '--use_blur=False', '--probe_max_examples=0',
                '--log_every_seconds=0', '--mixed_precision=float32', '--loss=sogclr']


def _error_line(result):
  lines = [x for x in result.stderr.splitlines() if x.startswith('error:')]
  assert len(lines) == 1, result.stderr[-3000:]
  return lines[0]


@pytest.mark.slow
def test_labels_counted_from_one_stop_with_the_fix_and_train_with_label_offset(
    official_layout, tmp_path, run_in_process):
  # The official build_imagenet_data.py labels ImageNet 1..1000: here 1..7 with 7 classes.
  data_dir = official_layout(tmp_path / 'tfds', labels=lambda i: i % 7 + 1)
  args = [*OFFICIAL_RUN, f'--data_dir={data_dir}', '--num_classes=7', '--train_steps=4']
  result = run_in_process(*args, f'--model_dir={tmp_path / "plain"}')
  assert result.returncode == 1
  assert re.fullmatch(r'error: Dataset imagenet2012 split (train|validation): label outside '
                      r'\[0, 7\) \(set --num_classes, or --label_offset=1 for labels counted '
                      r'from 1\) in record \S+: label 7', _error_line(result)), result.stderr
  result = run_in_process(*args, '--label_offset=1', f'--model_dir={tmp_path / "offset"}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert "each record's label minus 1 (--label_offset)" in result.stderr
  results = json.load(open(tmp_path / 'offset' / 'result_4.json'))
  assert results['eval/num_examples'] == 8
  assert json.load(open(tmp_path / 'offset' / 'flags.json'))['label_offset'] == 1


@pytest.mark.slow
def test_sogclr_pretrains_on_a_slice_of_an_image_id_split(official_layout, tmp_path,
                                                         run_in_process):
  # SimCLR's semi-supervised protocol slices ImageNet (train[:10%]); ids stay the full split's.
  data_dir = official_layout(tmp_path / 'tfds')
  model_dir = tmp_path / 'run'
  result = run_in_process(*OFFICIAL_RUN, f'--data_dir={data_dir}', '--num_classes=100',
                       '--train_split=train[:50%]', '--train_steps=4',
                       f'--model_dir={model_dir}')
  assert result.returncode == 0, result.stderr[-3000:]
  log_u = tf.train.load_variable(tf.train.latest_checkpoint(str(model_dir)),
                                 'sogclr/log_u/.ATTRIBUTES/VARIABLE_VALUE')
  # 12 images in the slice, 2 steps of 6 per epoch: each visited, in the slot of its own id; the
  # slots of the other half stay unvisited.
  sliced = data_lib.get_builder('imagenet2012', data_dir).as_dataset(split='train[:50%]')
  slice_ids = sorted(int(ex['image/ID']) for ex in sliced)
  assert log_u.shape == (24,) and len(slice_ids) == 12 and slice_ids != list(range(12))
  assert np.flatnonzero(np.isfinite(log_u)).tolist() == slice_ids


@pytest.mark.slow
def test_eval_mode_evaluates_a_saved_model_export_or_one_checkpoint(trained, tmp_path,
                                                                     run_in_process, tiny):
  # The export (saved_model/2, with the run's flags.json) needs no model flags; the training
  # run's own evaluation of the same weights is the reference.
  expected = json.load(open(os.path.join(trained.model_dir, 'result_2.json')))
  export = os.path.join(trained.model_dir, 'saved_model', '2')
  before = {path: open(path, 'rb').read() for path in glob.glob(f'{export}/**', recursive=True)
            if os.path.isfile(path)}
  data_flags = [f for f in tiny if f.startswith(('--data_dir', '--log_every', '--eval_batch'))]
  for name, checkpoint in (('export', export), ('ckpt', os.path.join(trained.model_dir,
                                                                       'ckpt-2'))):
    out = tmp_path / name
    result = run_in_process('--mode=eval', f'--checkpoint={checkpoint}', f'--model_dir={out}',
                         '--probe_max_examples=0', *data_flags)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.load(open(out / 'result_2.json'))
    assert results['checkpoint'] == checkpoint and results['global_step'] == 2
    for key in ('eval/top_1', 'eval/top_5', 'eval/num_examples'):
      assert results[key] == pytest.approx(expected[key], abs=1e-6), key
  assert before == {path: open(path, 'rb').read()
                    for path in glob.glob(f'{export}/**', recursive=True) if os.path.isfile(path)}
  result = run_in_process('--mode=eval', f'--checkpoint={tmp_path / "nothing"}',
                       f'--model_dir={tmp_path / "none"}', *data_flags)
  assert result.returncode == 1
  assert re.search(r"^error: --checkpoint='.*nothing' does not exist", result.stderr, re.M)


@pytest.mark.slow
def test_eval_every_epochs_logs_head_and_knn_top_1_each_epoch_with_its_cost(run_in_process,
                                                                            tiny, tmp_path):
  model_dir = str(tmp_path / 'run')
  # 256 images in steps of 64: 4 steps an epoch.
  result = run_in_process(*tiny, f'--model_dir={model_dir}', '--train_split=train[:256]',
                          '--train_batch_size=64', '--train_epochs=2', '--eval_every_epochs=1',
                          '--knn_k=20')
  assert result.returncode == 0, result.stderr[-3000:]
  for step, epoch in ((4, 1), (8, 2)):
    assert re.search(rf'Eval at step {step} \(epoch {epoch}\): head top-1 [01]\.\d{{4}}, kNN '
                     r'top-1 [01]\.\d{4} \(took \d+\.\d s, training so far \d+\.\d s\)$',
                     result.stderr, re.M), result.stderr[-3000:]
    saved = json.load(open(os.path.join(model_dir, f'result_{step}.json')))
    assert 0 < saved['eval/knn_top_1'] <= 1 and saved['eval_seconds'] > 0
  monitor = json.load(open(os.path.join(model_dir, 'result_8.json')))['monitor']
  assert [r['global_step'] for r in monitor] == [4, 8]
  # Without --knn_monitor the final evaluation has no kNN: the HParams dashboard gets the one
  # evaluated while training at the final step.
  knn = summaries.scalars(model_dir, 'hparams/knn_top_1')[1]
  assert knn == [pytest.approx(monitor[-1]['eval/knn_top_1'])]
