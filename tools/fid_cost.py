"""What one FID evaluation during training costs (--fid_every): seconds per TrainingFID.measure.

    python -m tools.fid_cost --network randconv inception --n 500 2000 --imsize 32 64

For each (network, N, image size): a generator of the quick preset's widths at that size, the
built-in faces as real images, one measure() that also computes the real features (once per run)
and a second one, the cost of every later evaluation. Prints a table and a JSON last line.
"""
import itertools
import json
import time

import torch

from cli import Parser, run
from fid import TrainingFID, load_network, synthetic_source
from sagan_models import Generator, default_attn


def main(argv=None):
    p = Parser(prog="tools.fid_cost", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--network", nargs="+", default=["randconv", "inception"], choices=["randconv", "inception"])
    a("--n", type=int, nargs="+", default=[500, 2000])
    a("--imsize", type=int, nargs="+", default=[32, 64])
    a("--device", default="cpu")
    a("--cache_dir", default="/tmp/fid_cost_cache")
    args = p.parse_args(argv)
    rows = []
    for kind, n, imsize in itertools.product(args.network, args.n, args.imsize):
        net = load_network(kind)
        G = Generator(imsize, 128, 32, default_attn(imsize, "g")).to(args.device)
        dataset, source = synthetic_source(max(n, 2000), imsize, 0)
        hook = TrainingFID(dataset, source, n, torch.device(args.device), net,
                           cache_dir=f"{args.cache_dir}/{time.time_ns()}")  # a fresh cache: real features timed
        first = hook.measure(G, 0)["fid_s"]
        later = hook.measure(G, 1)["fid_s"]
        rows.append(dict(network=net.describe(), n=n, imsize=imsize, first_s=round(first, 1), later_s=round(later, 1),
                         images_per_s=round(n / later, 2), threads=torch.get_num_threads()))
        print(f"{kind:>9} N={n:<5} {imsize}px: first {first:7.1f} s (real features too), "
              f"then {later:7.1f} s per evaluation ({n / later:.1f} generated images/s)", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    run("tools.fid_cost", main)
