"""The image cache gives exactly the pixels the folder loader gives, is rebuilt when its key changes
and only then, and never leaves a half-built file that looks complete."""
import glob
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CELEBA_SAMPLE, ROOT, SMOKE
from data_loader import ImageFolderFlat
from image_cache import cache_path, cached

CELEBA = str(CELEBA_SAMPLE / "img_align_celeba")


def write_jpegs(folder, n, size=(178, 218), seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"{i:03d}.jpg"), quality=90)


def npy_files(cache_dir):
    return sorted(glob.glob(os.path.join(cache_dir, "*")))


def test_cache_serves_exactly_the_folder_pixels_in_any_batch_order(tmp_path):
    write_jpegs(tmp_path / "img" / "sub", 7)
    folder = ImageFolderFlat(str(tmp_path / "img"), 32, 160)
    data = cached(folder, str(tmp_path / "cache"), progress=False)
    assert len(data) == 7
    for i in range(7):
        assert torch.equal(data[i], folder[i])
    batch = data.__getitems__([5, 0, 3])
    assert all(torch.equal(b, folder[i]) for b, i in zip(batch, [5, 0, 3]))
    assert data.arr.dtype == np.uint8 and data.arr.shape == (7, 32, 32, 3)


def test_cache_is_reused_and_rebuilt_only_when_its_key_changes(tmp_path):
    write_jpegs(tmp_path / "img", 4)
    cache_dir = str(tmp_path / "cache")
    folder = ImageFolderFlat(str(tmp_path / "img"), 32, 160)
    first = cached(folder, cache_dir, progress=False).path
    stamp = os.stat(first).st_mtime_ns
    assert cached(ImageFolderFlat(str(tmp_path / "img"), 32, 160), cache_dir, progress=False).path == first
    assert os.stat(first).st_mtime_ns == stamp  # not rebuilt

    # an edited image: same name, new content and mtime -> new cache, old one removed
    p = tmp_path / "img" / "002.jpg"
    Image.fromarray(np.zeros((218, 178, 3), np.uint8)).save(p)
    os.utime(p, ns=(stamp + 10**9, stamp + 10**9))
    edited = ImageFolderFlat(str(tmp_path / "img"), 32, 160)
    second = cached(edited, cache_dir, progress=False)
    assert second.path != first and npy_files(cache_dir) == [second.path]
    assert torch.equal(second[2], edited[2]) and second[2].min() == -1  # the black image

    # another image size or crop is another cache, next to the first
    other = cached(ImageFolderFlat(str(tmp_path / "img"), 64, 120), cache_dir, progress=False)
    assert len(npy_files(cache_dir)) == 2 and other.arr.shape == (4, 64, 64, 3)

    # a new file changes the key too
    write_jpegs(tmp_path / "img" / "more", 1, seed=1)
    assert cache_path(ImageFolderFlat(str(tmp_path / "img"), 32, 160), cache_dir) != second.path


def test_unreadable_image_is_named_once_and_cached_as_the_next_readable_one(tmp_path, capsys):
    write_jpegs(tmp_path / "img", 3)
    (tmp_path / "img" / "001.jpg").write_bytes(b"not a jpeg")
    folder = ImageFolderFlat(str(tmp_path / "img"), 32, 160)
    with pytest.warns(UserWarning, match=r"unreadable image .*001\.jpg") as record:
        images = cached(folder, str(tmp_path / "cache"), progress=False)
    assert sum("001.jpg" in str(w.message) for w in record) == 1
    assert "1 unreadable image file(s) replaced" in capsys.readouterr().out
    assert len(npy_files(tmp_path / "cache")) == 1  # the cache, no .partial left
    bad = [p.endswith("001.jpg") for p in folder.paths].index(True)
    assert torch.equal(images[bad], images[bad + 1])  # as training without the cache does


def test_training_builds_the_cache_once_with_a_progress_bar_and_reuses_it(tmp_path):
    write_jpegs(tmp_path / "img", 8)
    args = [sys.executable, "main.py", *SMOKE, "--dataset", "celeb", "--image_path", str(tmp_path / "img"),
            "--model_save_path", str(tmp_path / "m"), "--sample_path", str(tmp_path / "s"),
            "--cache_dir", str(tmp_path / "cache")]
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "caching 8 images at 32px" in first.stdout and "image cache built" in first.stdout
    assert len(npy_files(tmp_path / "cache")) == 1
    again = subprocess.run(args + ["--version", "again"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "caching" not in again.stdout and "step 2/2" in again.stdout
    off = subprocess.run(args + ["--version", "off", "--cache", "off", "--cache_dir", str(tmp_path / "c2")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert off.returncode == 0, off.stderr
    assert not os.path.exists(tmp_path / "c2")


@pytest.mark.skipif(not os.path.isdir(CELEBA), reason="CelebA sample not present")
def test_real_celeba_jpegs_cache_matches_decoding(tmp_path):
    os.makedirs(tmp_path / "img")
    for name in sorted(os.listdir(CELEBA))[:12]:
        shutil.copy2(os.path.join(CELEBA, name), tmp_path / "img")
    folder = ImageFolderFlat(str(tmp_path / "img"), 64, 160)
    data = cached(folder, str(tmp_path / "cache"), progress=False)
    for i in (0, 5, 11):
        assert torch.equal(data[i], folder[i])
