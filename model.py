"""The full network: ResNet trunk, projection head and the supervised (linear) head."""
import dataclasses

import tensorflow as tf

import resnet
import schema


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of the network; `run.py` fills it from flags."""
  resnet_depth: int = schema.setting(50, architecture=True)
  width_multiplier: float = schema.setting(1.0, architecture=True, allowed=schema.above(0))
  cifar_stem: bool = False
  sk_ratio: float = schema.setting(0.0, architecture=True, allowed=schema.at_least(0))
  se_ratio: float = schema.setting(0.0, architecture=True, allowed=schema.at_least(0))
  # Inherited by --mode=eval for the warning of evaluations before the statistics settle.
  batch_norm_decay: float = schema.setting(0.9, eval_inherits=True,
                                          allowed=schema.Range(0, 1, high_open=True))
  global_bn: bool = True
  # 'none' | 'linear' | 'nonlinear'
  proj_head_mode: str = schema.setting('nonlinear', architecture=True)
  num_proj_layers: int = schema.setting(3, architecture=True, allowed=schema.at_least(0))
  proj_out_dim: int = schema.setting(128, architecture=True, allowed=schema.at_least(1))
  num_classes: int = 1000
  train_mode: str = 'pretrain'        # 'pretrain' | 'finetune'
  lineareval_while_pretraining: bool = schema.setting(True, defines_run=True, eval_inherits=True)
  ft_proj_selector: int = schema.setting(0, defines_run=True, eval_inherits=True)
  fine_tune_after_block: int = schema.setting(-1, defines_run=True, eval_inherits=True,
                                              allowed=schema.Range(-1, 4))
  zero_init_logits_layer: bool = False
  supervised_head_bn: bool = schema.setting(True, defines_run=True, eval_inherits=True)

  def __post_init__(self):
    if self.proj_head_mode not in ('none', 'linear', 'nonlinear'):
      raise ValueError(f"Unknown proj_head_mode {self.proj_head_mode!r}; expected one of "
                       "'none', 'linear', 'nonlinear'")
    if self.train_mode not in ('pretrain', 'finetune'):
      raise ValueError(f"Unknown train_mode {self.train_mode!r}; expected 'pretrain' or 'finetune'")
    if self.num_proj_layers < 0:
      raise ValueError(f'--num_proj_layers must be >= 0, got {self.num_proj_layers}')
    layers = self.projection_layers
    if not (self.ft_proj_selector == -1 or 0 <= self.ft_proj_selector <= layers):
      raise ValueError(
          f'--ft_proj_selector={self.ft_proj_selector} selects beyond the projection head\'s '
          f'{layers} layer(s) (--proj_head_mode={self.proj_head_mode}, --num_proj_layers='
          f'{self.num_proj_layers}); use 0 (trunk features) to {layers}, or -1 (the last)')

  @property
  def projection_layers(self):
    """Dense layers of the projection head: 0 makes the projection the trunk features."""
    return {'none': 0, 'linear': 1, 'nonlinear': self.num_proj_layers}[self.proj_head_mode]


class ProjectionHead(tf.keras.layers.Layer):
  """SimCLR's projection head; also returns every intermediate output for `ft_proj_selector`.

  A fine-tuning model holds only the layers its linear head reads (the first `ft_proj_selector`,
  all of them for -1): the others would never be called (Keras warns of a layer whose sublayers
  are never built) and never hold variables.
  """

  def __init__(self, config, input_dim, name='projection_head'):
    super().__init__(name=name)
    self.mode = config.proj_head_mode
    self.num_layers = config.projection_layers
    used = (self.num_layers if config.train_mode == 'pretrain' or config.ft_proj_selector < 0
            else config.ft_proj_selector)
    for j in range(used):
      last = j == self.num_layers - 1
      # Attributes, not a list: tf.train.Checkpoint does not see Keras 3 layers held in lists.
      setattr(self, f'proj_{j}_dense', tf.keras.layers.Dense(
          config.proj_out_dim if last else input_dim, use_bias=False,
          kernel_initializer=tf.keras.initializers.RandomNormal(stddev=0.01),
          name=f'proj_{j}_dense'))
      # The last layer has no offset: a bias before the normalised loss only shifts every
      # projection alike (SimCLR's choice).
      setattr(self, f'proj_{j}_bn', tf.keras.layers.BatchNormalization(
          momentum=config.batch_norm_decay, epsilon=1e-5, center=not last,
          synchronized=config.global_bn, name=f'proj_{j}_bn'))

  def call(self, features, training=False, num_layers=None):
    """Returns (projection, hiddens): hiddens[0] is the input, hiddens[j] layer j's output.

    num_layers: run only the first layers (fine-tuning on an intermediate output).
    """
    hiddens = [features]
    x = features
    for j in range(self.num_layers if num_layers is None else num_layers):
      dense, bn = getattr(self, f'proj_{j}_dense'), getattr(self, f'proj_{j}_bn')
      x = bn(dense(x), training=training)
      if self.mode == 'nonlinear' and j != self.num_layers - 1:
        x = tf.nn.relu(x)
      hiddens.append(x)
    return x, hiddens


class ContrastiveModel(tf.keras.Model):
  """Trunk + projection head + linear head; `call` returns a dict of named outputs."""

  def __init__(self, config, name='contrastive_model'):
    super().__init__(name=name)
    self.config = config
    self.trunk = resnet.resnet(
        config.resnet_depth, width_multiplier=config.width_multiplier,
        cifar_stem=config.cifar_stem, sk_ratio=config.sk_ratio, se_ratio=config.se_ratio,
        bn_momentum=config.batch_norm_decay, sync_bn=config.global_bn,
        fine_tune_after_block=config.fine_tune_after_block, name='resnet')
    self.projection_head = ProjectionHead(config, self.trunk.output_dim)
    self.has_supervised_head = (config.train_mode == 'finetune' or
                                config.lineareval_while_pretraining)
    if self.has_supervised_head:
      initializer = (tf.keras.initializers.Zeros() if config.zero_init_logits_layer
                     else tf.keras.initializers.RandomNormal(stddev=0.01))
      self.supervised_head = tf.keras.layers.Dense(
          config.num_classes, kernel_initializer=initializer, name='supervised_head')
      if config.supervised_head_bn:
        # Standardizes the features the linear head sees (a fixed affine map at inference, so
        # the head stays a linear classifier), as MAE and MoCo v3 do for linear probing.
        self.supervised_head_bn = tf.keras.layers.BatchNormalization(
            momentum=config.batch_norm_decay, epsilon=1e-5, center=False, scale=False,
            synchronized=config.global_bn, name='supervised_head_bn')

  def named_layers(self):
    """{name: layer} of the model's parts, under the names its checkpoints give them."""
    names = ('trunk', 'projection_head', 'supervised_head', 'supervised_head_bn')
    return {name: getattr(self, name) for name in names if hasattr(self, name)}

  def call(self, images, training=False):
    """images: [N, H, W, 3] in [0, 1] -> dict of float32 tensors.

    'features' [N, C] trunk output; 'projection' [N, proj_out_dim] (absent in finetune mode);
    'supervised_logits' [N, num_classes] when the model has a linear head.
    """
    features = self.trunk(images, training=training)
    outputs = {'features': tf.cast(features, tf.float32)}
    # The linear head reads hiddens[ft_proj_selector]: 0 the trunk features, j the output of
    # projection layer j, -1 the last (the trunk features with no projection layers), as in
    # SimCLR and the official SogCLR code, while pretraining as when fine-tuning.
    selector = self.config.ft_proj_selector
    if self.config.train_mode == 'pretrain':
      projection, hiddens = self.projection_head(features, training=training)
      outputs['projection'] = tf.cast(projection, tf.float32)
      # The linear head must not shape the representation it evaluates.
      head_inputs = tf.stop_gradient(hiddens[selector])
    else:
      num_layers = self.projection_head.num_layers if selector < 0 else selector
      _, hiddens = self.projection_head(features, training=training, num_layers=num_layers)
      head_inputs = hiddens[selector]
    if self.has_supervised_head:
      if self.config.supervised_head_bn:
        head_inputs = self.supervised_head_bn(head_inputs, training=training)
      outputs['supervised_logits'] = tf.cast(self.supervised_head(head_inputs), tf.float32)
    return outputs


def build_model(config, image_size):
  """The model with its variables created (call under the strategy's scope)."""
  model = ContrastiveModel(config)
  model(tf.zeros([2, image_size, image_size, 3]), training=False)
  return model
