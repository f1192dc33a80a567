"""Check the FID feature network: what it is, and that it measures what FID should.

    python -m tools.fid_check                                  # the wheel's Inception, built-in faces
    python -m tools.fid_check --real ../shared/data/celeba_sample --crop 160 --imsize 64 --n 200
    python -m tools.fid_check --real ../shared/data/celeba_sample --crop 160 \\
        --real2 ../shared/data/celeba_halfres --crop2 80 --imsize 64 --n 2000      # a real-vs-real floor

1. Architecture: the number of convolution layers, the parameters (without a classifier) and the
   feature size, against Inception-v3's 94 / 21,802,784 / 2048 (the stand-in network skips this).
2. Behaviour: two disjoint halves of the same real images score low; the second half shifted (edge
   pixels repeated) or blurred by growing amounts scores higher and higher, each series strictly
   increasing, its smallest above the halves' score. With --real2: the FID of N images of one set
   against N of the other (two folders of the same kind of faces: the floor a model can reach at N).

Prints a table and a JSON last line; a failed check ends with one line and status 1.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from cli import Parser, UserError, run
from fid import (INCEPTION_CONVS, INCEPTION_PARAMS, architecture, features_of, fid_kid, folder_source,
                 load_network, real_batches, real_features, subset, synthetic_source,
                 TorchScriptInception)


def shifted(x, k):
    """uint8 (B, 3, H, W) moved right and down by k pixels, the uncovered edge repeated."""
    H, W = x.shape[-2:]
    return F.pad(x.float(), (k, 0, k, 0), mode="replicate")[..., :H, :W].round().to(torch.uint8)


def blurred(x, sigma):
    size = 2 * int(3 * sigma + 0.5) + 1
    return gaussian_blur(x.float(), [size, size], [sigma, sigma]).round().clamp(0, 255).to(torch.uint8)


def source(where, crop, imsize, flag):
    if where == "synthetic":
        return synthetic_source(4096, imsize, 0)
    return folder_source(where, imsize, crop, ".cache/images", flag=flag)


def check_architecture(net):
    arch = architecture(net)
    print(f"network: {net.describe()}\narchitecture: {arch['convs']} convolution layers, "
          f"{arch['params']:,} parameters, features {arch['features'][1]}", flush=True)
    if net.name.startswith("inception"):
        want = dict(convs=INCEPTION_CONVS, features=(2, 2048))
        if isinstance(net, TorchScriptInception):  # its batch norms hold beta, mean, var as parameters;
            want["params"] = INCEPTION_PARAMS     # another port counts them otherwise
        wrong = {k: (arch[k], v) for k, v in want.items() if arch[k] != v}
        if wrong:
            raise UserError("the feature network is not the FID Inception-v3: "
                            + ", ".join(f"{k} {got} (want {v})" for k, (got, v) in wrong.items()))
    return arch


def behaviour(net, dataset, src, n, levels, batch_size, device, cache_dir):
    """FID of the halves and of each distortion of the second half: {name: fid}."""
    idx = subset(len(dataset), n, src["what"])
    feats, _ = real_features(dataset, src, n, net, batch_size, device, cache_dir)
    half = n // 2
    a, b = feats[:half], feats[half:2 * half]  # idx is sorted: the halves are two parts of the folder
    halves = fid_kid(a, b)
    scores = {"halves": halves["fid"]}
    print(f"{'halves':>14}: FID {halves['fid']:8.2f} | KID {halves['kid']:.5f} ± {halves['kid_std']:.5f} "
          f"| {half} vs {half} disjoint images of {src['what']}", flush=True)
    if not levels:
        return scores
    images = torch.cat(list(real_batches(dataset, idx[half:2 * half], batch_size)))  # (half, 3, H, W) uint8
    side = images.shape[-1]
    for kind, fn in (("shift", shifted), ("blur", blurred)):
        for level in levels:
            amount = max(1, round(level * side)) if kind == "shift" else level * side
            batches = (fn(images[j:j + batch_size], amount) for j in range(0, half, batch_size))
            name = f"{kind} {amount:g}px"
            scores[name] = fid_kid(a, features_of(batches, net, device), kid_subsets=10)["fid"]
            print(f"{name:>14}: FID {scores[name]:8.2f}", flush=True)
    for kind in ("shift", "blur"):
        series = [v for k, v in scores.items() if k.startswith(kind)]
        if series and not all(x < y for x, y in zip(series, series[1:])) or series[0] <= scores["halves"]:
            raise UserError(f"FID does not grow with the {kind}: halves {scores['halves']:.2f}, "
                            f"{kind} " + ", ".join(f"{v:.2f}" for v in series))
    return scores


def main(argv=None):
    p = Parser(prog="tools.fid_check", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--real", default="synthetic", help="folder of real images, or 'synthetic' (built-in faces)")
    a("--crop", type=int, default=160)
    a("--real2", default=None, help="a second real set: report the floor FID(real, real2) at --n")
    a("--crop2", type=int, default=160)
    a("--imsize", type=int, default=32)
    a("--n", type=int, default=200, help="real images (halves of n/2; with --real2, n of each)")
    a("--levels", type=float, nargs="*", default=[1 / 32, 1 / 8, 1 / 4],
      help="shift (pixels) and blur sigma as fractions of the image side; none: the halves' floor only")
    a("--features", choices=["inception", "randconv"], default="inception")
    a("--feature_weights", default=None)
    a("--batch_size", type=int, default=50)
    a("--device", default="cpu")
    a("--cache_dir", default=".cache/fid_real", help="where real features are cached (evaluate.py's)")
    args = p.parse_args(argv)
    if args.n < 4:
        p.error(f"--n must be at least 4, got {args.n}")
    t = time.time()
    net = load_network(args.features, args.feature_weights).to(args.device)
    arch = check_architecture(net)
    dataset, src = source(args.real, args.crop, args.imsize, "--real")
    result = dict(network=net.describe(), architecture=dict(arch, features=arch["features"][1]), n=args.n,
                  imsize=args.imsize)
    if args.real2:
        other, src2 = source(args.real2, args.crop2, args.imsize, "--real2")
        f1, _ = real_features(dataset, src, args.n, net, args.batch_size, args.device, args.cache_dir)
        f2, _ = real_features(other, src2, args.n, net, args.batch_size, args.device, args.cache_dir)
        scores = fid_kid(f1, f2)
        print(f"floor: FID {scores['fid']:.2f} | KID {scores['kid']:.5f} ± {scores['kid_std']:.5f} | "
              f"N = {args.n} of {src['what']} vs {args.n} of {src2['what']} at {args.imsize}px")
        result.update(floor=scores, real=src["what"], real2=src2["what"])
    else:
        result["fid"] = behaviour(net, dataset, src, args.n, args.levels, args.batch_size, args.device,
                                  args.cache_dir)
        if args.levels:
            print("ok: the halves score lowest and FID grows with every shift and blur step")
    result["seconds"] = round(time.time() - t, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    run("tools.fid_check", main)
