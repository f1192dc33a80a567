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

    python image_cache.py dataset/celebA --imsize 64     # build now and time the loader both ways
"""
import argparse
import glob
import hashlib
import os
import shutil
import sys
import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_loader import ImageFolderFlat, to_tensor

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


class _Pixels(Dataset):
    """The folder's images as uint8 (H, W, 3) arrays, for building the cache with loader workers."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        # an unreadable file is stored as the next readable one, as training without the cache does
        pixels, skipped = self.folder.checked_pixels(i)
        return torch.from_numpy(np.array(pixels)), skipped  # a writable copy for torch


def _collate(items):
    pixels, skipped = zip(*items)
    return torch.stack(pixels), [s for sk in skipped for s in sk]


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
        loader = DataLoader(_Pixels(folder), batch_size=64, num_workers=num_workers, collate_fn=_collate)
        i, bad = 0, set()
        with tqdm(total=n, desc=f"caching {n} images at {s}px", unit="img", disable=not progress,
                  file=sys.stdout, mininterval=1.0) as bar:
            for batch, skipped in loader:  # (b, s, s, 3) uint8
                for p, reason in skipped:
                    if p not in bad:
                        bad.add(p)
                        warnings.warn(f"unreadable image {p!r} ({reason}); replaced by the next "
                                      f"readable file in the cache, training goes on", stacklevel=1)
                arr[i:i + len(batch)] = batch.numpy()
                i += len(batch)
                bar.update(len(batch))
        arr.flush()
        del arr
        os.replace(partial, path)
        if bad:
            print(f"image cache: {len(bad)} unreadable image file(s) replaced; remove or fix them", flush=True)
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
        batch = torch.from_numpy(self.arr[np.asarray(indices)]).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        return list(batch.float().div_(127.5).sub_(1.0))

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


def loader_speed(dataset, batch_size, num_workers, batches):
    """Images per second through a shuffling DataLoader (after one warm-up batch)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        drop_last=True, persistent_workers=False)
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it))
    return n / (time.perf_counter() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description="Build an image folder's cache and time the loader from "
                                            "the images and from the cache.")
    p.add_argument("image_path")
    p.add_argument("--imsize", type=int, default=64)
    p.add_argument("--center_crop", type=int, default=160)
    p.add_argument("--cache_dir", default=".cache/images")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=10, help="batches timed per loader")
    a = p.parse_args(argv)
    folder = ImageFolderFlat(a.image_path, a.imsize, a.center_crop)
    data = cached(folder, a.cache_dir, a.num_workers)
    jpeg = loader_speed(folder, a.batch_size, a.num_workers, a.batches)
    cache = loader_speed(data, a.batch_size, a.num_workers, a.batches)
    print(f"loader, {a.num_workers} workers, batch {a.batch_size}, {a.imsize}px: "
          f"images {jpeg:.0f} img/s, cache {cache:.0f} img/s ({cache / jpeg:.0f}x)")


if __name__ == "__main__":
    main()
