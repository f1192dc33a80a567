"""FID and KID of a checkpoint's generator against a folder of real images.

    python evaluate.py --checkpoint models/sagan_celeb/latest.pt --real dataset/celebA --num_samples 50000
    python evaluate.py ... --feature_weights weights-inception-2015-12-05-6726825d.pth   # offline

The metrics are torchmetrics' FrechetInceptionDistance and KernelInceptionDistance on the standard
FID Inception-v3 pool features (torch-fidelity's port of the TensorFlow graph, the network every GAN
paper's FID comes from). torchmetrics because it takes features in batches as they are made (no
50,000 PNGs on disk), accepts any feature network (so the tests run this same path with a small
stand-in) and is maintained by Lightning; torch-fidelity supplies the weights.

Images reach the feature network as uint8 at the generator's resolution, real ones cut and resized
exactly as for training. Real features are cached per folder (its file list, sizes and times), image
size, crop, number of images and feature network under --cache_dir.
"""
import hashlib
import json
import os

import torch
from torch import nn

from checkpoint import atomic_save, load_models
from cli import Parser, UserError, reason, run
from config import load_config
from data_loader import ImageFolderFlat, find_images
from utils import pick_device

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


# ----------------------------------------------------------------------------- feature networks

class InceptionFeatures(nn.Module):
    """uint8 (B, 3, H, W) -> (B, 2048) Inception-v3 pool3 features, the network of published FIDs."""

    num_features = 2048
    name = "inception-v3-pool3"

    def __init__(self, weights_path=None):
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError:
            raise UserError("FID needs torchmetrics and torch-fidelity: "
                            "pip install torchmetrics torch-fidelity") from None
        if weights_path is not None and not os.path.isfile(weights_path):
            raise UserError(f"--feature_weights {weights_path!r} does not exist; download {INCEPTION_URL}")
        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=weights_path)
        except OSError as e:  # URLError (no internet) is an OSError
            raise UserError(f"the Inception weights for FID/KID could not be downloaded ({e}): on a "
                            f"machine with internet download {INCEPTION_URL} and pass "
                            f"--feature_weights PATH") from None
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(f"--feature_weights {weights_path!r} is not the FID Inception weights file "
                            f"({reason(e, 100)}); download {INCEPTION_URL}") from None

    def forward(self, images):
        return self.net(images)


class RandomConvFeatures(nn.Module):
    """A fixed random conv net, uint8 (B, 3, H, W) -> (B, 16): a stand-in feature network for smoke
    tests on machines without the Inception weights. Its FID is NOT comparable to published numbers.
    Few features, so a few dozen images already give a full-rank covariance."""

    num_features = 16
    name = "random-conv-16"

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


def make_features(kind, weights_path=None):
    if kind == "randconv":
        return RandomConvFeatures()
    return InceptionFeatures(weights_path)


class _GivenFeatures(nn.Module):
    """Hands torchmetrics features we computed once for both metrics (its 'feature network')."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features

    def forward(self, features):
        return features


# ----------------------------------------------------------------------------- images -> features

def to_uint8(x):
    """[-1, 1] float images -> uint8, the values a saved PNG would hold."""
    return ((x + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


@torch.no_grad()
def features_of(batches, features, device):
    """Concatenated features (N, F) float64 on the CPU of every [-1, 1] image batch."""
    out = [features(to_uint8(x.to(device))).double().cpu() for x in batches]
    return torch.cat(out)


def fake_batches(G, num_samples, batch_size, seed, device):
    """Generated images in batches; z drawn from a seeded generator, so a rerun sees the same images."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(num_samples, G.z_dim, generator=g)  # (N, z_dim)
    for i in range(0, num_samples, batch_size):
        yield G(z[i:i + batch_size].to(device))


def real_subset(folder, num_real):
    """Indices of the real images used: all of them, or a fixed random `num_real` of them."""
    n = len(find_images(folder))
    if num_real is None or num_real >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(0))[:num_real].tolist())


def folder_fingerprint(folder):
    """Changes when an image is added, removed, replaced or edited."""
    h = hashlib.sha1()
    for path in find_images(folder):
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, folder)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def real_features(folder, imsize, crop, num_real, features, batch_size, device, cache_dir):
    """Features of the real images, from the cache when folder, size, crop, count and network match."""
    key = dict(folder=os.path.realpath(folder), imsize=imsize, crop=crop, num_real=num_real,
               features=features.name, fingerprint=folder_fingerprint(folder))
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"real_{digest}.pt")
    if os.path.isfile(path):
        cached = torch.load(path, weights_only=True)
        if cached["key"] == key:
            return cached["features"], f"cached {path}"
    dataset = ImageFolderFlat(folder, imsize, crop)
    idx = real_subset(folder, num_real)
    batches = (torch.stack([dataset[i] for i in idx[j:j + batch_size]]) for j in range(0, len(idx), batch_size))
    feats = features_of(batches, features, device)
    os.makedirs(cache_dir, exist_ok=True)
    atomic_save(dict(key=key, features=feats), path)
    return feats, f"computed, cached in {path}"


# ----------------------------------------------------------------------------- metrics

def fid_kid(real, fake, kid_subset_size=1000, kid_subsets=100, seed=0):
    """FID and KID (mean, std over subsets) of two feature matrices (N, F), by torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    F_ = real.shape[1]
    subset = min(kid_subset_size, len(real), len(fake))
    fid = FrechetInceptionDistance(feature=_GivenFeatures(F_))
    kid = KernelInceptionDistance(feature=_GivenFeatures(F_), subsets=kid_subsets, subset_size=subset)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    with torch.random.fork_rng():  # KID's subsets come from the global RNG: make them repeatable
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return dict(fid=fid.compute().item(), kid=kid_mean.item(), kid_std=kid_std.item(), kid_subset_size=subset)


# ----------------------------------------------------------------------------- command line

def build_parser():
    p = Parser(prog="evaluate.py", description="FID and KID of a SAGAN checkpoint.")
    a = p.add_argument
    a("--checkpoint", required=True, help="a checkpoint of main.py (ckpt_*.pt or latest.pt)")
    a("--real", required=True, help="folder of real images, any nesting")
    a("--num_samples", type=int, default=50_000, help="generated images")
    a("--num_real", type=int, default=50_000, help="real images at most (a fixed random subset)")
    a("--center_crop", type=int, default=None, help="crop of the real images (default: the run's)")
    a("--batch_size", type=int, default=100)
    a("--device", default="auto")
    a("--seed", type=int, default=0, help="seed of the generated images' z and of KID's subsets")
    a("--raw_g", action="store_true", help="evaluate the raw G, not the EMA generator")
    a("--features", choices=["inception", "randconv"], default="inception",
      help="inception: the standard FID network; randconv: a random stand-in for smoke tests only")
    a("--feature_weights", default=None, metavar="PATH",
      help=f"offline copy of the Inception weights ({INCEPTION_URL})")
    a("--cache_dir", default=os.path.join(".cache", "fid_real"), help="where real features are cached")
    a("--kid_subset_size", type=int, default=1000)
    a("--kid_subsets", type=int, default=100)
    a("--json", default=None, metavar="PATH", help="also write the numbers here")
    return p


def evaluate(args):
    for name in ("num_samples", "num_real", "batch_size", "kid_subset_size", "kid_subsets"):
        if getattr(args, name) < 2:
            raise UserError(f"--{name} must be at least 2, got {getattr(args, name)}")
    if not os.path.isdir(args.real):
        raise UserError(f"--real {args.real!r} is not a folder of images")
    device = pick_device(args.device)
    loaded = load_models(args.checkpoint, device, ema=not args.raw_g)
    G = loaded.G
    crop = args.center_crop if args.center_crop is not None else load_config(loaded.config).crop_for(args.real)
    features = make_features(args.features, args.feature_weights).to(device)

    real, how = real_features(args.real, G.image_size, crop, args.num_real, features, args.batch_size,
                              device, args.cache_dir)
    print(f"real: {len(real)} images of {args.real} at {G.image_size}px, crop {crop}: {how}")
    fake = features_of(fake_batches(G, args.num_samples, args.batch_size, args.seed, device), features, device)
    scores = fid_kid(real, fake, args.kid_subset_size, args.kid_subsets, args.seed)
    scores.update(checkpoint=args.checkpoint, step=loaded.step, generator="EMA" if loaded.ema else "raw",
                  num_fake=len(fake), num_real=len(real), features=features.name)
    return scores


def main(argv=None):
    """Evaluate, print the scores in one line and write them to --json."""
    args = build_parser().parse_args(argv)
    try:
        s = evaluate(args)
    except (FileNotFoundError, ValueError) as e:  # the real images' checks (data_loader)
        raise UserError(str(e)) from None
    note = "" if s["features"].startswith("inception") else " (stand-in features: NOT comparable to published FID)"
    print(f"step {s['step']} ({s['generator']} G) | FID {s['fid']:.4f} | KID {s['kid']:.5f} ± {s['kid_std']:.5f} "
          f"| {s['num_fake']} generated vs {s['num_real']} real, {s['features']}{note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=2)


if __name__ == "__main__":
    run("evaluate.py", main)
