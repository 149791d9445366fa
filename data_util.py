"""SimCLR image augmentations and eval preprocessing, as stateless functions of an explicit seed.

Images are [H, W, 3] float32 in [0, 1] in and out; the same (image, seed) gives the same output
eagerly, inside `tf.data.Dataset.map`, and after a resume.
"""
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


def color_jitter(image, seed, strength, random_order=True):
  """Distorts brightness, contrast and saturation (by 0.8 * strength) and hue (by 0.2 * strength).

  Each of the four ops is followed by a clip to [0, 1]; with random_order they run in a random
  permutation. `strength` is a Python float; ops with zero strength are skipped.
  """
  brightness = contrast = saturation = 0.8 * strength
  hue = 0.2 * strength
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


def _random_color_distortion(image, seed, strength):
  """SimCLR v2 color distortion: color_jitter with p=0.8, then grayscale with p=0.2."""
  jitter_coin_seed, jitter_seed, gray_coin_seed = _split(seed, 3)
  image = _random_apply(lambda x: color_jitter(x, jitter_seed, strength), 0.8, image,
                        jitter_coin_seed)
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


def _random_crop_and_resize(image, seed, height, width, area_min):
  """Crops a random box (SimCLR's Inception-style crop) and resizes it bicubically.

  Returns [height, width, C].
  """
  aspect_ratio = width / height
  # bbox covering the whole image; min_object_covered=0.1 as in SimCLR, so the effective minimum
  # area is max(area_min, 0.1). After 100 failed attempts the op returns the whole image.
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image),
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seed,
      min_object_covered=0.1,
      aspect_ratio_range=(3.0 / 4.0 * aspect_ratio, 4.0 / 3.0 * aspect_ratio),
      area_range=(area_min, 1.0),
      max_attempts=100,
      use_image_if_no_bounding_boxes=True)
  image = tf.slice(image, begin, size)
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


def preprocess_for_train(image, seed, height, width, *, color_jitter_strength=1.0,
                         crop_area_min=0.08, flip=True, color_distort=True, blur=False):
  """Returns one SimCLR training view of image: [height, width, 3] float32 in [0, 1].

  image: [H, W, 3] uint8 or float in [0, 1]. seed: int32/int64 [2]; each augmentation draws from
  its own sub-seed, so switching one off leaves the others' randomness unchanged.
  """
  image = tf.image.convert_image_dtype(image, tf.float32)
  crop_seed, flip_seed, color_seed, blur_seed = _split(seed, 4)
  image = _random_crop_and_resize(image, crop_seed, height, width, crop_area_min)
  image = tf.ensure_shape(image, [height, width, 3])
  # Bicubic resize overshoots [0, 1]; the color ops assume it.
  image = tf.clip_by_value(image, 0.0, 1.0)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  if color_distort:
    image = _random_color_distortion(image, color_seed, color_jitter_strength)
  if blur:
    image = random_blur(image, blur_seed, height)
  return tf.clip_by_value(image, 0.0, 1.0)


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
