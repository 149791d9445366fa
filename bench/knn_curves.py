"""The per-epoch kNN curves of the Fashion-MNIST benchmarks (bench/small_batch.py's grid,
bench/long_runs.py's whole runs): one figure, a line per run."""

COLORS = {'simclr': 'tab:blue', 'sogclr': 'tab:red', 'isogclr': 'tab:green',
          'supervised': 'black'}


def plot(lines, path, *, ylabel, title, legend_size=8, legend_outside=False):
  """Draws `lines` ((label, objective, linestyle, marker, [(epoch, top-1 fraction)]) each; an
  empty curve is left out) in %, coloured by objective, into the image file `path`; the legend
  where it hides least, or right of the axes (`legend_outside`, for many curves)."""
  import matplotlib  # pylint: disable=import-outside-toplevel  (only the plot needs it)
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  figure, axis = plt.subplots(figsize=(10, 4.5) if legend_outside else (7, 4.5))
  for label, objective, linestyle, marker, curve in lines:
    if curve:
      epochs, values = zip(*curve)
      axis.plot(epochs, [100 * v for v in values], color=COLORS[objective], marker=marker,
                linestyle=linestyle, label=label)
  axis.set_xlabel('epoch')
  axis.set_ylabel(ylabel)
  axis.set_title(title)
  axis.grid(alpha=0.3)
  if legend_outside:
    axis.legend(fontsize=legend_size, loc='upper left', bbox_to_anchor=(1.01, 1))
  else:
    axis.legend(fontsize=legend_size)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)
