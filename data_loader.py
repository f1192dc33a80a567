"""Datasets, transforms and the training loader.

- `ImageFolderFlat`: every image under a folder, any nesting (CelebA's archive unpacks to
  img_align_celeba/*.jpg; no class folder needed). Center-crop, resize, scale to [-1, 1].
- `SyntheticFaces`: the built-in dataset, procedurally generated face-like images with long-range
  rules a convolution alone gets wrong easily: both eyes share one random colour and sit
  symmetrically about the face's axis; the hair is one colour all around the face.
- `make_dataset`: the built-in faces or the image folders, given explicitly (main.py's `dataset_for`
  hands it the config's data flags).
- `training_batches`: endless batches whose order is a pure function of (seed, step), so a resumed
  run sees exactly the batches the uninterrupted run would have. An unreadable file (truncated,
  corrupt, not an image, empty) is replaced by the next readable one and named once in a warning.
"""
import bisect
import os
import signal
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from image_cache import cached
from utils import to_tensor

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
CELEBA_HINT = ("get CelebA's img_align_celeba.zip (Align&Cropped Images) from "
               "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html and unzip it into dataset/celebA, "
               "or pass --image_path, or train on the built-in data with --dataset synthetic")


def find_images(root):
    """Sorted paths of every image file under `root`, any depth (hidden folders skipped)."""
    paths = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.join(folder, f) for f in sorted(files)
                  if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")]
    return paths


def center_crop_resize(img, imsize, crop):
    """Center square of side `crop` (the largest square when 0 or when the image is smaller), resized."""
    w, h = img.size
    side = min(w, h) if crop <= 0 else min(crop, w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img.resize((imsize, imsize), Image.BICUBIC, reducing_gap=None)


def read_rgb(path):
    """Decode an image file fully into an RGB PIL image (grayscale, RGBA, palette, CMYK converted)."""
    with Image.open(path) as img:
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # PIL warns when a transparent palette goes straight to RGB
        return img.convert("RGB")  # convert() decodes the whole file: truncation shows up here


def load_image(path, imsize, crop=160):
    """One image file prepared as in training (centre crop, resize): (3, imsize, imsize) in [-1, 1],
    e.g. a real image for D to attend over; a clear ValueError when the file is not an image."""
    try:
        return to_tensor(center_crop_resize(read_rgb(path), imsize, crop))
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"image {path!r} cannot be read ({e}); pass a JPEG or PNG file") from None


PROBE_FILES = 64  # files decoded at start: enough to tell a folder of images from one of junk


class ImageFolderFlat(Dataset):
    """Images under `root`. A file that fails to decode is replaced by the next readable file in
    sorted order, so a bad file costs one duplicate, never a crash, and batches stay deterministic."""

    def __init__(self, root, imsize, crop=160):
        if not os.path.isdir(root):
            what = "is a file, not a folder (an archive? unzip it and pass the folder)" \
                if os.path.exists(root) else "does not exist"
            raise FileNotFoundError(f"image folder {root!r} {what}: {CELEBA_HINT}")
        self.paths = find_images(root)
        if not self.paths:
            raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {root!r}: {CELEBA_HINT}")
        self.root, self.imsize, self.crop = root, imsize, crop
        self.probe()

    def probe(self):
        """Decode up to PROBE_FILES files spread over the folder (not all 200k of CelebA: seconds,
        not minutes); a folder where none decodes is an error now, before any model is built."""
        step = max(1, len(self.paths) // PROBE_FILES)
        failures = []
        for path in self.paths[::step][:PROBE_FILES]:
            try:
                read_rgb(path)
                return
            except Exception as e:  # PIL's decoders raise many types; any of them = unreadable
                failures.append((path, e))
        path, e = failures[0]
        raise FileNotFoundError(f"none of the {len(failures)} files tried under {self.root!r} is a "
                                f"readable image (e.g. {path!r}: {type(e).__name__}: {e}); "
                                f"check the folder's contents or pass another --image_path")

    def __len__(self):
        return len(self.paths)

    def pixels(self, i):
        """Image i cropped and resized: uint8 (imsize, imsize, 3), what the image cache stores."""
        return np.asarray(center_crop_resize(read_rgb(self.paths[i]), self.imsize, self.crop), dtype=np.uint8)

    def load(self, i):
        """Image i as a training tensor (3, imsize, imsize) in [-1, 1]; raises on an unreadable file."""
        return to_tensor(self.pixels(i))

    def checked_pixels(self, i):
        """(pixels, [(path, reason) of files skipped to find them]): image i, or the next readable one."""
        skipped = []
        for k in range(len(self.paths)):
            j = (i + k) % len(self.paths)
            try:
                return self.pixels(j), skipped
            except Exception as e:  # a corrupt file must not end a run: see class docstring
                skipped.append((self.paths[j], f"{type(e).__name__}: {e}"))
        raise RuntimeError(f"no file under {self.root!r} is a readable image any more")

    def checked_item(self, i):
        """(image, [(path, reason) of files skipped to find it])."""
        pixels, skipped = self.checked_pixels(i)
        return to_tensor(pixels), skipped

    def __getitem__(self, i):
        return self.checked_item(i)[0]

    def pixel_batches(self, num_workers=0, batch_size=64):
        """Every image in order: (uint8 (b, imsize, imsize, 3) batch, the unreadable files met so
        far), what the image cache is built from. An unreadable file is replaced by the next readable
        one, as training without the cache reads it, and named once in a warning."""
        loader = DataLoader(_Pixels(self), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=_collate)
        unreadable = Unreadable()
        for batch, skipped in loader:
            unreadable.met(skipped)
            yield batch, unreadable.seen


class _Pixels(Dataset):
    """A folder's images as (uint8 (H, W, 3) tensor, skipped files), for building its cache."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        pixels, skipped = self.folder.checked_pixels(i)
        return torch.from_numpy(np.array(pixels)), skipped  # a writable copy for torch


# ----------------------------------------------------------------------------- built-in faces

def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


EYES = ("rule", "independent", "none")


def synthetic_face(rng, imsize, supersample=2, eyes="rule"):
    """One face-like image as uint8 (imsize, imsize, 3), and the facts its rules are about.

    Geometry is drawn in unit coordinates on a supersampled grid and box-filtered down, so edges are
    anti-aliased at every image size. `meta` has the eye centres in image pixels (x, y) and the
    shared eye colour, which is what a long-range-structure score checks on generated images.
    `eyes` = 'rule' (both irises one colour: the built-in data), 'independent' (each iris its own
    colour: no rule) or 'none' (eye whites only): the controls an eye-colour score must fail on,
    otherwise the same face; meta's iris_rgb holds each eye's iris colour (None without irises).
    """
    if eyes not in EYES:
        raise ValueError(f"eyes={eyes!r}: one of {', '.join(EYES)}")
    n = imsize * supersample
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    yy, xx = (yy + 0.5) / n, (xx + 0.5) / n  # pixel centres in [0, 1]

    top, bottom = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    img = top + (bottom - top) * yy[..., None]  # background: a vertical gradient

    cx, cy = 0.5 + rng.uniform(-0.06, 0.06), 0.55 + rng.uniform(-0.05, 0.05)
    ry, rx = rng.uniform(0.3, 0.35), rng.uniform(0.23, 0.28)
    hair = rng.uniform(0, 1, 3)
    img[_ellipse(yy, xx, cy - 0.05, cx, ry + 0.07, rx + 0.06)] = hair  # hair frames the face
    skin = np.array([0.93, 0.75, 0.62]) * rng.uniform(0.45, 1.05) + rng.uniform(-0.05, 0.05, 3)
    img[_ellipse(yy, xx, cy + 0.02, cx, ry, rx)] = np.clip(skin, 0, 1)

    eye = rng.uniform(0, 1, 3)  # one colour for both eyes: the long-range rule
    ey, dx = cy - rng.uniform(0.04, 0.09), rng.uniform(0.1, 0.13)
    er = rng.uniform(0.045, 0.06)
    mouth_rx, mouth_rgb = rng.uniform(0.07, 0.11), np.array([0.75, 0.2, 0.25]) * rng.uniform(0.6, 1.0)
    # the controls draw after every rule-face draw, so a face differs from its rule twin in the irises only
    irises = ([eye, eye] if eyes == "rule" else [eye, rng.uniform(0, 1, 3)] if eyes == "independent"
              else [None, None])
    for ex, iris in zip((cx - dx, cx + dx), irises):  # mirror images about the face's vertical axis
        img[_ellipse(yy, xx, ey, ex, er * 0.8, er * 1.5)] = 1.0
        if iris is not None:
            img[_ellipse(yy, xx, ey, ex, er * 0.75, er * 0.75)] = iris
    mouth = _ellipse(yy, xx, cy + 0.17, cx, 0.03, mouth_rx)
    img[mouth] = mouth_rgb

    img = img.reshape(imsize, supersample, imsize, supersample, 3).mean(axis=(1, 3))
    meta = dict(eyes_xy=[((cx - dx) * imsize, ey * imsize), ((cx + dx) * imsize, ey * imsize)],
                eye_rgb=eye.tolist(), hair_rgb=hair.tolist(),
                iris_rgb=[None if c is None else c.tolist() for c in irises])
    return (img * 255).round().clip(0, 255).astype(np.uint8), meta


class SyntheticFaces(Dataset):
    """`size` built-in faces at `imsize`; face i depends only on (seed, i), at any image size.
    `eyes` as synthetic_face's: 'rule' is the built-in data, the others its controls."""

    def __init__(self, size, imsize, seed=0, eyes="rule"):
        if eyes not in EYES:
            raise ValueError(f"eyes={eyes!r}: one of {', '.join(EYES)}")
        self.size, self.imsize, self.seed, self.eyes = size, imsize, seed, eyes

    def __len__(self):
        return self.size

    def face(self, i):
        return synthetic_face(np.random.default_rng([self.seed, i]), self.imsize, eyes=self.eyes)

    def __getitem__(self, i):
        return to_tensor(self.face(i)[0])


class ImageFolders(ConcatDataset):
    """Several image folders as one dataset, each prepared with its own crop (e.g. full-size CelebA
    cut at 160 and half-size CelebA cut at 80: the same faces' framing at two resolutions)."""

    def checked_item(self, i):
        k = bisect.bisect_right(self.cumulative_sizes, i)
        return checked_item(self.datasets[k], i - (self.cumulative_sizes[k - 1] if k else 0))


def make_dataset(kind, imsize, *, folders, synthetic_size, synthetic_eyes, seed, cache_dir, num_workers):
    """The training images: kind 'synthetic', `synthetic_size` built-in faces of `seed` (irises as
    `synthetic_eyes`: see synthetic_face); kind 'celeb',
    the images of `folders` [(folder, crop)] as one dataset, decoded once into a memory-mapped cache
    under `cache_dir` (image_cache.py; None: decoded every time, by `num_workers` processes)."""
    if kind == "synthetic":
        return SyntheticFaces(synthetic_size, imsize, seed, synthetic_eyes)
    parts = [image_folder(path, imsize, crop, cache_dir, num_workers) for path, crop in folders]
    return parts[0] if len(parts) == 1 else ImageFolders(parts)


def image_folder(path, imsize, crop, cache_dir=None, num_workers=0):
    folder = ImageFolderFlat(path, imsize, crop)
    if cache_dir is None:
        return folder
    try:  # decoded once into a memory-mapped file (image_cache.py)
        return cached(folder, cache_dir, num_workers)
    except OSError as e:  # no space, or --cache_dir not writable: training still works, slower
        print(f"image cache not used ({e}); decoding the images every step instead")
        return folder


# ----------------------------------------------------------------------------- loading

class StepBatchSampler:
    """Endless batches of indices; epoch e is a permutation seeded by (seed, e), batches never span
    two epochs (the tail that doesn't fill a batch is dropped), and iteration starts at `start_step`.

    With several ranks (DDP) the global batch of a step is the same slice of the same permutation
    whatever the world size, and rank r gets the r-th `batch_size` of it: the data order stays a pure
    function of (seed, step, global batch), so a run resumes exactly on any number of GPUs that
    keeps the global batch.
    """

    def __init__(self, n, batch_size, seed, start_step=0, rank=0, world_size=1):
        global_batch = batch_size * world_size
        if n < global_batch:
            per_rank = f" ({world_size} ranks x {batch_size})" if world_size > 1 else ""
            raise ValueError(f"the dataset has {n} images, fewer than the global batch {global_batch}"
                             f"{per_rank}: lower --batch_size or add images")
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.rank, self.global_batch = rank, global_batch
        self.steps_per_epoch = n // global_batch

    def __iter__(self):
        epoch, b = divmod(self.start_step, self.steps_per_epoch)
        lo = self.rank * self.batch_size  # this rank's slice of each global batch
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            for b in range(b, self.steps_per_epoch):
                start = b * self.global_batch + lo
                yield perm[start:start + self.batch_size].tolist()
            epoch, b = epoch + 1, 0


def checked_item(dataset, i):
    """(item i, [(path, reason) of files skipped to find it]); only image folders skip files."""
    return dataset.checked_item(i) if hasattr(dataset, "checked_item") else (dataset[i], [])


class _WithSkipped(Dataset):
    """Items as (image, skipped files): the names of bad files travel with the batch, so the main
    process learns them whichever worker process decoded them."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return checked_item(self.dataset, i)

    def __getitems__(self, indices):
        # the image cache reads a whole batch at once; the DataLoader only asks the outer dataset
        if hasattr(self.dataset, "__getitems__"):
            return [(image, []) for image in self.dataset.__getitems__(indices)]
        return [self[i] for i in indices]


def _collate(items):
    """[(tensor, skipped files)] -> (stacked tensors, all skipped files)."""
    images, skipped = zip(*items)
    return torch.stack(images), [s for sk in skipped for s in sk]


class Unreadable:
    """The unreadable files met so far; each is named in a warning the first time it is met."""

    def __init__(self):
        self.seen = set()

    def met(self, skipped):
        """Note a batch's skipped files [(path, reason)]; returns their paths."""
        for path, reason in skipped:
            if path not in self.seen:
                self.seen.add(path)
                warnings.warn(f"unreadable image {path!r} ({reason}); replaced by the next "
                              f"readable file, training goes on")
        return {path for path, _ in skipped}


def _ignore_stop_signals(worker_id):
    # Ctrl-C and a scheduler's SIGTERM reach the whole process group: a worker that died of them
    # would break the batch the main process needs to finish its step and save.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def training_batches(dataset, batch_size, seed, start_step=0, rank=0, world_size=1, num_workers=0):
    """Endless iterator of this rank's image batches (batch_size, 3, imsize, imsize), in the order of
    (seed, step) from `start_step`, loaded by `num_workers` processes.

    Each unreadable file is named once in a warning; the number met is reported at the end of every
    epoch that met any."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step, rank, world_size)
    # DataLoader draws its workers' base seed from the global torch RNG unless given a generator:
    # that extra draw at every (re)start would make a resumed run's noise differ from the original.
    loader = DataLoader(_WithSkipped(dataset), batch_sampler=sampler, collate_fn=_collate,
                        num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(seed),
                        worker_init_fn=_ignore_stop_signals if num_workers > 0 else None)
    unreadable, epoch_bad = Unreadable(), set()
    for step, (images, skipped) in enumerate(loader, start=start_step + 1):
        epoch_bad |= unreadable.met(skipped)
        if step % sampler.steps_per_epoch == 0 and epoch_bad:
            print(f"epoch {step // sampler.steps_per_epoch}: {len(epoch_bad)} unreadable image "
                  f"file(s) replaced ({len(unreadable.seen)} in this run so far); remove or fix them",
                  flush=True)
            epoch_bad = set()
        yield images
