"""Datasets, transforms and the training loader.

- `ImageFolderFlat`: every image under a folder, any nesting (CelebA's archive unpacks to
  img_align_celeba/*.jpg; no class folder needed). Center-crop, resize, scale to [-1, 1].
- `SyntheticFaces`: the built-in dataset, procedurally generated face-like images with long-range
  rules a convolution alone gets wrong easily: both eyes share one random colour and sit
  symmetrically about the face's axis; the hair is one colour all around the face.
- `training_batches`: endless batches whose order is a pure function of (seed, step), so a resumed
  run sees exactly the batches the uninterrupted run would have.
"""
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

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


def to_tensor(img):
    """uint8 (H, W, 3) array or PIL image -> float (3, H, W) in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def center_crop_resize(img, imsize, crop):
    """Center square of side `crop` (the largest square when 0 or when the image is smaller), resized."""
    w, h = img.size
    side = min(w, h) if crop <= 0 else min(crop, w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img.resize((imsize, imsize), Image.BICUBIC, reducing_gap=None)


class ImageFolderFlat(Dataset):
    def __init__(self, root, imsize, crop=160):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist: {CELEBA_HINT}")
        self.paths = find_images(root)
        if not self.paths:
            raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {root!r}: {CELEBA_HINT}")
        self.root, self.imsize, self.crop = root, imsize, crop

    def __len__(self):
        return len(self.paths)

    def pixels(self, i):
        """Image i cropped and resized: uint8 (imsize, imsize, 3), what the image cache stores."""
        with Image.open(self.paths[i]) as img:
            return np.array(center_crop_resize(img.convert("RGB"), self.imsize, self.crop), dtype=np.uint8)

    def __getitem__(self, i):
        return to_tensor(self.pixels(i))


# ----------------------------------------------------------------------------- built-in faces

def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def synthetic_face(rng, imsize, supersample=2):
    """One face-like image as uint8 (imsize, imsize, 3), and the facts its rules are about.

    Geometry is drawn in unit coordinates on a supersampled grid and box-filtered down, so edges are
    anti-aliased at every image size. `meta` has the eye centres in image pixels (x, y) and the
    shared eye colour, which is what a long-range-structure score checks on generated images.
    """
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
    for ex in (cx - dx, cx + dx):  # mirror images about the face's vertical axis
        img[_ellipse(yy, xx, ey, ex, er * 0.8, er * 1.5)] = 1.0
        img[_ellipse(yy, xx, ey, ex, er * 0.75, er * 0.75)] = eye
    mouth = _ellipse(yy, xx, cy + 0.17, cx, 0.03, rng.uniform(0.07, 0.11))
    img[mouth] = np.array([0.75, 0.2, 0.25]) * rng.uniform(0.6, 1.0)

    img = img.reshape(imsize, supersample, imsize, supersample, 3).mean(axis=(1, 3))
    meta = dict(eyes_xy=[((cx - dx) * imsize, ey * imsize), ((cx + dx) * imsize, ey * imsize)],
                eye_rgb=eye.tolist(), hair_rgb=hair.tolist())
    return (img * 255).round().clip(0, 255).astype(np.uint8), meta


class SyntheticFaces(Dataset):
    """`size` built-in faces at `imsize`; face i depends only on (seed, i), at any image size."""

    def __init__(self, size, imsize, seed=0):
        self.size, self.imsize, self.seed = size, imsize, seed

    def __len__(self):
        return self.size

    def face(self, i):
        return synthetic_face(np.random.default_rng([self.seed, i]), self.imsize)

    def __getitem__(self, i):
        return to_tensor(self.face(i)[0])


def make_dataset(config):
    if config.dataset == "synthetic":
        return SyntheticFaces(config.synthetic_size, config.imsize, config.seed)
    folder = ImageFolderFlat(config.image_path, config.imsize, config.center_crop)
    if config.cache == "off":
        return folder
    from image_cache import cached  # decoded once into a memory-mapped file (image_cache.py)
    try:
        return cached(folder, config.cache_dir, config.num_workers)
    except OSError as e:  # no space, or --cache_dir not writable: training still works, slower
        print(f"image cache not used ({e}); decoding the images every step instead")
        return folder


# ----------------------------------------------------------------------------- loading

class StepBatchSampler:
    """Endless batches of indices; epoch e is a permutation seeded by (seed, e), batches never span
    two epochs (the tail that doesn't fill a batch is dropped), and iteration starts at `start_step`."""

    def __init__(self, n, batch_size, seed, start_step=0):
        if n < batch_size:
            raise ValueError(f"the dataset has {n} images, fewer than --batch_size {batch_size}: "
                             f"lower --batch_size or add images")
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.steps_per_epoch = n // batch_size

    def __iter__(self):
        epoch, b = divmod(self.start_step, self.steps_per_epoch)
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            for b in range(b, self.steps_per_epoch):
                yield perm[b * self.batch_size:(b + 1) * self.batch_size].tolist()
            epoch, b = epoch + 1, 0


def training_batches(dataset, config, start_step=0):
    """Endless iterator of image batches (B, 3, imsize, imsize), starting at `start_step`."""
    sampler = StepBatchSampler(len(dataset), config.batch_size, config.seed, start_step)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                        pin_memory=torch.cuda.is_available(),
                        persistent_workers=config.num_workers > 0)
    return iter(loader)
