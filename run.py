r"""The command line: the flags, and the exit codes and one-line errors of a run.

The only module that reads flags; `settings.config_of` checks them and builds the one frozen
config, `experiment.run(config)` does the work. Example (the
embedded demo data, a CPU):

  python run.py --train_mode=pretrain --DCL_mode=True --gamma=0.9 --model_dir=runs/sogclr \
      --dataset=digits --image_size=16 --resnet_depth=18 --width_multiplier=0.25 ...
"""
import contextlib
import os
import signal
import sys

from absl import app
from absl import flags
from absl import logging

import host_memory
import interrupts

# Keras imports these when they are installed, for its scikit-learn wrappers, image plots and
# notebook file editor, none of which a run uses: hiding them while TensorFlow is imported starts
# the command 2-4 s sooner (of 11 s on a slow 2-core host). Imported later they load as usual.
KERAS_EXTRAS = ('sklearn', 'matplotlib', 'IPython')


@contextlib.contextmanager
def _hidden(names):
  """Within the block, importing a module of `names` not yet imported raises ImportError."""
  hidden = [name for name in names if name not in sys.modules]
  sys.modules.update(dict.fromkeys(hidden))
  try:
    yield
  finally:
    for name in hidden:
      if name in sys.modules and sys.modules[name] is None:
        del sys.modules[name]


if __name__ == '__main__':  # SIGTERM and Ctrl-C: one line at any moment, even during imports
  interrupts.watch()
host_memory.tune()  # before TensorFlow allocates anything

# The command line only: a notebook importing this module keeps Keras whole.
with _hidden(KERAS_EXTRAS if __name__ == '__main__' else ()):
  import tensorflow as tf  # noqa: E402  (after the malloc tuning above)

import data as data_lib  # noqa: E402
import errors  # noqa: E402
import experiment  # noqa: E402
import settings  # noqa: E402
import trainer as trainer_lib  # noqa: E402

FLAGS = flags.FLAGS

# -- Data ------------------------------------------------------------------------------------------
flags.DEFINE_string('dataset', 'imagenet2012',
                    "TFDS dataset name, 'name/config' or 'name:version', prepared under "
                    "--data_dir (read without its builder code); 'digits' is the embedded demo "
                    "data; see docs/datasets.md.")
flags.DEFINE_string('data_dir', None,
                    'TFDS data directory (local or gs://); default: TFDS\'s own (~/tensorflow_datasets).')  # noqa: E501
flags.DEFINE_string('train_split', 'train',
                    "Split to train on: a split, a slice ('train[:10%]', 'train[50%:]': the "
                    "records' own ids keep the whole split's, so SogCLR's table has a slot per "
                    "image of 'train') or a union ('train+validation': ids derived from the "
                    "record ids); docs/datasets.md.")
flags.DEFINE_string('eval_split', 'validation',
                    "Split to evaluate on (a split, slice or union); the default is ImageNet's, "
                    "the digits, Fashion-MNIST and CIFAR name theirs 'test'.")
flags.DEFINE_integer('num_classes', 0,
                     'Number of classes of the supervised head; 0 = read from the dataset.')
flags.DEFINE_integer('label_offset', 0,
                     'Subtracted from every record\'s label: 1 for data whose labels count from 1 '
                     '(the official SogCLR build_imagenet_data.py writes 1..1000).')
flags.DEFINE_string('fashion_mnist_dir', None,
                    'Folder of the four Fashion-MNIST idx files (gzipped or not) from which '
                    '--dataset=fashion_mnist is prepared into --data_dir on first use; default: '
                    'Debian\'s dataset-fashion-mnist folder, /usr/share/datasets/fashion-mnist.')
flags.DEFINE_integer('image_size', 224, 'Side of the square input images, in pixels.')
flags.DEFINE_integer('shuffle_buffer', 50_000,
                     'Encoded training images held by the per-epoch shuffle. It holds the records '
                     'as stored, so it takes this many times the mean encoded image: at 50,000 '
                     'about 5.5 GB for ImageNet JPEGs (110 KB, about 400x350 px), 2.7 GB for '
                     '333-500 px JPEGs (55 KB), 400 MB for 64 px PNGs (8 KB), 115 MB for 32 px '
                     'PNGs (2.3 KB). Lower it when that does not fit: each epoch also reads the '
                     'shards in its own order, so a smaller buffer still mixes the whole split.')
flags.DEFINE_bool('cache_dataset', False,
                  'Cache the encoded split in memory (good for small datasets, not ImageNet).')
flags.DEFINE_float('color_jitter_strength', 1.0,
                   'Strength s of color jitter (brightness/contrast/saturation 0.8s, hue 0.2s).')
flags.DEFINE_float('crop_area_min', 0.08,
                   'Smallest random crop, as a fraction of the image area (0, 1].')
flags.DEFINE_bool('random_flip', True,
                  'Random horizontal flips in training (pretraining and fine-tuning); turn off '
                  'where a mirror image is another class or none (digits, text).')
flags.DEFINE_bool('use_blur', True,
                  'Gaussian blur of views when pretraining (skipped for images under 32 px).')
flags.DEFINE_enum('augment_on', 'auto', ['auto', 'host', 'device'],
                  'Where training flips, color distortion and blur run. host: in the input '
                  'pipeline; device: batched in the train step, from parameters the pipeline '
                  'draws from the same seeds (the same pixels within float round-off; the host '
                  'only decodes, crops and resizes: 2.5x its images/s at 224 px); auto: device on '
                  'TPUs and GPUs, host on a CPU (whose results stay those of earlier runs).')

# -- Model -----------------------------------------------------------------------------------------
flags.DEFINE_integer('resnet_depth', 50, 'ResNet depth: 10, 18, 34, 50, 101, 152 or 200 (10: one '
                     'basic block per group, the smallest; not in SimCLR).')
flags.DEFINE_float('width_multiplier', 1.0,
                   'Width multiplier of the ResNet (fractions such as 0.25 allowed).')
flags.DEFINE_float('sk_ratio', 0.0, 'Selective-kernel ratio; > 0 enables SK (SimCLR v2: 0.0625).')
flags.DEFINE_float('se_ratio', 0.0, 'Squeeze-excitation ratio; > 0 enables SE.')
flags.DEFINE_float('batch_norm_decay', 0.9, 'Momentum of BN moving statistics.')
flags.DEFINE_bool('global_bn', True, 'Synchronize BN statistics across replicas.')
flags.DEFINE_enum('proj_head_mode', 'nonlinear', ['none', 'linear', 'nonlinear'],
                  'Projection head type.')
flags.DEFINE_integer('num_proj_layers', 3,
                     'Layers of the nonlinear projection head; 0 = none (the projection is the '
                     'trunk features, as in SimCLR and the official SogCLR code).')
flags.DEFINE_integer('proj_out_dim', 128, 'Output dimension of the projection head.')
flags.DEFINE_integer('ft_proj_selector', 0,
                     'Projection-head output that feeds the linear head, when fine-tuning and '
                     'while pretraining: 0 = trunk features, j = layer j, -1 = the last layer '
                     '(the trunk features with --num_proj_layers=0).')
flags.DEFINE_bool('lineareval_while_pretraining', True,
                  'Train a linear head on stop-gradient trunk features while pretraining.')
flags.DEFINE_integer('fine_tune_after_block', -1,
                     'Fine-tune only after this trunk block: -1 everything, 0 after the stem, '
                     '1-3 after that block group, 4 only the linear head.')
flags.DEFINE_bool('zero_init_logits_layer', False, 'Initialize the linear head to zeros.')
flags.DEFINE_bool('supervised_head_bn', True,
                  'Batch-normalize (no scale or offset) the features of the linear head, as MAE '
                  'and MoCo v3 do for linear probing; still a linear classifier at inference.')

# -- Objective -------------------------------------------------------------------------------------
flags.DEFINE_enum('loss', None, ['simclr', 'sogclr', 'isogclr'],
                  'Contrastive loss; unset = SogCLR unless an alias below says otherwise. '
                  'isogclr: SogCLR with a learned temperature per image (docs/objectives.md).')
flags.DEFINE_bool('DCL_mode', None, 'Alias of --loss: True = sogclr, False = simclr.')
flags.DEFINE_bool('GCL_mode', None, 'Alias of --loss: True = sogclr, False = simclr.')
flags.DEFINE_bool('BI_mode', None,
                  'Alias of --loss ("batch-independent"): True = sogclr, False = simclr.')
flags.DEFINE_float('temperature', 0.1,
                   'Temperature tau of the contrastive loss (> 0); iSogCLR: every image\'s '
                   'initial temperature.')
flags.DEFINE_float('gamma', 0.9,
                   "SogCLR's moving-average weight of the new estimate of u, in (0, 1].")
flags.DEFINE_enum('gamma_schedule', 'constant', ['constant', 'cosine'],
                  'constant: --gamma throughout; cosine: from 1 down to --gamma along a half '
                  'cosine over --gamma_decay_epochs (whole epochs), then --gamma (LibAUC\'s). '
                  'A first visit of an image always takes gamma = 1.')
flags.DEFINE_integer('gamma_decay_epochs', 0,
                     'Epochs of the cosine gamma schedule (> 0 with --gamma_schedule=cosine; '
                     'LibAUC suggests half the training epochs).')
flags.DEFINE_float('isogclr_rho', 0.3,
                   'iSogCLR: the KL radius rho of its DRO (>= 0); larger gives lower '
                   'temperatures.')
flags.DEFINE_float('isogclr_eta', 0.01, 'iSogCLR: step size of the temperature updates (> 0).')
flags.DEFINE_float('isogclr_beta', 0.9,
                   'iSogCLR: weight of the new temperature gradient in its moving average, '
                   'in (0, 1].')
flags.DEFINE_float('isogclr_tau_min', 0.05, 'iSogCLR: lowest temperature (> 0).')
flags.DEFINE_float('isogclr_tau_max', 0.7, 'iSogCLR: highest temperature.')
flags.DEFINE_bool('hidden_norm', True, 'L2-normalise projections (cosine similarity).')

# -- Optimization ----------------------------------------------------------------------------------
flags.DEFINE_enum('optimizer', 'lars', ['lars', 'momentum', 'adam'],
                  "Optimizer. SogCLR's gradient carries a factor tau: with plain momentum SGD "
                  'scale the learning rate by 1/temperature to compare with SimCLR.')
flags.DEFINE_float('learning_rate', 0.3,
                   'Base learning rate, scaled by --learning_rate_scaling.')
flags.DEFINE_enum('learning_rate_scaling', 'linear', ['linear', 'sqrt'],
                  'Peak lr = learning_rate * batch/256 (linear) or * sqrt(batch) (sqrt).')
flags.DEFINE_float('warmup_epochs', 10, 'Linear warm-up, in epochs; then cosine decay to 0.')
flags.DEFINE_float('weight_decay', 1e-6,
                   'L2 weight decay (per unit of 0.5*||w||^2); BN and biases excluded. Also '
                   "the factor of eval/regularization_loss: --mode=eval takes the training "
                   "run's from model_dir/flags.json unless given.")
flags.DEFINE_float('momentum', 0.9, 'Momentum of LARS and SGD.')

# -- Loop ------------------------------------------------------------------------------------------
flags.DEFINE_enum('train_mode', 'pretrain', ['pretrain', 'finetune'],
                  'pretrain: contrastive learning; finetune: supervised, from --checkpoint.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'train_then_eval'],
                  'Train (evaluating at the end), evaluate, or both. eval restores only the '
                  'model of each checkpoint in --model_dir and takes the model, data, '
                  "--weight_decay and training-length flags not given from the training run's "
                  'flags.json (docs/evaluation.md).')
flags.DEFINE_integer('train_batch_size', 512, 'Global training batch size, in images.')
flags.DEFINE_integer('train_epochs', 100, 'Training length, in epochs.')
flags.DEFINE_integer('train_steps', 0, 'Training length, in steps; > 0 overrides train_epochs.')
flags.DEFINE_integer('eval_batch_size', 256, 'Global evaluation batch size, in images.')
flags.DEFINE_integer('eval_steps', 0,
                     'Batches of the eval split the linear head\'s top-1/top-5 (eval/top_1, '
                     'eval/num_examples) are computed on; 0 = the whole split. The kNN, the '
                     'probe and the Projector always use the whole split.')
flags.DEFINE_string('eval_name', None,
                    'Name of this evaluation (official flag): its eval/ summaries go to '
                    'model_dir/eval_<name> and its results carry eval_name, so evaluations of '
                    'one run on several splits stay apart.')
flags.DEFINE_integer('eval_timeout_seconds', 3600,
                     '--mode=eval: seconds to wait for a new checkpoint before exiting.')
flags.DEFINE_integer('checkpoint_epochs', 1, 'Epochs between checkpoints.')
flags.DEFINE_integer('checkpoint_steps', 0,
                     'Steps between checkpoints; > 0 overrides checkpoint_epochs.')
flags.DEFINE_integer('keep_checkpoint_max', 5, 'Checkpoints kept in model_dir.')
flags.DEFINE_integer('keep_hub_module_max', 1,
                     'SavedModel exports kept in model_dir/saved_model/<step>, written at the '
                     'end of training and after each checkpoint --mode=eval evaluates '
                     '(0 = no export).')
flags.DEFINE_string('model_dir', None, 'Directory for checkpoints, summaries and flags.json.')
flags.DEFINE_string('checkpoint', None,
                    'Checkpoint (prefix or directory) or SavedModel export '
                    '(model_dir/saved_model/<step>) to initialize from when model_dir has none '
                    '(weights only: fine-tuning or linear evaluation of a pretraining run). With '
                    '--mode=eval: evaluate this one checkpoint instead of every checkpoint of '
                    'model_dir in turn.')
flags.DEFINE_bool('start_over', False,
                  'Train from step 0 although model_dir holds checkpoints that cannot be read '
                  '(they are moved to model_dir/discarded-<time>/, not deleted). Without it such '
                  'a model_dir is an error: a run never silently restarts over its own work.')
flags.DEFINE_list('allow_flag_changes', [],
                  'Run-defining flags (loss and its hyperparameters, batch size, seed, data, '
                  'image size, architecture, optimizer) that may differ from the flags.json of '
                  'the run being resumed, e.g. temperature,seed; any other difference is an '
                  'error; all: resume without the check. Every start is recorded in '
                  'model_dir/flags_history.jsonl.')
flags.DEFINE_integer('seed', 0, 'Seed of initialization, data order and augmentations.')
flags.DEFINE_bool('deterministic', False,
                  'Deterministic ops and input order (slower): the same run twice gives the '
                  'same weights.')
flags.DEFINE_float('log_every_seconds', 5.0, 'Seconds of training between progress lines.')
flags.DEFINE_integer('probe_max_examples', 100_000,
                     'After pretraining, fit a logistic-regression probe on the frozen trunk '
                     'features of the whole train split (L-BFGS; under a minute for 60,000 '
                     'images on 2 cores) when it has at most this many images; a larger split '
                     'is not probed (a log line says so, never a cut of the split); 0 = never. '
                     'Up to this size (one host) each evaluation reads each split once, its '
                     'features held on the host for the head, the kNN and the probe; above it '
                     'the kNN streams the train split on the replicas.')
flags.DEFINE_bool('probe_baselines', True,
                  'With the probe, also report raw-pixel and random-network probes.')
flags.DEFINE_bool('knn_monitor', False,
                  'Every evaluation also reports the top-1 of a weighted kNN classifier on '
                  'trunk features, eval split against train split, computed on the replicas '
                  '(holds the eval split\'s features and its top-k, never the train split\'s).')
flags.DEFINE_integer('eval_every_epochs', 0,
                     'While training, every this many epochs (and at the end), evaluate the '
                     'linear head\'s top-1 and the kNN monitor on the eval split (TensorBoard '
                     'eval/, result_<step>.json, a log line with its cost); 0 = only at the end.')
flags.DEFINE_integer('eval_every_steps', 0,
                     'As --eval_every_epochs, in steps; > 0 overrides it.')
flags.DEFINE_integer('knn_k', 200, 'Neighbours voting in the kNN monitor.')
flags.DEFINE_integer('projector_max_points', 10_000,
                     'Every evaluation writes the trunk features of a fixed sample of this many '
                     'eval images (all when fewer) for TensorBoard\'s Projector, with their '
                     'labels and thumbnails (model_dir/projector_config.pbtxt, projector/); '
                     '0 = none.')
flags.DEFINE_float('knn_temperature', 0.1,
                   'Temperature T of the kNN monitor: votes weigh exp(cosine similarity / T).')

flags.DEFINE_enum('mixed_precision', 'auto', ['auto', 'float32', 'bfloat16', 'float16'],
                  'Compute dtype of the network (variables, loss, u and softmax stay float32); '
                  'float16 adds loss scaling. auto: bfloat16 on TPU and on CPUs with native '
                  'bfloat16 (AVX512_BF16/AMX), float16 on GPU, float32 on other CPUs.')
flags.DEFINE_enum('jit_compile', 'auto', ['auto', 'true', 'false'],
                  'Compile the train step with XLA. auto: on for TPU and GPU, off on CPU.')

flags.DEFINE_bool('debug', False,
                  'On an error, print the full traceback instead of the one-line "error:" '
                  '(also: environment variable SOGCLR_DEBUG=1).')

# -- Infrastructure --------------------------------------------------------------------------------
flags.DEFINE_bool('use_tpu', None,
                  'Run on a TPU; unset = a TPU if one is named (--tpu_name, --master) or attached, '
                  'else all local GPUs, else CPU.')
flags.DEFINE_string('tpu_name', None, 'Cloud TPU name or grpc:// address.')
flags.DEFINE_string('tpu_zone', None,
                    'GCE zone of the Cloud TPU named by --tpu_name (default: detected).')
flags.DEFINE_string('gcp_project', None,
                    'GCP project of the Cloud TPU named by --tpu_name (default: detected).')
flags.DEFINE_string('master', None,
                    'TensorFlow master address (a TPU grpc:// address), when --tpu_name is unset.')
flags.DEFINE_float('startup_timeout_seconds', 900,
                   'Seconds to wait at start-up for the other tasks of TF_CONFIG (a multi-worker '
                   'job) or for a TPU to answer, and again for the TPU to connect and '
                   'initialize; past it the run ends with an error naming what did not answer '
                   '(exit 1). 0 = wait forever.')
flags.DEFINE_integer('cpu_replicas', 1,
                     'On a host without GPUs or TPU: split the CPU into this many logical '
                     'devices and run MirroredStrategy over them, the multi-replica path '
                     '(per-replica batches, cross-replica gathers, synchronized BatchNorm) '
                     'without an accelerator. It shares the same cores: for checking, not speed.')
flags.DEFINE_float('step_timeout_seconds', 600,
                   'Multi-worker runs: a call of the train loop (about a second of steps; the '
                   'first, which traces, excepted) or a batch of an evaluation that takes longer '
                   'ends the job with an error and exit 1 (a worker hung while alive would '
                   'otherwise block every worker forever). 0 = never.')


def flag_values():
  """({flag name: value} of every flag defined in this file, the names given on the command
  line)."""
  defined = FLAGS.get_flags_for_module(sys.modules[__name__])
  return {f.name: f.value for f in defined}, {f.name for f in defined if f.present}


def config_from_flags():
  """The config of the parsed flags (settings.config_of)."""
  return settings.config_of(*flag_values())


def parse_config(argv):
  """The config of command line `argv` (['run.py', '--flag=value', ...]), parsed afresh: for
  scripts (bench/) that run experiments in-process from command lines."""
  FLAGS.unparse_flags()
  FLAGS(argv)
  return config_from_flags()


def main(argv):
  """Runs the job the parsed flags describe; returns its results dict."""
  del argv
  return experiment.run(config_from_flags())


# 128 + the signal, as a shell reports a process ended by it: schedulers see "interrupted".
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT


def memory_advice(config):
  """What the out-of-memory line advises (host_memory.MemoryWatch)."""
  return (f'lower --train_batch_size (now {config.loop.train_batch_size}), --eval_batch_size '
          f'(now {config.eval.eval_batch_size}) or --image_size (now {config.data.image_size}), '
          'then rerun: the run resumes from its newest checkpoint (docs/reliability.md)')


def _to_log_file(level, line):
  """Logs `line` where absl writes to a log file (--log_dir): on stderr, the `error:` line
  that follows says it once."""
  if logging.get_absl_handler().python_handler.stream not in (sys.stderr, sys.__stderr__):
    logging.log(level, '%s', line)


def cli(argv):
  """main() with one-line errors for bad input (non-zero exit, nothing written is touched)."""
  del argv
  debug = FLAGS.debug or os.environ.get('SOGCLR_DEBUG', '') not in ('', '0')
  watch = None
  try:
    config = config_from_flags()
    watch = host_memory.MemoryWatch(memory_advice(config)).start()
    results = experiment.run(config)
  except trainer_lib.Preempted as e:
    _to_log_file(logging.WARNING, str(e))
    kind = 'interrupted' if e.signal_number == signal.SIGINT else 'preempted'
    with contextlib.suppress(OSError):  # a terminal gone with SIGHUP
      print(f'{kind}: {e}', file=sys.stderr)
    sys.exit(128 + e.signal_number)
  except KeyboardInterrupt:
    print('interrupted: stopped by Ctrl-C; nothing was saved since the last checkpoint',
          file=sys.stderr)
    sys.exit(INTERRUPTED_EXIT_CODE)
  except (ValueError, FloatingPointError, OSError, tf.errors.OpError) as e:
    if debug:
      raise
    line = errors.advice(e, errors.one_line_error(e))
    _to_log_file(logging.ERROR, line)
    print(f'error: {line}', file=sys.stderr)
    sys.exit(1)
  finally:
    if watch is not None:  # run.cli called in process (a notebook, the tests) leaves no thread
      watch.stop()
  print(experiment.summary_line(results, config.data.eval_split))


def _tensorflow_logs_through_absl():
  """Removes the handler TensorFlow gave its logger at import (the root logger had none yet):
  under app.run its records also reach absl's handler on the root logger, and each line of
  TensorFlow's (`Using MirroredStrategy ...`, deprecations) was printed twice."""
  logger = tf.get_logger()
  for handler in list(logger.handlers):
    logger.removeHandler(handler)
  logger.addFilter(_not_a_reduce_line)


def _not_a_reduce_line(record):
  """False for TensorFlow's INFO lines `Reduce to ... then broadcast to ...` (and `Gather to`):
  with several replicas one per variable at each trace, 120 at the start of a 2-replica demo."""
  return not (record.levelname == 'INFO' and record.filename == 'cross_device_ops.py')


# absl prints these and exits with status 1; asked-for help is not a failure.
SHORT_HELP_ARGS = ('--help', '-help', '-?', '--helpshort', '-helpshort')
FULL_HELP_ARGS = ('--helpfull', '-helpfull')


def help_asked(argv):
  """'full' or 'short' when command line `argv` asks for help (before any '--'), else None."""
  asked = argv[1:argv.index('--')] if '--' in argv else argv[1:]
  if any(arg in FULL_HELP_ARGS for arg in asked):
    return 'full'
  return 'short' if any(arg in SHORT_HELP_ARGS for arg in asked) else None


def help_or_run(argv):
  """Prints the help `argv` asks for and exits 0, or runs the command line (app.run)."""
  asked = help_asked(argv)
  if asked:
    app.usage(shorthelp=asked == 'short', writeto_stdout=True, exitcode=0,
              detailed_error='Try --helpfull to get a list of all flags.' if asked == 'short'
              else None)
  app.run(cli, argv)


def end_process(stop):
  """Ends the process for app.run's SystemExit `stop`. A run that stopped (a non-zero code:
  preempted, interrupted, an error), its line written, does not wait for the tf.data iterators
  still being deleted (data.release_in_background): a deletion waits for tf.data's autotuning
  thread, measured at 47 s after a SIGTERM in a Fashion-MNIST run, and nothing of the run
  depends on it. Any other end is Python's (which lets those threads finish)."""
  if isinstance(stop.code, int) and stop.code != 0 and data_lib.input_release_pending():
    for stream in (sys.stdout, sys.stderr):
      with contextlib.suppress(OSError, ValueError):  # a terminal gone, a closed stream
        stream.flush()
    logging.flush()
    os._exit(stop.code)
  raise stop


if __name__ == '__main__':
  _tensorflow_logs_through_absl()
  try:
    help_or_run(sys.argv)
  except SystemExit as stop:
    end_process(stop)
