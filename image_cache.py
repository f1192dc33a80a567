"""A one-time preprocessing cache for image folders: uint8 pixels at the training resolution in a
memory-mapped .npy file, so training reads bytes instead of decoding, cropping and resizing JPEGs.

Used automatically for --dataset celeb (--cache auto, the default; --cache off reads the images
every time). The file lives in --cache_dir and is keyed by

    the folder (absolute path), the image size, the crop   -> the file name's prefix
    every image's relative path, byte size and mtime      -> the file name's content hash

so adding, removing or editing an image, or changing --imsize / --center_crop, makes a new cache
(the outdated one for the same folder, size and crop is deleted once the new one is complete).
Building writes `<name>.partial.<pid>` with a progress bar and renames it into place at the end:
an interrupted build leaves no cache that looks complete.

`folder` here is a data_loader.ImageFolderFlat (its root, imsize, crop, paths and pixel_batches);
this module reads images only through it. To time the loader with and without the cache:

    python -m tools.cache_speed dataset/celebA --imsize 64
"""
import glob
import hashlib
import os
import shutil
import sys
import time

import numpy as np
from torch.utils.data import Dataset

from utils import to_tensor

CACHE_VERSION = 1  # bump when the pixels a given (image, imsize, crop) produces change


def _digest(*parts):
    h = hashlib.sha1()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def cache_path(folder, cache_dir):
    """Where the cache of `folder` (an ImageFolderFlat) lives; changes whenever its key changes."""
    root = os.path.abspath(folder.root)
    prefix = (f"{os.path.basename(root.rstrip(os.sep)) or 'images'}_{folder.imsize}px_crop{folder.crop}_"
              f"{_digest(root, folder.imsize, folder.crop)}")
    files = []
    for p in folder.paths:
        st = os.stat(p)
        files.append((os.path.relpath(p, root), st.st_size, st.st_mtime_ns))
    return os.path.join(cache_dir, f"{prefix}_{_digest(CACHE_VERSION, files)}.npy")


def build_cache(folder, path, num_workers=0, progress=True):
    """Decode every image of `folder` once into a uint8 (n, imsize, imsize, 3) .npy at `path`."""
    from tqdm import tqdm

    n, s = len(folder), folder.imsize
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    need = n * s * s * 3
    free = shutil.disk_usage(os.path.dirname(path) or ".").free
    if need > free:
        raise OSError(f"the image cache needs {need / 2**30:.1f} GiB in {os.path.dirname(path)!r}, "
                      f"{free / 2**30:.1f} GiB free")
    partial = f"{path}.partial.{os.getpid()}"
    try:
        arr = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(n, s, s, 3))
        i, unreadable = 0, set()
        with tqdm(total=n, desc=f"caching {n} images at {s}px", unit="img", disable=not progress,
                  file=sys.stdout, mininterval=1.0) as bar:
            for batch, unreadable in folder.pixel_batches(num_workers):  # (b, s, s, 3) uint8
                arr[i:i + len(batch)] = batch.numpy()
                i += len(batch)
                bar.update(len(batch))
        arr.flush()
        del arr
        os.replace(partial, path)
        if unreadable:
            print(f"image cache: {len(unreadable)} unreadable image file(s) replaced; remove or fix them",
                  flush=True)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    prefix = path.rsplit("_", 1)[0]
    for old in glob.glob(glob.escape(prefix) + "_*.npy"):  # outdated caches of this folder/size/crop
        if old != path:
            os.remove(old)
    return path


class CachedImages(Dataset):
    """Images from a cache file: float (3, imsize, imsize) in [-1, 1], like ImageFolderFlat.

    The memory map is opened lazily in each process, so loader workers share the page cache instead
    of receiving a pickled copy; `__getitems__` lets the DataLoader fetch a whole batch in one read.
    """

    def __init__(self, path, source):
        self.path, self.source = path, source  # source: the ImageFolderFlat it was built from
        self.n = len(source)
        self._arr = None

    def __len__(self):
        return self.n

    @property
    def arr(self):
        if self._arr is None:
            self._arr = np.load(self.path, mmap_mode="r")
        return self._arr

    def __getitem__(self, i):
        return to_tensor(self.arr[i])

    def __getitems__(self, indices):
        return list(to_tensor(self.arr[np.asarray(indices)]))  # (B, H, W, 3) uint8 -> B x (3, H, W)

    def __getstate__(self):
        return {**self.__dict__, "_arr": None}


def cached(folder, cache_dir, num_workers=0, progress=True):
    """`folder` served from its cache in `cache_dir`, building the cache first when it is missing
    or outdated."""
    path = cache_path(folder, cache_dir)
    if not os.path.exists(path):
        t = time.time()
        build_cache(folder, path, num_workers, progress)
        print(f"image cache built in {time.time() - t:.0f} s: {path}")
    return CachedImages(path, folder)
