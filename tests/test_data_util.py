"""Tests for data_util: the stateless augmentations are reproducible, correct in value, and hit
their rates."""
import numpy as np
import pytest
import tensorflow as tf

import data_util


def _image(size, seed=0):
  return tf.constant(np.random.RandomState(seed).uniform(size=(size, size, 3)), tf.float32)


def _seed(a, b=0):
  return tf.constant([a, b], tf.int64)


def _plain_resize(image, size):
  return tf.clip_by_value(tf.image.resize(image, [size, size], method='bicubic'), 0.0, 1.0)


def _map_over_seeds(image, seeds, **kwargs):
  """preprocess_for_train of one image under many seeds, run inside Dataset.map."""
  size = kwargs.pop('size')
  dataset = tf.data.Dataset.from_tensor_slices(seeds).map(
      lambda s: data_util.preprocess_for_train(image, s, size, size, **kwargs),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return np.stack(list(dataset.as_numpy_iterator()))


def test_same_seed_same_output_eagerly_and_in_dataset_map():
  image = _image(64)
  seeds = np.array([[i, 7] for i in range(4)], np.int64)
  kwargs = dict(blur=True)
  eager = np.stack([data_util.preprocess_for_train(image, s, 32, 32, **kwargs).numpy()
                    for s in seeds])
  again = np.stack([data_util.preprocess_for_train(image, s, 32, 32, **kwargs).numpy()
                    for s in seeds])
  mapped = _map_over_seeds(image, seeds, size=32, **kwargs)
  np.testing.assert_array_equal(eager, again)
  np.testing.assert_array_equal(eager, mapped)


def test_different_seeds_give_different_outputs():
  image = _image(64)
  outputs = _map_over_seeds(image, np.array([[i, 0] for i in range(6)], np.int64), size=32)
  for i in range(len(outputs)):
    for j in range(i + 1, len(outputs)):
      assert np.abs(outputs[i] - outputs[j]).max() > 1e-3, (i, j)


@pytest.mark.parametrize('in_size,out_size', [(8, 16), (64, 32)])
@pytest.mark.parametrize('dtype', [tf.float32, tf.uint8])
def test_train_output_shape_dtype_range(in_size, out_size, dtype):
  image = tf.image.convert_image_dtype(_image(in_size), dtype)
  out = data_util.preprocess_for_train(image, _seed(3), out_size, out_size, blur=True)
  assert out.shape == (out_size, out_size, 3) and out.dtype == tf.float32
  assert 0.0 <= out.numpy().min() and out.numpy().max() <= 1.0
  eval_out = data_util.preprocess_for_eval(image, out_size, out_size, crop=in_size >= 32)
  assert eval_out.shape == (out_size, out_size, 3) and eval_out.dtype == tf.float32
  assert 0.0 <= eval_out.numpy().min() and eval_out.numpy().max() <= 1.0


def test_static_shape_inside_dataset_map():
  dataset = tf.data.Dataset.from_tensors((_image(8), _seed(1))).map(
      lambda x, s: data_util.preprocess_for_train(x, s, 16, 16))
  assert dataset.element_spec.shape == (16, 16, 3)


def test_full_area_crop_without_flip_or_color_is_plain_resize():
  image = _image(8)
  for s in range(5):
    out = data_util.preprocess_for_train(image, _seed(s), 16, 16, crop_area_min=1.0, flip=False,
                                         color_distort=False)
    np.testing.assert_allclose(out, _plain_resize(image, 16), atol=1e-6)


def test_zero_jitter_strength_changes_colors_only_by_grayscale():
  image = _image(8)
  resized = _plain_resize(image, 16).numpy()
  seen_gray = seen_color = False
  for s in range(30):
    out = data_util.preprocess_for_train(image, _seed(s), 16, 16, color_jitter_strength=0.0,
                                         crop_area_min=1.0, flip=False, blur=False).numpy()
    if np.allclose(out, resized, atol=1e-6):
      seen_color = True
    else:
      seen_gray = True
      np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-6)
      np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-6)
      np.testing.assert_allclose(out, data_util.to_grayscale(resized), atol=1e-6)
  assert seen_gray and seen_color


def test_eval_of_constant_image_is_that_constant():
  for crop, size in [(True, 64), (False, 8)]:
    out = data_util.preprocess_for_eval(tf.fill([size, size, 3], 0.3), 32, 32, crop=crop)
    np.testing.assert_allclose(out, 0.3, atol=1e-6)


def test_eval_center_crop_keeps_the_center():
  # Only the central 56 px of a 64 px image survive a 0.875 crop; a border of ones must vanish.
  image = tf.pad(tf.fill([56, 56, 3], 0.25), [[4, 4], [4, 4], [0, 0]], constant_values=1.0)
  out = data_util.preprocess_for_eval(image, 56, 56)
  np.testing.assert_allclose(out, 0.25, atol=1e-6)


def test_random_blur_keeps_constant_and_smooths_noise():
  constant = tf.fill([64, 64, 3], 0.6)
  noise = _image(64)
  reductions = []
  for s in range(8):
    np.testing.assert_allclose(data_util.random_blur(constant, _seed(s), 64, p=1.0), 0.6, atol=1e-6)
    blurred = data_util.random_blur(noise, _seed(s), 64, p=1.0).numpy()
    reductions.append(blurred.var() / noise.numpy().var())
  # sigma ~ U[0.1, 2]: tiny sigmas barely blur, but none adds variance and most remove a lot.
  assert max(reductions) <= 1.0 + 1e-5, reductions
  assert np.median(reductions) < 0.5, reductions


def test_blur_is_skipped_below_32_px():
  image = _image(16)
  for s in range(4):
    np.testing.assert_array_equal(data_util.random_blur(image, _seed(s), 16, p=1.0), image)
    with_blur = data_util.preprocess_for_train(image, _seed(s), 16, 16, blur=True)
    without_blur = data_util.preprocess_for_train(image, _seed(s), 16, 16, blur=False)
    np.testing.assert_array_equal(with_blur, without_blur)


def test_flip_rate_is_one_half():
  image = _image(8)
  outputs = _map_over_seeds(image, np.array([[i, 1] for i in range(200)], np.int64), size=16,
                            crop_area_min=1.0, color_distort=False)
  resized = _plain_resize(image, 16).numpy()
  flipped = np.all(np.isclose(outputs, resized[:, ::-1], atol=1e-6), axis=(1, 2, 3))
  unflipped = np.all(np.isclose(outputs, resized, atol=1e-6), axis=(1, 2, 3))
  assert np.all(flipped ^ unflipped)
  assert abs(flipped.mean() - 0.5) <= 0.12, flipped.mean()


def test_grayscale_rate_is_one_fifth():
  image = _image(8)
  outputs = _map_over_seeds(image, np.array([[i, 2] for i in range(200)], np.int64), size=16,
                            crop_area_min=1.0, flip=False, color_jitter_strength=0.0)
  gray = np.all(np.isclose(outputs[..., 0], outputs[..., 1], atol=1e-6), axis=(1, 2))
  assert abs(gray.mean() - 0.2) <= 0.08, gray.mean()


@pytest.mark.parametrize('random_order', [True, False])
def test_color_jitter_is_identity_at_zero_strength_and_distorts_within_range(random_order):
  image = _image(16)
  np.testing.assert_allclose(data_util.color_jitter(image, _seed(0), 0.0, random_order), image,
                             atol=1e-6)
  for s in range(3):
    out = data_util.color_jitter(image, _seed(s), 1.0, random_order).numpy()
    assert out.shape == (16, 16, 3) and 0.0 <= out.min() and out.max() <= 1.0
    assert np.abs(out - image.numpy()).max() > 1e-2


@pytest.mark.parametrize('augment', [
    data_util.PixelAugment(height=64),
    data_util.PixelAugment(height=64, color_jitter_strength=0.5, flip=False),
    data_util.PixelAugment(height=64, color_jitter_strength=0.0, blur=False),
    data_util.PixelAugment(height=16, color_distort=False),  # flips only (no blur below 32 px)
    data_util.PixelAugment(height=32, grey=True),  # brightness and contrast only
])
def test_device_augmentations_of_resized_crops_give_the_host_views(augment):
  # The same per-view seeds: batched in the step (eagerly and under XLA) = preprocess_for_train.
  image = tf.image.convert_image_dtype(_image(80), tf.uint8)
  seeds = [_seed(i, 3) for i in range(24)]
  size = augment.height
  host = np.stack([data_util.preprocess_for_train(
      image, s, size, size, color_jitter_strength=augment.color_jitter_strength,
      flip=augment.flip, color_distort=augment.color_distort, blur=augment.blur,
      grey=augment.grey).numpy()
      for s in seeds])
  crops = tf.stack([data_util.resized_crop(image, s, size, size) for s in seeds])
  params = tf.stack([data_util.pixel_params(s, augment) for s in seeds])
  eager = data_util.distort_batch(crops, params, augment).numpy()
  compiled = tf.function(lambda c, p: data_util.distort_batch(c, p, augment),
                         jit_compile=True)(crops, params).numpy()
  np.testing.assert_allclose(eager, host, atol=1e-4)
  np.testing.assert_allclose(compiled, host, atol=1e-4)
  # The seeds drew both outcomes of every coin that is on, so every branch was compared.
  p = dict(zip(data_util.PARAM_NAMES, params.numpy().T, strict=True))
  coins = ['flip'] * augment.flip + ['jitter', 'grayscale'] * augment.color_distort
  coins += ['blur'] * (augment.blur and size >= 32)
  for coin in coins:
    assert 0 < p[coin].mean() < 1, coin


@pytest.mark.parametrize('strength', [1.0, 0.5])
def test_grey_images_lose_nothing_by_skipping_saturation_hue_and_grayscale(strength):
  # On a grey image (R = G = B) saturation, hue and the grayscale conversion change nothing:
  # the grey path gives the colour path's views (and its randomness) without them.
  grey = tf.image.convert_image_dtype(tf.tile(_image(40)[:, :, :1], [1, 1, 3]), tf.uint8)
  for i in range(16):
    views = [data_util.preprocess_for_train(grey, _seed(i, 5), 32, 32, blur=True,
                                            color_jitter_strength=strength, grey=g).numpy()
             for g in (False, True)]
    # rgb_to_grayscale's weights sum to 0.9999, the HSV round trip to float round-off.
    np.testing.assert_allclose(views[1], views[0], atol=2e-4)
    np.testing.assert_array_equal(views[1][..., 0], views[1][..., 2])
