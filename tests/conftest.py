"""Test set-up: two logical CPU devices, so MirroredStrategy runs the cross-replica code for real."""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402  (must follow the environment set-up above)

_cpus = tf.config.list_physical_devices('CPU')
# Logical devices can be configured only before TensorFlow initializes its runtime.
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def one_replica():
  return tf.distribute.MirroredStrategy(['/cpu:0'])


@pytest.fixture(scope='session')
def two_replicas():
  # One strategy object for the whole session: two MirroredStrategy objects over the same
  # devices draw colliding collective instance keys and abort each other's collectives.
  return tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
