"""Build an image folder's cache (image_cache.py) and time the training loader reading the images
and reading the cache.

    python -m tools.cache_speed dataset/celebA --imsize 64
"""
import time

from torch.utils.data import DataLoader

from cli import Parser, UserError, run
from data_loader import ImageFolderFlat
from image_cache import cached

PROG = "-m tools.cache_speed"  # as run: python -m tools.cache_speed


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
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("image_path")
    p.add_argument("--imsize", type=int, default=64)
    p.add_argument("--center_crop", type=int, default=160)
    p.add_argument("--cache_dir", default=".cache/images")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=10, help="batches timed per loader")
    a = p.parse_args(argv)
    try:
        folder = ImageFolderFlat(a.image_path, a.imsize, a.center_crop)
    except FileNotFoundError as e:  # a missing folder, or one without readable images
        raise UserError(str(e)) from None
    data = cached(folder, a.cache_dir, a.num_workers)
    jpeg = loader_speed(folder, a.batch_size, a.num_workers, a.batches)
    cache = loader_speed(data, a.batch_size, a.num_workers, a.batches)
    print(f"loader, {a.num_workers} workers, batch {a.batch_size}, {a.imsize}px: "
          f"images {jpeg:.0f} img/s, cache {cache:.0f} img/s ({cache / jpeg:.0f}x)")


if __name__ == "__main__":
    run(PROG, main)
