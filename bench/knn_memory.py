"""Peak host memory and time of the kNN monitor against the train split's size: the streaming
kNN on the replicas (evaluation.StreamingKNN) against the previous host approach (every train
feature gathered on the host, then probe.knn_accuracy in float64).

  python bench/knn_memory.py                    # 10k, 40k, 160k train features of dim 512
  python bench/knn_memory.py --train_sizes=2000,8000 --eval_size=500   # a quick look

Synthetic features (seeded normals in 100 classes' clusters), so no model or data is needed;
each measurement runs in a process of its own and reports its peak resident size (ru_maxrss)
beyond the same process's size before the kNN (TensorFlow loaded, the strategy built). Both
methods give the same top-1 (printed). The machine is shared: compare within one run only.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

NUM_CLASSES = 100


def peak_rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def synthetic_dataset(tf, num_examples, dim, batch, seed):
  """Batches (data.batch: views, one-hot labels, ids, mask) of clustered random features,
  padded to whole batches, made on the fly (nothing of the split's size is ever held)."""
  steps = -(-num_examples // batch)
  centers = tf.random.stateless_normal([NUM_CLASSES, dim], [0, 0])

  def chunk(i):
    ids = i * batch + tf.range(batch, dtype=tf.int64)
    labels = tf.random.stateless_uniform([batch], [seed, i], maxval=NUM_CLASSES, dtype=tf.int64)
    noise = tf.random.stateless_normal([batch, dim], [seed, i], stddev=8.0)
    features = tf.gather(centers, labels) + noise
    return {'views': (features,), 'labels': tf.one_hot(labels, NUM_CLASSES), 'ids': ids,
            'mask': ids < num_examples}

  return tf.data.Dataset.range(steps).map(chunk)


def measure(method, train_size, eval_size, dim, k, batch):
  """One measurement in this process: {'method', 'train_size', 'peak_mb', 'seconds', 'top_1'}."""
  import numpy as np  # noqa: PLC0415  (imported by the measuring process only)
  import tensorflow as tf  # noqa: PLC0415

  import evaluation  # noqa: PLC0415
  import probe  # noqa: PLC0415

  strategy = tf.distribute.MirroredStrategy(['/cpu:0'])

  def dataset(size, seed):
    return strategy.distribute_datasets_from_function(
        lambda _: synthetic_dataset(tf, size, dim, batch, seed))

  before = peak_rss_mb()
  started = time.perf_counter()
  if method == 'streaming':
    knn = evaluation.StreamingKNN(strategy, lambda views: views[0], k=k, temperature=0.1,
                                  num_classes=NUM_CLASSES)
    top_1 = knn(dataset(train_size, 1), dataset(eval_size, 2))
  else:
    def host_features(size, seed):
      # As FeatureExtractor did: every batch's features copied to the host, concatenated.
      features, labels = [], []
      for element in synthetic_dataset(tf, size, dim, batch, seed):
        mask = element['mask'].numpy()
        features.append(element['views'][0].numpy()[mask])
        labels.append(np.argmax(element['labels'].numpy(), 1)[mask])
      return np.concatenate(features), np.concatenate(labels)

    top_1 = probe.knn_accuracy(*host_features(train_size, 1), *host_features(eval_size, 2), k=k,
                               temperature=0.1)
  return {'method': method, 'train_size': train_size,
          'peak_mb': round(peak_rss_mb() - before, 1),
          'seconds': round(time.perf_counter() - started, 2), 'top_1': top_1}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--train_sizes', default='10000,40000,160000',
                      help='train-split sizes (rows), comma-separated')
  parser.add_argument('--eval_size', type=int, default=2000, help='eval-split rows')
  parser.add_argument('--dim', type=int, default=512, help='feature dimension')
  parser.add_argument('--k', type=int, default=200, help='neighbours')
  parser.add_argument('--batch', type=int, default=1024, help='train and eval chunk (rows)')
  parser.add_argument('--methods', default='streaming,host',
                      help='comma-separated: streaming (on the replicas), host (NumPy)')
  parser.add_argument('--one', help=argparse.SUPPRESS)  # method:train_size, in a child process
  args = parser.parse_args()
  if args.one:
    method, size = args.one.split(':')
    print(json.dumps(measure(method, int(size), args.eval_size, args.dim, args.k, args.batch)))
    return
  print(f'kNN monitor: {args.eval_size} eval features of dim {args.dim}, k={args.k}, chunks of '
        f'{args.batch}; peak host memory beyond the process before the kNN')
  print(f"{'method':>10} {'train':>8} {'peak MB':>9} {'seconds':>8} {'top-1':>7}")
  for size in (int(s) for s in args.train_sizes.split(',')):
    for method in args.methods.split(','):
      child = subprocess.run(
          [sys.executable, __file__, f'--one={method}:{size}', f'--eval_size={args.eval_size}',
           f'--dim={args.dim}', f'--k={args.k}', f'--batch={args.batch}'],
          capture_output=True, text=True, check=True)
      row = json.loads(child.stdout.strip().splitlines()[-1])
      print(f"{row['method']:>10} {row['train_size']:>8} {row['peak_mb']:>9.1f} "
            f"{row['seconds']:>8.2f} {row['top_1']:>7.4f}", flush=True)


if __name__ == '__main__':
  main()
