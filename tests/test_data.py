"""Datasets: built-in faces, image folders of any nesting, the real CelebA sample, data order."""
import os
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CELEBA_SAMPLE
from data_loader import ImageFolderFlat, StepBatchSampler, SyntheticFaces, find_images, synthetic_face



@pytest.mark.parametrize("imsize", [32, 64, 128, 256])
def test_synthetic_faces_any_size_in_range(imsize):
    x = SyntheticFaces(4, imsize, seed=1)[3]
    assert x.shape == (3, imsize, imsize) and x.dtype == torch.float32
    assert -1 <= x.min() and x.max() <= 1 and x.std() > 0.1


def test_synthetic_faces_deterministic_from_seed():
    a, b, c = SyntheticFaces(8, 32, seed=5), SyntheticFaces(8, 32, seed=5), SyntheticFaces(8, 32, seed=6)
    assert torch.equal(a[2], b[2])
    assert not torch.equal(a[2], c[2])
    assert not torch.equal(a[2], a[3])


def test_synthetic_eyes_share_one_colour_placed_symmetrically():
    img, meta = synthetic_face(np.random.default_rng(3), 128)
    (lx, ly), (rx, ry) = meta["eyes_xy"]
    assert ly == ry and lx < rx
    left, right = img[int(ly), int(lx)], img[int(ry), int(rx)]  # pixel at each eye's centre
    expected = np.round(np.array(meta["eye_rgb"]) * 255)
    np.testing.assert_allclose(left, expected, atol=2)
    np.testing.assert_allclose(right, expected, atol=2)


def write_jpeg(path, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


def test_image_folder_reads_any_nesting_and_crops(tmp_path):
    write_jpeg(tmp_path / "img_align_celeba" / "000001.jpg", (178, 218), (255, 0, 0))
    write_jpeg(tmp_path / "a" / "b" / "c" / "x.JPG", (40, 90), (0, 255, 0))
    Image.new("L", (50, 50), 128).save(tmp_path / "gray.png")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderFlat(str(tmp_path), imsize=32, crop=160)
    assert len(ds) == 3
    x = ds[[p.endswith("000001.jpg") for p in ds.paths].index(True)]
    assert x.shape == (3, 32, 32)
    assert x[0].mean() > 0.9 and x[1].mean() < -0.9  # red, scaled to [-1, 1]
    assert ds[[p.endswith("gray.png") for p in ds.paths].index(True)].shape == (3, 32, 32)


def test_missing_or_empty_folder_says_where_to_get_celeba(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: get CelebA"):
        ImageFolderFlat(str(tmp_path / "nope"), 32)
    with pytest.raises(FileNotFoundError, match="no images .* dataset/celebA"):
        ImageFolderFlat(str(tmp_path), 32)


@pytest.mark.skipif(not CELEBA_SAMPLE.is_dir(), reason="real CelebA sample (../shared/data/celeba_sample) not here")
def test_real_celeba_sample():
    ds = ImageFolderFlat(str(CELEBA_SAMPLE), imsize=64)
    assert len(ds) == 2000  # img_align_celeba/*.jpg found without a class folder
    x = torch.stack([ds[i] for i in range(0, 2000, 400)])
    assert x.shape == (5, 3, 64, 64)
    assert -1 <= x.min() < -0.5 and 0.5 < x.max() <= 1


def test_data_order_is_a_function_of_seed_and_step():
    full = list(islice(iter(StepBatchSampler(10, 3, seed=1)), 7))  # 3 batches an epoch, tail dropped
    resumed = list(islice(iter(StepBatchSampler(10, 3, seed=1, start_step=4)), 3))
    assert resumed == full[4:7]
    epoch0 = [i for b in full[:3] for i in b]
    assert len(set(epoch0)) == 9  # no repeats within an epoch
    assert full[:3] != full[3:6]  # reshuffled each epoch
    assert full != list(islice(iter(StepBatchSampler(10, 3, seed=2)), 7))


def test_too_few_images_for_a_batch():
    with pytest.raises(ValueError, match="fewer than the global batch 8: lower --batch_size"):
        StepBatchSampler(5, 8, seed=0)


def test_find_images_skips_hidden_and_sorts(tmp_path):
    write_jpeg(tmp_path / "b.jpg", (8, 8), (0, 0, 0))
    write_jpeg(tmp_path / "a.jpg", (8, 8), (0, 0, 0))
    write_jpeg(tmp_path / ".hidden" / "c.jpg", (8, 8), (0, 0, 0))
    assert [os.path.basename(p) for p in find_images(str(tmp_path))] == ["a.jpg", "b.jpg"]


def framed_face(size):
    """A 178x218-shaped test image (scaled to `size`): inside its centre 160/178 square the left half
    is red and the right half blue; outside it, green. Cut at 160 (full size) or 80 (half size), only
    red and blue remain."""
    w, h = size
    s = w * 160 / 178
    left, top = (w - s) / 2, (h - s) / 2
    img = Image.new("RGB", size, (0, 255, 0))
    img.paste((255, 0, 0), (round(left), round(top), round(w / 2), round(top + s)))
    img.paste((0, 0, 255), (round(w / 2), round(top), round(left + s), round(top + s)))
    return img


def test_two_folders_each_with_its_own_crop(tmp_path):
    from data_loader import ImageFolders
    from main import dataset_for, parse_args

    full, half = tmp_path / "full", tmp_path / "half"
    for folder, size, n in ((full, (178, 218), 3), (half, (89, 109), 5)):
        folder.mkdir()
        for i in range(n):
            framed_face(size).save(folder / f"{i:06d}.jpg", quality=95)
    config = parse_args(["--image_path", str(full), str(half), "--center_crop", "160", "80",
                         "--imsize", "32", "--cache", "off"])
    ds = dataset_for(config)
    assert isinstance(ds, ImageFolders) and len(ds) == 8
    a, b = ds[0], ds[7]  # one image of each folder
    for x in (a, b):
        assert x[1].max() < -0.5, "green frame inside the crop"  # the frame was cut off
        assert x[0, :, :12].mean() > 0.8 and x[2, :, -12:].mean() > 0.8  # red left, blue right
    assert (a - b).abs().mean() < 0.1  # the two resolutions frame the face alike
    image, skipped = ds.checked_item(7)
    assert torch.equal(image, b) and skipped == []
    assert config.crop_for(str(half)) == 80 and config.crop_for(str(full)) == 160
    # one crop for both: the half-size images keep their green frame
    wrong = dataset_for(parse_args(["--image_path", str(full), str(half), "--center_crop", "160",
                                     "--imsize", "32", "--cache", "off"]))
    assert wrong[7][1].max() > 0.5


def test_center_crop_count_must_match_folders(tmp_path, capsys):
    from main import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--image_path", "a", "b", "c", "--center_crop", "160", "80"])
    assert e.value.code == 2
    assert "--center_crop has 2 values for 3 --image_path folders" in capsys.readouterr().err
