"""The one colour scale for attention weights, shared by the matplotlib figures, the dashboard's
attention panel and the HTML page: 0 (no weight) is dark blue, the map's maximum dark red.

It is matplotlib's 'jet', stated here by its own anchor points (matplotlib's `_jet_data`) so the
dashboard and the page draw the same colours without importing matplotlib: figures pass `CMAP` to
imshow, the dashboard calls `colorize`, the page receives `lut()` as data.
"""
import numpy as np

CMAP = "jet"  # the matplotlib name of the same scale

# (position, value) anchors per channel, piecewise linear in between
_ANCHORS = {
    "r": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "g": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "b": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


def colorize(v):
    """v in [0, 1] (any shape; clipped) -> uint8 RGB of shape (..., 3)."""
    v = np.clip(np.asarray(v, dtype=np.float64), 0.0, 1.0)
    channels = [np.interp(v, *zip(*_ANCHORS[c])) for c in "rgb"]
    return (np.stack(channels, axis=-1) * 255).round().astype(np.uint8)


def lut(n=256):
    """(n, 3) uint8: the scale sampled at n evenly spaced values, for the page's script."""
    return colorize(np.linspace(0.0, 1.0, n))
