r"""The command line: flags, their checks, and the one frozen experiment config built from them.

The only module that reads flags; `experiment.run(config)` does the work. Example (the
embedded demo data, a CPU):

  python run.py --train_mode=pretrain --DCL_mode=True --gamma=0.9 --model_dir=runs/sogclr \
      --dataset=digits --image_size=16 --resnet_depth=18 --width_multiplier=0.25 ...
"""
import os
import re
import signal
import sys
import types

from absl import app
from absl import flags
from absl import logging

import host_memory

host_memory.tune()  # before TensorFlow allocates anything

import tensorflow as tf  # noqa: E402  (after the malloc tuning above)

import checkpoints  # noqa: E402
import data as data_lib  # noqa: E402
import distribution  # noqa: E402
import evaluation  # noqa: E402
import experiment  # noqa: E402
import model as model_lib  # noqa: E402
import trainer as trainer_lib  # noqa: E402

FLAGS = flags.FLAGS

# -- Data ------------------------------------------------------------------------------------------
flags.DEFINE_string('dataset', 'imagenet2012',
                    "TFDS dataset name, 'name/config' or 'name:version', prepared under "
                    "--data_dir (read without its builder code); 'digits' is the embedded demo "
                    "data; see README 'Datasets'.")
flags.DEFINE_string('data_dir', None,
                    'TFDS data directory (local or gs://); default: TFDS\'s own (~/tensorflow_datasets).')  # noqa: E501
flags.DEFINE_string('train_split', 'train', 'Split to train on.')
flags.DEFINE_string('eval_split', 'validation', 'Split to evaluate on.')
flags.DEFINE_integer('num_classes', 0,
                     'Number of classes of the supervised head; 0 = read from the dataset.')
flags.DEFINE_integer('label_offset', 0,
                     'Subtracted from every record\'s label: 1 for data whose labels count from 1 '
                     '(the official SogCLR build_imagenet_data.py writes 1..1000).')
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
flags.DEFINE_integer('resnet_depth', 50, 'ResNet depth: 18, 34, 50, 101, 152 or 200.')
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
                  'isogclr: SogCLR with a learned temperature per image (README "iSogCLR").')
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
                  'flags.json (README "Evaluate and fine-tune").')
flags.DEFINE_integer('train_batch_size', 512, 'Global training batch size, in images.')
flags.DEFINE_integer('train_epochs', 100, 'Training length, in epochs.')
flags.DEFINE_integer('train_steps', 0, 'Training length, in steps; > 0 overrides train_epochs.')
flags.DEFINE_integer('eval_batch_size', 256, 'Global evaluation batch size, in images.')
flags.DEFINE_integer('eval_steps', 0, 'Evaluation steps; 0 = the whole eval split.')
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
                    '(model_dir/saved_model/<step>) to initialize from when model_dir has none.')
flags.DEFINE_bool('start_over', False,
                  'Train from step 0 although model_dir holds checkpoints that cannot be read '
                  '(they are moved to model_dir/discarded-<time>/, not deleted). Without it such '
                  'a model_dir is an error: a run never silently restarts over its own work.')
flags.DEFINE_list('allow_flag_changes', [],
                  'Run-defining flags (loss and its hyperparameters, batch size, seed, data, '
                  'image size, architecture, optimizer) that may differ from the flags.json of '
                  'the run being resumed, e.g. temperature,seed; any other difference is an '
                  'error. Every start is recorded in model_dir/flags_history.jsonl.')
flags.DEFINE_integer('seed', 0, 'Seed of initialization, data order and augmentations.')
flags.DEFINE_bool('deterministic', False,
                  'Deterministic ops and input order (slower): the same run twice gives the '
                  'same weights.')
flags.DEFINE_float('log_every_seconds', 5.0, 'Seconds of training between progress lines.')
flags.DEFINE_integer('probe_max_examples', 20_000,
                     'After pretraining, fit a logistic-regression probe on frozen features when '
                     'the train split has at most this many images (0 = never).')
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


def resolve_loss(loss, aliases):
  """The canonical loss from --loss and the alias flags; disagreeing flags are an error.

  aliases: {flag name: True/False/None}, True meaning SogCLR.
  """
  chosen = {}
  if loss is not None:
    chosen['loss'] = loss
  for name, value in aliases.items():
    if value is not None:
      chosen[name] = 'sogclr' if value else 'simclr'
  if len(set(chosen.values())) > 1:
    given = ', '.join(f'--{k}={v}' for k, v in chosen.items())
    raise ValueError(f'Conflicting loss flags ({given}); set them to agree or keep only one')
  return next(iter(chosen.values()), 'sogclr')


def validate_flags(values):
  """Cross-flag checks of the flag values (a dict), before anything is built."""
  v = types.SimpleNamespace(**values)
  if not v.model_dir:
    raise ValueError('--model_dir is required (checkpoints, summaries and flags.json go there)')
  if v.temperature <= 0:
    raise ValueError(f'--temperature must be positive, got {v.temperature}')
  if not 0 < v.gamma <= 1:
    raise ValueError(f'--gamma must be in (0, 1], got {v.gamma}')
  _check_objective(values)
  if not 0 < v.crop_area_min <= 1:
    raise ValueError(f'--crop_area_min must be in (0, 1], got {v.crop_area_min}')
  if v.width_multiplier <= 0:
    raise ValueError(f'--width_multiplier must be positive, got {v.width_multiplier}')
  for name in ('train_batch_size', 'eval_batch_size', 'image_size', 'keep_checkpoint_max',
               'knn_k'):
    if values[name] <= 0:
      raise ValueError(f'--{name} must be positive, got {values[name]}')
  _check_ranges(values)
  if v.knn_temperature <= 0:
    raise ValueError(f'--knn_temperature must be positive, got {v.knn_temperature}')
  if v.keep_hub_module_max < 0:
    raise ValueError(f'--keep_hub_module_max must be >= 0 (0 = no export), got '
                     f'{v.keep_hub_module_max}')
  if v.train_mode == 'finetune' and v.mode != 'eval' and not v.checkpoint:
    logging.warning('--train_mode=finetune without --checkpoint trains from scratch.')
  # The standard stem divides the image by 32, the CIFAR stem by 8.
  min_size = 8 if v.image_size <= data_lib.SMALL_IMAGE_SIZE else 32
  if v.image_size < min_size:
    raise ValueError(f'--image_size={v.image_size} is too small for the ResNet '
                     f'(at least {min_size} px)')


def _check_objective(values):
  """The gamma schedule's and iSogCLR's flags."""
  v = types.SimpleNamespace(**values)
  if v.gamma_schedule == 'cosine' and v.gamma_decay_epochs <= 0:
    raise ValueError('--gamma_decay_epochs must be > 0 with --gamma_schedule=cosine, got '
                     f'{v.gamma_decay_epochs}')
  if v.gamma_decay_epochs < 0:
    raise ValueError(f'--gamma_decay_epochs must be >= 0, got {v.gamma_decay_epochs}')
  if v.isogclr_rho < 0:
    raise ValueError(f'--isogclr_rho must be >= 0, got {v.isogclr_rho}')
  if v.isogclr_eta <= 0:
    raise ValueError(f'--isogclr_eta must be > 0, got {v.isogclr_eta}')
  if not 0 < v.isogclr_beta <= 1:
    raise ValueError(f'--isogclr_beta must be in (0, 1], got {v.isogclr_beta}')
  if v.isogclr_tau_min <= 0:
    raise ValueError(f'--isogclr_tau_min must be > 0, got {v.isogclr_tau_min}')
  if v.isogclr_tau_max < v.isogclr_tau_min:
    raise ValueError(f'--isogclr_tau_max={v.isogclr_tau_max} is below '
                     f'--isogclr_tau_min={v.isogclr_tau_min}')
  loss = resolve_loss(v.loss, {'DCL_mode': v.DCL_mode, 'GCL_mode': v.GCL_mode,
                               'BI_mode': v.BI_mode})
  if loss == 'isogclr' and not v.isogclr_tau_min <= v.temperature <= v.isogclr_tau_max:
    raise ValueError(f'--temperature={v.temperature} (the initial temperature of iSogCLR) must '
                     f'be within [--isogclr_tau_min, --isogclr_tau_max] = '
                     f'[{v.isogclr_tau_min}, {v.isogclr_tau_max}]')


# (flag, lowest allowed, whether the lowest is excluded): numbers outside make no sense.
RANGES = (
    ('learning_rate', 0, True), ('weight_decay', 0, False), ('momentum', 0, False),
    ('warmup_epochs', 0, False), ('train_epochs', 0, False), ('train_steps', 0, False),
    ('eval_steps', 0, False), ('eval_timeout_seconds', 0, False), ('checkpoint_steps', 0, False),
    ('checkpoint_epochs', 1, False), ('num_classes', 0, False), ('label_offset', 0, False),
    ('shuffle_buffer', 1, False),
    ('color_jitter_strength', 0, False), ('sk_ratio', 0, False), ('se_ratio', 0, False),
    ('proj_out_dim', 1, False), ('num_proj_layers', 0, False), ('log_every_seconds', 0, False),
    ('probe_max_examples', 0, False), ('batch_norm_decay', 0, False),
    ('eval_every_epochs', 0, False), ('eval_every_steps', 0, False),
    ('fine_tune_after_block', -1, False))


def _check_ranges(values):
  for name, lowest, excluded in RANGES:
    value = values[name]
    if value < lowest or (excluded and value == lowest):
      bound = f'> {lowest}' if excluded else f'>= {lowest}'
      raise ValueError(f'--{name} must be {bound}, got {value}')
  for name in ('momentum', 'batch_norm_decay'):
    if values[name] >= 1:
      raise ValueError(f'--{name} must be < 1, got {values[name]}')
  if values['fine_tune_after_block'] > 4:
    raise ValueError(f'--fine_tune_after_block must be in [-1, 4], got '
                     f'{values["fine_tune_after_block"]}')
  if not values['train_steps'] and not values['train_epochs'] and values['mode'] != 'eval':
    raise ValueError('--train_epochs=0 trains nothing; give --train_epochs or --train_steps > 0')


# Flags that define the network (and so the checkpoint's variables).
ARCHITECTURE_FLAGS = ('resnet_depth', 'width_multiplier', 'sk_ratio', 'se_ratio', 'image_size',
                      'proj_head_mode', 'num_proj_layers', 'proj_out_dim')


# Further flags an evaluation depends on: which heads the model has and which variables train
# (so eval/regularization_loss), the data, the weight decay and the training length (the final
# step, after which --mode=eval exits).
EVAL_FLAGS = ('train_mode', 'lineareval_while_pretraining', 'ft_proj_selector',
              'fine_tune_after_block', 'num_classes', 'label_offset', 'dataset', 'data_dir',
              'train_split', 'eval_split', 'weight_decay', 'train_batch_size', 'train_epochs',
              'train_steps', 'mixed_precision', 'supervised_head_bn')


def inherit_flags(values, given, path, names=ARCHITECTURE_FLAGS):
  """The flag values (a dict) with the flags `names` not `given` on the command line taken
  from the training run's flags.json in directory `path` (or next to checkpoint prefix `path`;
  an export holds one), so fine-tuning needs only --checkpoint and --mode=eval only --model_dir.
  """
  trained, flags_file = checkpoints.read_flags(path)
  if trained is None:
    return values
  values = dict(values)
  for name in names:
    if name not in given and name in trained and values[name] != trained[name]:
      logging.info('--%s=%s from %s', name, trained[name], flags_file)
      values[name] = trained[name]
  return values


def flag_values():
  """({flag name: value} of every flag defined in this file, the names given on the command
  line)."""
  defined = FLAGS.get_flags_for_module(sys.modules[__name__])
  return {f.name: f.value for f in defined}, {f.name for f in defined if f.present}


def build_config(values):
  """The frozen experiment config of the (validated) flag values."""
  v = types.SimpleNamespace(**values)
  loss = resolve_loss(v.loss, {'DCL_mode': v.DCL_mode, 'GCL_mode': v.GCL_mode,
                               'BI_mode': v.BI_mode})
  return experiment.Config(
      model_dir=v.model_dir, mode=v.mode, train_mode=v.train_mode, checkpoint=v.checkpoint,
      start_over=v.start_over, allow_flag_changes=tuple(v.allow_flag_changes),
      data=data_lib.DataConfig(
          dataset=v.dataset, data_dir=v.data_dir, train_split=v.train_split,
          eval_split=v.eval_split, num_classes=v.num_classes, label_offset=v.label_offset,
          image_size=v.image_size,
          shuffle_buffer=v.shuffle_buffer, cache_dataset=v.cache_dataset,
          color_jitter_strength=v.color_jitter_strength, crop_area_min=v.crop_area_min,
          random_flip=v.random_flip, use_blur=v.use_blur, augment_on=v.augment_on),
      model=model_lib.ModelConfig(
          resnet_depth=v.resnet_depth, width_multiplier=v.width_multiplier,
          cifar_stem=v.image_size <= data_lib.SMALL_IMAGE_SIZE, sk_ratio=v.sk_ratio,
          se_ratio=v.se_ratio, batch_norm_decay=v.batch_norm_decay, global_bn=v.global_bn,
          proj_head_mode=v.proj_head_mode, num_proj_layers=v.num_proj_layers,
          proj_out_dim=v.proj_out_dim, num_classes=v.num_classes, train_mode=v.train_mode,
          lineareval_while_pretraining=v.lineareval_while_pretraining,
          ft_proj_selector=v.ft_proj_selector, fine_tune_after_block=v.fine_tune_after_block,
          zero_init_logits_layer=v.zero_init_logits_layer,
          supervised_head_bn=v.supervised_head_bn),
      objective=trainer_lib.ObjectiveConfig(
          loss=loss, temperature=v.temperature, gamma=v.gamma, gamma_schedule=v.gamma_schedule,
          gamma_decay_epochs=v.gamma_decay_epochs, hidden_norm=v.hidden_norm,
          isogclr_rho=v.isogclr_rho, isogclr_eta=v.isogclr_eta, isogclr_beta=v.isogclr_beta,
          isogclr_tau_min=v.isogclr_tau_min, isogclr_tau_max=v.isogclr_tau_max),
      optimizer=trainer_lib.OptimizerConfig(
          name=v.optimizer, learning_rate=v.learning_rate,
          learning_rate_scaling=v.learning_rate_scaling, warmup_epochs=v.warmup_epochs,
          weight_decay=v.weight_decay, momentum=v.momentum),
      loop=trainer_lib.LoopConfig(
          train_batch_size=v.train_batch_size, train_epochs=v.train_epochs,
          train_steps=v.train_steps, checkpoint_epochs=v.checkpoint_epochs,
          checkpoint_steps=v.checkpoint_steps, keep_checkpoint_max=v.keep_checkpoint_max,
          keep_hub_module_max=v.keep_hub_module_max, seed=v.seed,
          deterministic=v.deterministic, log_every_seconds=v.log_every_seconds,
          eval_every_epochs=v.eval_every_epochs, eval_every_steps=v.eval_every_steps),
      eval=evaluation.EvalConfig(
          eval_batch_size=v.eval_batch_size, eval_steps=v.eval_steps, eval_name=v.eval_name,
          eval_timeout_seconds=v.eval_timeout_seconds,
          probe_max_examples=v.probe_max_examples, probe_baselines=v.probe_baselines,
          knn_monitor=v.knn_monitor, knn_k=v.knn_k, knn_temperature=v.knn_temperature),
      distribution=distribution.DistributionConfig(
          use_tpu=v.use_tpu, tpu_name=v.tpu_name, tpu_zone=v.tpu_zone,
          gcp_project=v.gcp_project, master=v.master, mixed_precision=v.mixed_precision,
          jit_compile=v.jit_compile),
      flags=types.MappingProxyType(dict(values)))


def config_from_flags():
  """The config of the parsed flags, with the flags a training run defines taken from its
  flags.json when not given (--mode=eval: from model_dir; fine-tuning: from --checkpoint)."""
  values, given = flag_values()
  if values['mode'] == 'eval' and values['checkpoint']:  # one checkpoint or export
    values = inherit_flags(values, given, values['checkpoint'], ARCHITECTURE_FLAGS + EVAL_FLAGS)
  elif values['mode'] == 'eval' and values['model_dir']:
    values = inherit_flags(values, given, values['model_dir'], ARCHITECTURE_FLAGS + EVAL_FLAGS)
  elif values['checkpoint'] and values['train_mode'] == 'finetune':
    values = inherit_flags(values, given, values['checkpoint'])
  validate_flags(values)
  return build_config(values)


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
  # TF prefixes errors raised inside functions with the function's name.
  line = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', lines[0])
  if isinstance(error, tf.errors.OpError):
    line = f'{type(error).__name__}: {line}'
  return re.sub(r'\s*\[Op:[^\]]*\]( name:[^\s);]*)?', '', line)


# 128 + the signal, as a shell reports a process ended by it: schedulers see "interrupted".
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT


def cli(argv):
  """main() with one-line errors for bad input (non-zero exit, nothing written is touched)."""
  del argv
  debug = FLAGS.debug or os.environ.get('SOGCLR_DEBUG', '') not in ('', '0')
  try:
    config = config_from_flags()
    results = experiment.run(config)
  except trainer_lib.Preempted as e:
    logging.warning('%s', e)
    print(f'preempted: {e}', file=sys.stderr)
    sys.exit(128 + e.signal_number)
  except KeyboardInterrupt:
    print('interrupted: stopped by Ctrl-C; nothing was saved since the last checkpoint',
          file=sys.stderr)
    sys.exit(INTERRUPTED_EXIT_CODE)
  except (ValueError, FloatingPointError, OSError, tf.errors.OpError) as e:
    if debug:
      raise
    line = one_line_error(e)
    if isinstance(e, tf.errors.UnavailableError) and (
        'task' in line or 'Collective ops is aborted' in line):
      line += ('; a worker of this job stopped: restart every worker with the same command '
               '(each resumes from the newest checkpoint)')
    logging.error('%s', line)
    print(f'error: {line}', file=sys.stderr)
    sys.exit(1)
  print(experiment.summary_line(results, config.data.eval_split))


if __name__ == '__main__':
  app.run(cli)
