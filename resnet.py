"""ResNet v1 trunk as in SimCLR v2 (optional selective kernels and squeeze-excitation), NHWC.

Layer names are the checkpoint format; `fine_tune_after_block` freezes the stem and early groups.
"""
import functools

import tensorflow as tf

# depth -> (block type, blocks per group); bottleneck blocks output 4x their filters. ResNet-10
# (one basic block per group) is not in SimCLR's table: the smallest trunk, for quick runs on a
# CPU and the tests (half the layers of ResNet-18 to build and trace).
_ARCHITECTURES = {
    10: ('basic', (1, 1, 1, 1)),
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
    200: ('bottleneck', (3, 24, 36, 3)),
}
_GROUP_FILTERS = (64, 128, 256, 512)
_GROUP_STRIDES = (1, 2, 2, 2)
_NUM_GROUPS = len(_GROUP_FILTERS)
_BOTTLENECK_EXPANSION = 4
# SimCLR v2 keeps the selective-kernel attention bottleneck at least this wide.
_SK_MIN_DIM = 32


def _channels(filters, width_multiplier):
  return max(1, int(round(filters * width_multiplier)))


class BatchNormalization(tf.keras.layers.BatchNormalization):
  """Keras BatchNormalization on NHWC images, computed by TensorFlow's fused kernel.

  Keras 3 normalizes with separate moments and elementwise ops (several passes over the
  activations); the fused kernel takes one pass forward and one backward, and made the train
  step markedly faster on CPU (bench/train_step.py). Same math and variables as Keras' layer:
  batch statistics with the biased variance in training, moving averages updated with
  `momentum`, the moving statistics at inference.

  Synchronized over several replicas, the statistics take two all-reduces: the mean, then the
  centered sum of squares. Keras' one-pass E[x^2] - E[x]^2 loses float32 digits on post-ReLU
  activations, which made 2 replicas drift from 1 replica on the same global batch.
  """

  def call(self, inputs, training=None, mask=None):
    if inputs.shape.rank != 4 or self.axis not in (-1, 3) or mask is not None:
      return super().call(inputs, training=training, mask=mask)
    x = inputs
    if x.dtype not in (tf.float32, tf.bfloat16, tf.float16):
      x = tf.cast(x, tf.float32)
    channels = x.shape[-1]
    gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels])
    beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels])
    if not (training and self.trainable):
      y = tf.raw_ops.FusedBatchNormV3(
          x=x, scale=gamma, offset=beta, mean=tf.cast(self.moving_mean, tf.float32),
          variance=tf.cast(self.moving_variance, tf.float32), epsilon=self.epsilon,
          is_training=False)[0]
      return tf.cast(y, self.compute_dtype)
    replica_context = tf.distribute.get_replica_context()
    if (self.synchronized and replica_context is not None and
        replica_context.num_replicas_in_sync > 1):
      mean, variance = self._synchronized_moments(tf.cast(x, tf.float32), replica_context)
      y = tf.nn.batch_normalization(tf.cast(x, tf.float32), mean, variance, beta, gamma,
                                    self.epsilon)
    else:
      y, mean, variance = tf.raw_ops.FusedBatchNormV3(
          x=x, scale=gamma, offset=beta, mean=tf.zeros([0]), variance=tf.zeros([0]),
          epsilon=self.epsilon, is_training=True)[:3]
      # The kernel returns the unbiased variance; Keras tracks the biased one.
      count = tf.cast(tf.size(x, tf.int64) // channels, tf.float32)
      variance *= (count - 1.0) / tf.maximum(count, 1.0)
    decay = tf.cast(self.momentum, tf.float32)
    self.moving_mean.assign(self.moving_mean * decay + mean * (1.0 - decay))
    self.moving_variance.assign(self.moving_variance * decay + variance * (1.0 - decay))
    return tf.cast(y, self.compute_dtype)

  @staticmethod
  def _synchronized_moments(x, replica_context):
    """Mean and biased variance over every replica's batch (float32 x [B, H, W, C])."""
    sum_ = tf.distribute.ReduceOp.SUM
    count = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), tf.float32)
    totals = replica_context.all_reduce(
        sum_, tf.concat([tf.reduce_sum(x, [0, 1, 2]), count[None]], 0))
    total_count = totals[-1]
    mean = totals[:-1] / total_count
    squares = replica_context.all_reduce(
        sum_, tf.reduce_sum(tf.square(x - mean), [0, 1, 2]))
    return mean, squares / total_count


class Conv2DFixedPadding(tf.keras.layers.Conv2D):
  """Bias-free Conv2D padding (k-1)//2 before and the rest after, whatever the stride, as SimCLR.

  Keras 'same' padding would pad strided convs depending on the input size, so strided convs
  pad explicitly; unstrided ones use 'same', which pads exactly the same here and spares a
  padded copy of the activations.
  """

  def __init__(self, filters, kernel_size, strides=1, *, name):
    super().__init__(
        filters, kernel_size, strides=strides, padding='same' if strides == 1 else 'valid',
        use_bias=False, kernel_initializer=tf.keras.initializers.VarianceScaling(), name=name)

  def _explicit_padding(self):
    return 0 if self.padding == 'same' else self.kernel_size[0] - 1

  def convolution_op(self, inputs, kernel):
    if tuple(self.kernel_size) != (1, 1) or tuple(self.strides) != (1, 1):
      return super().convolution_op(inputs, kernel)
    # An unstrided 1x1 convolution is a matmul over the pixels. oneDNN's matmul and its
    # gradients beat its 1x1 convolution, the weight gradient by up to 2.5x on small images
    # (bench/train_step.py; docs/performance.md).
    flat = tf.matmul(tf.reshape(inputs, [-1, inputs.shape[-1]]), kernel[0, 0])
    if None in inputs.shape[1:3]:
      return tf.reshape(flat, tf.concat([tf.shape(inputs)[:3], [self.filters]], 0))
    return tf.reshape(flat, [-1, *inputs.shape[1:3], self.filters])

  def call(self, inputs):
    total = self._explicit_padding()
    if total:
      begin = total // 2
      inputs = tf.pad(inputs, [[0, 0], [begin, total - begin], [begin, total - begin],
                               [0, 0]])
    return super().call(inputs)

  def compute_output_shape(self, input_shape):
    total = self._explicit_padding()
    padded = [None if d is None else d + total for d in input_shape[1:3]]
    return super().compute_output_shape((input_shape[0], *padded, input_shape[3]))


class SelectiveKernel(tf.keras.layers.Layer):
  """SimCLR v2 selective-kernel 3x3 conv + BN-ReLU: two branches mixed by softmax attention."""

  def __init__(self, filters, strides, sk_ratio, norm, *, name):
    super().__init__(name=name)
    # One conv with 2x filters computes both branches; they are split afterwards.
    self.branches_conv = Conv2DFixedPadding(2 * filters, 3, strides, name='branches_conv')
    self.branches_bn = norm(name='branches_bn')
    mid = max(int(filters * sk_ratio), _SK_MIN_DIM)
    self.reduce_conv = Conv2DFixedPadding(mid, 1, name='reduce_conv')
    self.reduce_bn = norm(name='reduce_bn')
    self.expand_conv = Conv2DFixedPadding(2 * filters, 1, name='expand_conv')

  def call(self, x, training=False):
    x = tf.nn.relu(self.branches_bn(self.branches_conv(x), training=training))
    branches = tf.stack(tf.split(x, 2, axis=-1), axis=0)  # [2, B, H, W, C]
    context = tf.reduce_mean(tf.reduce_sum(branches, axis=0), axis=[1, 2], keepdims=True)
    context = tf.nn.relu(self.reduce_bn(self.reduce_conv(context), training=training))
    logits = tf.stack(tf.split(self.expand_conv(context), 2, axis=-1), axis=0)  # [2, B, 1, 1, C]
    return tf.reduce_sum(tf.nn.softmax(logits, axis=0) * branches, axis=0)


class SqueezeExcitation(tf.keras.layers.Layer):
  """Channel gating sigmoid(expand(relu(reduce(mean_hw(x))))) * x, bias-free like the rest."""

  def __init__(self, filters, out_channels, se_ratio, *, name):
    super().__init__(name=name)
    self.reduce_conv = Conv2DFixedPadding(max(1, int(filters * se_ratio)), 1, name='reduce_conv')
    self.expand_conv = Conv2DFixedPadding(out_channels, 1, name='expand_conv')

  def call(self, x):
    gate = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    gate = self.expand_conv(tf.nn.relu(self.reduce_conv(gate)))
    return tf.sigmoid(gate) * x


class _Chain(tf.keras.layers.Layer):
  """Base for layers that run sublayers in order.

  Each sublayer is an attribute named after the layer, not a list entry: tf.train.Checkpoint
  does not follow Keras 3's tracked lists, and the names make the checkpoint keys.
  """

  def _chain(self, layers):
    for layer in layers:
      assert not hasattr(self, layer.name), f'{layer.name!r} would shadow an attribute'
      setattr(self, layer.name, layer)
    return tuple(layer.name for layer in layers)

  def _run(self, names, x, training):
    for name in names:
      x = getattr(self, name)(x, training=training)
    return x


class Block(_Chain):
  """Residual block, basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1); relu(branch(x) + shortcut)."""

  def __init__(self, kind, filters, strides, in_channels, sk_ratio, se_ratio, norm, *, name):
    super().__init__(name=name)
    out_channels = filters * (_BOTTLENECK_EXPANSION if kind == 'bottleneck' else 1)
    self.out_channels = out_channels
    shortcut = []
    # Projection only where shapes change (torchvision counts); SimCLR also projects in group 1.
    if strides != 1 or in_channels != out_channels:
      if sk_ratio > 0 and strides > 1:
        # ResNet-D shortcut (SimCLR v2): average-pool, then an unstrided 1x1 conv.
        shortcut += [tf.keras.layers.AveragePooling2D(2, strides, padding='same',
                                                      name='shortcut_pool'),
                     Conv2DFixedPadding(out_channels, 1, name='shortcut_conv')]
      else:
        shortcut.append(Conv2DFixedPadding(out_channels, 1, strides, name='shortcut_conv'))
      shortcut.append(norm(name='shortcut_bn'))

    def conv3x3_bn_relu(prefix, strides):
      if sk_ratio > 0:
        return [SelectiveKernel(filters, strides, sk_ratio, norm, name=f'{prefix}_sk')]
      return [Conv2DFixedPadding(filters, 3, strides, name=f'{prefix}_conv'),
              norm(name=f'{prefix}_bn'), tf.keras.layers.ReLU(name=f'{prefix}_relu')]

    # The last BN starts at gamma = 0 (SimCLR's init_zero), so each block starts as identity.
    if kind == 'bottleneck':
      branch = [Conv2DFixedPadding(filters, 1, name='a_conv'), norm(name='a_bn'),
                tf.keras.layers.ReLU(name='a_relu'),
                *conv3x3_bn_relu('b', strides),
                Conv2DFixedPadding(out_channels, 1, name='c_conv'),
                norm(gamma_initializer='zeros', name='c_bn')]
    else:
      branch = [*conv3x3_bn_relu('a', strides),
                Conv2DFixedPadding(filters, 3, name='b_conv'),
                norm(gamma_initializer='zeros', name='b_bn')]
    if se_ratio > 0:
      branch.append(SqueezeExcitation(filters, out_channels, se_ratio, name='se'))
    self._shortcut = self._chain(shortcut)
    self._branch = self._chain(branch)

  def call(self, x, training=False):
    shortcut = self._run(self._shortcut, x, training)
    return tf.nn.relu(self._run(self._branch, x, training) + shortcut)


class Stem(_Chain):
  """CIFAR stem (3x3/1 conv), ImageNet stem (7x7/2 conv + 3x3/2 max-pool), or SK's 3-conv stem."""

  def __init__(self, width_multiplier, cifar_stem, sk_ratio, norm, *, name='stem'):
    super().__init__(name=name)
    out_channels = _channels(64, width_multiplier)
    if cifar_stem:
      convs = [('stem', out_channels, 3, 1)]
    elif sk_ratio > 0:
      # SimCLR v2's deep stem: three 3x3 convs replace the 7x7.
      half = _channels(32, width_multiplier)
      convs = [('stem1', half, 3, 2), ('stem2', half, 3, 1), ('stem3', out_channels, 3, 1)]
    else:
      convs = [('stem', out_channels, 7, 2)]
    layers = []
    for prefix, filters, kernel_size, strides in convs:
      layers += [Conv2DFixedPadding(filters, kernel_size, strides, name=f'{prefix}_conv'),
                 norm(name=f'{prefix}_bn'), tf.keras.layers.ReLU(name=f'{prefix}_relu')]
    if not cifar_stem:
      layers.append(tf.keras.layers.MaxPooling2D(3, 2, padding='same', name='stem_pool'))
    self._layers_in_order = self._chain(layers)

  def call(self, x, training=False):
    return self._run(self._layers_in_order, x, training)


class BlockGroup(_Chain):
  """A stage of residual blocks; the first one carries the stride (and projection)."""

  def __init__(self, blocks, *, name):
    super().__init__(name=name)
    self._blocks = self._chain(blocks)

  def call(self, x, training=False):
    return self._run(self._blocks, x, training)


class ResNet(_Chain):
  """ResNet v1 trunk: images [B, H, W, 3] float -> globally average-pooled features [B, output_dim].

  Features come back in the layer's compute dtype (bfloat16 under 'mixed_bfloat16').
  Parts are [stem, group1, ..., group4]; parts up to `fine_tune_after_block` are frozen once built.
  """

  def __init__(self, stem, groups, output_dim, fine_tune_after_block, *, name):
    super().__init__(name=name)
    self._parts = self._chain([stem, *groups])
    self.output_dim = output_dim
    self.fine_tune_after_block = fine_tune_after_block

  def build(self, input_shape):
    # Variables created after `trainable = False` would still count as trainable for the
    # parent model, so create them all first (by tracing `call`) and freeze afterwards.
    self.compute_output_spec(tf.keras.KerasTensor(input_shape))
    for name in self._parts[:self.fine_tune_after_block + 1]:
      getattr(self, name).trainable = False

  def call(self, images, training=False):
    x = images
    for index, name in enumerate(self._parts):
      x = getattr(self, name)(x, training=training)
      if index == self.fine_tune_after_block:
        # Frozen layers need no backprop; this also spares the memory of it.
        x = tf.stop_gradient(x)
    return tf.reduce_mean(x, axis=[1, 2])


# The depths resnet() builds.
DEPTHS = tuple(sorted(_ARCHITECTURES))


def resnet(depth, *, width_multiplier=1.0, cifar_stem=False, sk_ratio=0.0, se_ratio=0.0,
           bn_momentum=0.9, bn_epsilon=1e-5, sync_bn=False, fine_tune_after_block=-1,
           name='resnet'):
  """Builds a ResNet trunk; output_dim is 512*wm (depth 10, 18, 34) or 2048*wm (depth >= 50).

  fine_tune_after_block: -1 trains everything, 0 freezes the stem, k in 1..4 also groups 1..k.
  """
  if depth not in _ARCHITECTURES:
    raise ValueError(f'Unknown ResNet depth {depth!r}; expected one of {sorted(_ARCHITECTURES)}.')
  if not -1 <= fine_tune_after_block <= _NUM_GROUPS:
    raise ValueError(f'fine_tune_after_block={fine_tune_after_block!r} is out of range; expected '
                     f'-1 (train all), 0 (freeze stem) or 1..{_NUM_GROUPS} (also freeze groups).')
  kind, group_sizes = _ARCHITECTURES[depth]
  norm = functools.partial(BatchNormalization, momentum=bn_momentum,
                           epsilon=bn_epsilon, synchronized=sync_bn)
  stem = Stem(width_multiplier, cifar_stem, sk_ratio, norm)
  channels = _channels(64, width_multiplier)
  groups = []
  for g, (filters, num_blocks, strides) in enumerate(
      zip(_GROUP_FILTERS, group_sizes, _GROUP_STRIDES), start=1):
    blocks = []
    for b in range(num_blocks):
      block = Block(kind, _channels(filters, width_multiplier), strides if b == 0 else 1,
                    channels, sk_ratio, se_ratio, norm, name=f'block{b + 1}')
      channels = block.out_channels
      blocks.append(block)
    groups.append(BlockGroup(blocks, name=f'group{g}'))
  return ResNet(stem, groups, channels, fine_tune_after_block, name=name)
