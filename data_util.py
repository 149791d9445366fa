"""SimCLR image augmentations and eval preprocessing, as stateless functions of an explicit seed.

Images are [H, W, 3] float32 in [0, 1] in and out; the same (image, seed) gives the same output
eagerly, inside `tf.data.Dataset.map`, and after a resume.
"""
import dataclasses

import tensorflow as tf

CROP_PROPORTION = 0.875  # Standard ImageNet eval: resize the central 87.5% of the image.


def _split(seed, num):
  """Returns `num` independent [2] seeds derived from `seed`."""
  return tf.unstack(tf.random.experimental.stateless_split(seed, num=num))


def _random_apply(fn, p, image, seed):
  """Returns fn(image) with probability p, else image."""
  coin = tf.random.stateless_uniform([], seed=seed, minval=0.0, maxval=1.0)
  return tf.cond(coin < p, lambda: fn(image), lambda: image)


def to_grayscale(image, keep_channels=True):
  """Luma of an RGB image: [H, W, 3] if keep_channels else [H, W, 1]."""
  image = tf.image.rgb_to_grayscale(image)
  if keep_channels:
    image = tf.tile(image, [1, 1, 3])
  return image


def _random_brightness(image, seed, max_delta):
  # SimCLR v2 scales brightness multiplicatively; tf.image's brightness op is additive (SimCLR v1).
  factor = tf.random.stateless_uniform(
      [], seed=seed, minval=max(1.0 - max_delta, 0.0), maxval=1.0 + max_delta)
  return image * factor


def color_jitter(image, seed, strength, random_order=True, grey=False):
  """Distorts brightness, contrast and saturation (by 0.8 * strength) and hue (by 0.2 * strength).

  Each of the four ops is followed by a clip to [0, 1]; with random_order they run in a random
  permutation. `strength` is a Python float; ops with zero strength are skipped, and so are
  saturation and hue on `grey` images (R = G = B), where they change nothing.
  """
  brightness = contrast = 0.8 * strength
  saturation = 0.0 if grey else 0.8 * strength
  hue = 0.0 if grey else 0.2 * strength
  order_seed, brightness_seed, contrast_seed, saturation_seed, hue_seed = _split(seed, 5)
  # Each op keeps its own seed wherever it lands in the order, so its parameter depends only on
  # `seed`, not on the permutation.
  transforms = [
      lambda x: _random_brightness(x, brightness_seed, brightness) if brightness else x,
      lambda x: (tf.image.stateless_random_contrast(
          x, 1.0 - contrast, 1.0 + contrast, contrast_seed) if contrast else x),
      lambda x: (tf.image.stateless_random_saturation(
          x, 1.0 - saturation, 1.0 + saturation, saturation_seed) if saturation else x),
      lambda x: tf.image.stateless_random_hue(x, hue, hue_seed) if hue else x,
  ]
  if random_order:
    # argsort of i.i.d. uniforms is a uniform random permutation (tf.random.shuffle is stateful).
    order = tf.argsort(tf.random.stateless_uniform([4], seed=order_seed))
  else:
    order = tf.range(4)
  for i in range(4):
    # tf.switch_case calls its branches right away, so they see this iteration's `image`.
    image = tf.switch_case(order[i], [lambda t=t: t(image) for t in transforms])  # noqa: B023
    image = tf.clip_by_value(image, 0.0, 1.0)
  return image


def _random_color_distortion(image, seed, strength, grey=False):
  """SimCLR v2 color distortion: color_jitter with p=0.8, then grayscale with p=0.2.

  On `grey` images it is brightness and contrast jitter with p=0.8, drawn as for colour images:
  saturation, hue and the grayscale conversion leave a grey image as it is, so they are skipped.
  """
  jitter_coin_seed, jitter_seed, gray_coin_seed = _split(seed, 3)
  image = _random_apply(lambda x: color_jitter(x, jitter_seed, strength, grey=grey), 0.8, image,
                        jitter_coin_seed)
  if grey:
    return image
  return _random_apply(to_grayscale, 0.2, image, gray_coin_seed)


def _gaussian_blur(image, kernel_size, sigma):
  """Blurs [H, W, C] with a separable Gaussian of odd size (kernel_size rounded up to odd)."""
  radius = kernel_size // 2
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-tf.square(x) / (2.0 * tf.square(sigma)))
  kernel /= tf.reduce_sum(kernel)
  channels = tf.shape(image)[-1]
  kernel_h = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
  kernel_v = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
  # Reflect padding instead of SimCLR's zero 'SAME' padding, which darkens a radius-wide border.
  padded = tf.pad(image[tf.newaxis], [[0, 0], [radius, radius], [radius, radius], [0, 0]],
                  mode='REFLECT')
  blurred = tf.nn.depthwise_conv2d(padded, kernel_h, strides=[1, 1, 1, 1], padding='VALID')
  blurred = tf.nn.depthwise_conv2d(blurred, kernel_v, strides=[1, 1, 1, 1], padding='VALID')
  return blurred[0]


def random_blur(image, seed, height, p=0.5):
  """With probability p, Gaussian-blurs image with sigma ~ U[0.1, 2.0] and kernel height // 10.

  height is a Python int; below 32 px the kernel would be <= 3 px, so the image is returned as is.
  """
  if height < 32:
    return image
  coin_seed, sigma_seed = _split(seed, 2)

  def blur(x):
    sigma = tf.random.stateless_uniform([], seed=sigma_seed, minval=0.1, maxval=2.0)
    return _gaussian_blur(x, height // 10, sigma)

  return _random_apply(blur, p, image, coin_seed)


def crop_window(image_shape, seed, height, width, area_min):
  """(begin, size) of the random crop of an image of `image_shape` [H, W, C] (SimCLR's
  Inception-style box, at the aspect ratio of height x width)."""
  aspect_ratio = width / height
  # bbox covering the whole image; min_object_covered=0.1 as in SimCLR, so the effective minimum
  # area is max(area_min, 0.1). After 100 failed attempts the op returns the whole image.
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape,
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seed,
      min_object_covered=0.1,
      aspect_ratio_range=(3.0 / 4.0 * aspect_ratio, 4.0 / 3.0 * aspect_ratio),
      area_range=(area_min, 1.0),
      max_attempts=100,
      use_image_if_no_bounding_boxes=True)
  return begin, size


def _random_crop_and_resize(image, seed, height, width, area_min, to_float=True):
  """Crops a random box (SimCLR's Inception-style crop) and resizes it bicubically.

  image: uint8, or float in [0, 1]. Returns [height, width, C] float32, in [0, 1] (about: the
  resize overshoots) when to_float, else in the input's scale.
  """
  begin, size = crop_window(tf.shape(image), seed, height, width, area_min)
  image = tf.slice(image, begin, size)
  if to_float:
    # Converted after the slice: the same values (the conversion is per pixel), on fewer pixels.
    image = tf.image.convert_image_dtype(image, tf.float32)
  return tf.image.resize(image, [height, width], method=tf.image.ResizeMethod.BICUBIC)


def _center_crop(image, height, width, crop_proportion):
  """Crops the central crop_proportion of image at the target aspect ratio; resizes bicubically."""
  shape = tf.shape(image)
  image_height, image_width = shape[0], shape[1]
  image_height_f = tf.cast(image_height, tf.float32)
  image_width_f = tf.cast(image_width, tf.float32)
  aspect_ratio = width / height
  # The crop spans crop_proportion of whichever image side limits the target aspect ratio.
  crop_height, crop_width = tf.cond(
      aspect_ratio > image_width_f / image_height_f,
      lambda: (crop_proportion / aspect_ratio * image_width_f, crop_proportion * image_width_f),
      lambda: (crop_proportion * image_height_f, crop_proportion * aspect_ratio * image_height_f))
  crop_height = tf.cast(tf.math.rint(crop_height), tf.int32)
  crop_width = tf.cast(tf.math.rint(crop_width), tf.int32)
  offset_height = (image_height - crop_height + 1) // 2
  offset_width = (image_width - crop_width + 1) // 2
  image = tf.image.crop_to_bounding_box(image, offset_height, offset_width, crop_height, crop_width)
  return tf.image.resize(image, [height, width], method=tf.image.ResizeMethod.BICUBIC)


def resized_crop(image, seed, height, width, *, crop_area_min=0.08):
  """The host's part of a training view when the step does the rest (`distort_batch`): the
  random crop of preprocess_for_train, resized bicubically, in uint8 scale.

  image: [H, W, 3] uint8 (or float in [0, 1]). Returns [height, width, 3] float32 in about
  [0, 255] (bicubic overshoot is clipped later), not yet flipped: the step scales, clips and
  flips the batch. Resizing the uint8 crop skips a float copy of it; the result differs from
  preprocess_for_train's resize of the float crop only by float round-off.
  """
  crop_seed, _, _, _ = _split(seed, 4)
  if image.dtype != tf.uint8:
    image = tf.image.convert_image_dtype(image, tf.float32) * 255.0
  return tf.ensure_shape(_random_crop_and_resize(image, crop_seed, height, width, crop_area_min,
                                                 to_float=False), [height, width, 3])


def preprocess_for_train(image, seed, height, width, *, color_jitter_strength=1.0,
                         crop_area_min=0.08, flip=True, color_distort=True, blur=False,
                         grey=False):
  """Returns one SimCLR training view of image: [height, width, 3] float32 in [0, 1].

  image: [H, W, 3] uint8 or float in [0, 1]. seed: int32/int64 [2]; each augmentation draws from
  its own sub-seed, so switching one off leaves the others' randomness unchanged. grey: the
  image is grey (R = G = B): the color distortion reduces to brightness and contrast.
  """
  crop_seed, flip_seed, color_seed, blur_seed = _split(seed, 4)
  image = _random_crop_and_resize(image, crop_seed, height, width, crop_area_min)
  image = tf.ensure_shape(image, [height, width, 3])
  # Bicubic resize overshoots [0, 1]; the color ops assume it.
  image = tf.clip_by_value(image, 0.0, 1.0)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  if color_distort:
    image = _random_color_distortion(image, color_seed, color_jitter_strength, grey)
  if blur:
    image = random_blur(image, blur_seed, height)
  return tf.clip_by_value(image, 0.0, 1.0)


# The per-view parameters of the pixel augmentations, in the order `pixel_params` packs them.
PARAM_NAMES = ('flip', 'jitter', 'brightness', 'contrast', 'saturation', 'hue', 'order_0',
               'order_1', 'order_2', 'order_3', 'grayscale', 'blur', 'sigma')
NUM_PARAMS = len(PARAM_NAMES)


@dataclasses.dataclass(frozen=True)
class PixelAugment:
  """The per-pixel part of the training augmentations (flip, color distortion, blur), run
  batched where the step runs (`distort_batch`) from parameters the host draws
  (`pixel_params`) on the host's `resized_crop`s."""
  height: int
  color_jitter_strength: float = 1.0
  flip: bool = True
  color_distort: bool = True
  blur: bool = True
  grey: bool = False  # R = G = B: color distortion is brightness and contrast only


def pixel_params(seed, augment):
  """Returns the [NUM_PARAMS] float32 parameters of one view's flip, color distortion and blur.

  They are drawn from the same sub-seeds of the view's `seed`, with the same calls, as
  preprocess_for_train draws them, so `distort_batch` of resized_crop's output gives the
  pixels preprocess_for_train gives (within float round-off).
  """
  _, flip_seed, color_seed, blur_seed = _split(seed, 4)
  jitter_coin_seed, jitter_seed, gray_coin_seed = _split(color_seed, 3)
  order_seed, brightness_seed, contrast_seed, saturation_seed, hue_seed = _split(jitter_seed, 5)
  strength = augment.color_jitter_strength
  brightness = contrast = saturation = 0.8 * strength
  hue = 0.2 * strength

  def uniform(seed, minval=0.0, maxval=1.0):
    return tf.random.stateless_uniform([], seed=seed, minval=minval, maxval=maxval)

  order = tf.cast(tf.argsort(tf.random.stateless_uniform([4], seed=order_seed)), tf.float32)
  coin_seed, sigma_seed = _split(blur_seed, 2)
  params = {
      # As tf.image.stateless_random_flip_left_right draws it.
      'flip': tf.cast(uniform(flip_seed) < 0.5, tf.float32) if augment.flip else 0.0,
      'jitter': tf.cast(uniform(jitter_coin_seed) < 0.8, tf.float32),
      'brightness': uniform(brightness_seed, max(1.0 - brightness, 0.0), 1.0 + brightness),
      'contrast': uniform(contrast_seed, 1.0 - contrast, 1.0 + contrast),
      'saturation': uniform(saturation_seed, 1.0 - saturation, 1.0 + saturation),
      'hue': uniform(hue_seed, -hue, hue),
      'grayscale': tf.cast(uniform(gray_coin_seed) < 0.2, tf.float32),
      'blur': tf.cast(uniform(coin_seed) < 0.5, tf.float32),
      'sigma': uniform(sigma_seed, 0.1, 2.0),
  }
  params.update({f'order_{i}': order[i] for i in range(4)})
  return tf.stack([params[name] for name in PARAM_NAMES])


def _per_image(values):
  return values[:, tf.newaxis, tf.newaxis, tf.newaxis]


def _adjust_hsv(images, saturation=None, hue=None):
  """tf.image.adjust_saturation / adjust_hue with a factor / delta per image ([B])."""
  h, s, v = tf.unstack(tf.image.rgb_to_hsv(images), axis=-1)
  if saturation is not None:
    s = tf.clip_by_value(s * saturation[:, tf.newaxis, tf.newaxis], 0.0, 1.0)
  if hue is not None:
    h = tf.math.floormod(h + hue[:, tf.newaxis, tf.newaxis], 1.0)
  return tf.image.hsv_to_rgb(tf.stack([h, s, v], axis=-1))


def _color_jitter_batch(images, params, strength, grey=False):
  """color_jitter of every image [B, H, W, 3] with its own parameters and order."""
  brightness = contrast = 0.8 * strength
  saturation = 0.0 if grey else 0.8 * strength
  hue = 0.0 if grey else 0.2 * strength
  p = dict(zip(PARAM_NAMES, tf.unstack(params, axis=1)))
  for i in range(4):
    # Every image takes the transform (0-3: brightness, contrast, saturation, hue) its own
    # permutation puts at position i.
    position = p[f'order_{i}']
    out = images
    if brightness:
      out = tf.where(_per_image(position) == 0.0, images * _per_image(p['brightness']), out)
    if contrast:
      mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
      out = tf.where(_per_image(position) == 1.0,
                     (images - mean) * _per_image(p['contrast']) + mean, out)
    if saturation or hue:
      # One HSV round trip for both: the images at neither position get factor 1 and delta 0.
      adjusted = _adjust_hsv(
          images,
          saturation=tf.where(position == 2.0, p['saturation'], 1.0) if saturation else None,
          hue=tf.where(position == 3.0, p['hue'], 0.0) if hue else None)
      selected = (position == 2.0) & bool(saturation) | (position == 3.0) & bool(hue)
      out = tf.where(_per_image(selected), adjusted, out)
    images = tf.clip_by_value(out, 0.0, 1.0)
  return images


def _gaussian_blur_batch(images, kernel_size, sigma):
  """_gaussian_blur of every image [B, H, W, C] with its own sigma ([B])."""
  radius = kernel_size // 2
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-tf.square(x)[tf.newaxis] / (2.0 * tf.square(sigma)[:, tf.newaxis]))
  kernel /= tf.reduce_sum(kernel, axis=1, keepdims=True)  # [B, K]
  batch, height, width, channels = (tf.shape(images)[i] for i in range(4))
  # The images side by side as channels of one image: one depthwise convolution blurs each
  # with its own kernel.
  kernel = tf.reshape(tf.repeat(tf.transpose(kernel), channels, axis=1), [-1, batch * channels])
  stacked = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, height, width, batch * channels])
  padded = tf.pad(stacked, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode='REFLECT')
  blurred = tf.nn.depthwise_conv2d(padded, kernel[tf.newaxis, :, :, tf.newaxis],
                                   strides=[1, 1, 1, 1], padding='VALID')
  blurred = tf.nn.depthwise_conv2d(blurred, kernel[:, tf.newaxis, :, tf.newaxis],
                                   strides=[1, 1, 1, 1], padding='VALID')
  blurred = tf.reshape(blurred, [height, width, batch, channels])
  return tf.transpose(blurred, [2, 0, 1, 3])


def distort_batch(images, params, augment):
  """The rest of preprocess_for_train, batched: resized_crop's views [B, H, W, 3] (uint8
  scale) and their [B, NUM_PARAMS] pixel_params -> [B, H, W, 3] float32 views in [0, 1].

  Scaling, clipping, flips, color distortion and blur: per-pixel arithmetic, cheap on an
  accelerator and dear on the host. It runs in the train step (it compiles under XLA: no random
  ops, no data-dependent shapes).
  """
  images = tf.clip_by_value(tf.cast(images, tf.float32) * (1.0 / 255.0), 0.0, 1.0)
  p = dict(zip(PARAM_NAMES, tf.unstack(params, axis=1)))
  if augment.flip:
    images = tf.where(_per_image(p['flip']) > 0.5, tf.reverse(images, [2]), images)
  if augment.color_distort:
    jittered = _color_jitter_batch(images, params, augment.color_jitter_strength, augment.grey)
    images = tf.where(_per_image(p['jitter']) > 0.5, jittered, images)
    if not augment.grey:
      gray = tf.tile(tf.image.rgb_to_grayscale(images), [1, 1, 1, 3])
      images = tf.where(_per_image(p['grayscale']) > 0.5, gray, images)
  if augment.blur and augment.height >= 32:
    blurred = _gaussian_blur_batch(images, augment.height // 10, p['sigma'])
    images = tf.where(_per_image(p['blur']) > 0.5, blurred, images)
  return tf.clip_by_value(images, 0.0, 1.0)


def preprocess_for_eval(image, height, width, *, crop=True):
  """Center-crops CROP_PROPORTION (if crop) and resizes: [height, width, 3] float32 in [0, 1].

  Images under 32 px on a side should use crop=False: cropping them discards too many pixels.
  """
  image = tf.image.convert_image_dtype(image, tf.float32)
  if crop:
    image = _center_crop(image, height, width, CROP_PROPORTION)
  else:
    image = tf.image.resize(image, [height, width], method=tf.image.ResizeMethod.BICUBIC)
  image = tf.ensure_shape(image, [height, width, 3])
  return tf.clip_by_value(image, 0.0, 1.0)
