"""Quality parity of two precisions: the same recipe trained in each (K seeds each), compared by
FID/KID (evaluate.py) and by the loss and gamma curves (metrics.jsonl), in one table.

    python -m tools.precision_parity --seeds 0,1 --real ../shared/data/celeba_sample \\
        --num_samples 5000 --num_real 2000 -- --dataset celeb --image_path ../shared/data/celeba_sample \\
        --imsize 64 --g_conv_dim 32 --d_conv_dim 32 --batch_size 32 --num_workers 0 --total_step 3000
    python -m tools.precision_parity --features randconv --real REAL -- --preset smoke   # the test's

Flags after `--` are main.py's: the recipe, the same for every run (each run adds --precision, --seed,
--version, the output folders and --no_visdom); the runs are main.py's main, one after another in
this process. Runs already finished are kept, unfinished ones resumed, so the command can be run
again after an interruption (Ctrl-C saves the current run, as main.py does). bf16 is at parity when
its mean FID differs from fp32's by no more than the seeds' spread (the larger of the two precisions'
seed-to-seed FID ranges) and its curves are no further from fp32's than fp32's seeds are from each
other. The numbers go to <--out>/parity.json too.
"""
import json
import os
import statistics
import sys

import evaluate
import main as sagan_main
from checkpoint import load_checkpoint
from cli import Parser, UserError, run
from metrics import read_records

PROG = "tools.precision_parity"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # main.py's folder
CURVES = ("d_loss", "g_loss")  # and every gamma/* series


def build_parser():
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--precisions", default="fp32,bf16", help="comma-separated, the first is the reference")
    a("--seeds", default="0,1", help="comma-separated training seeds, the same for every precision")
    a("--real", required=True, help="folder of real images for FID/KID (evaluate.py --real)")
    a("--features", choices=["inception", "randconv"], default="inception", help="as evaluate.py's")
    a("--feature_weights", default=None, metavar="PATH", help="as evaluate.py's")
    a("--num_samples", type=int, default=5000, help="generated images per run for FID/KID")
    a("--num_real", type=int, default=5000, help="real images at most")
    a("--kid_subset_size", type=int, default=1000)
    a("--eval_batch_size", type=int, default=100)
    a("--out", default=os.path.join("runs", "precision_parity"), help="the runs' folders and parity.json")
    return p


def parse(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    args.recipe = argv[split + 1:]
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r} is not a comma-separated list of integers") from None
    if len(args.precisions) < 2 or len(args.seeds) < 1:
        raise UserError("--precisions needs two or more precisions and --seeds one or more seeds")
    return args


def run_flags(args, prec, seed):
    version = f"{prec}_seed{seed}"
    return [*args.recipe, "--precision", prec, "--seed", str(seed), "--version", version,
            "--model_save_path", os.path.join(args.out, "models"),
            "--sample_path", os.path.join(args.out, "samples"), "--no_visdom"]


def train(args, prec, seed):
    """main.py's main on the recipe in `prec` with `seed`, resumed if begun, skipped if finished;
    the run folder."""
    flags = run_flags(args, prec, seed)
    config = sagan_main.parse_args(flags)  # the recipe's flags checked, as main.py checks them
    run_dir = os.path.join(config.model_save_path, config.version)
    latest = os.path.join(run_dir, "latest.pt")
    if os.path.exists(latest):
        if load_checkpoint(latest)["step"] >= config.total_step:
            return run_dir
        flags.append("--resume")
    print(f"[{config.version}] python main.py {' '.join(flags)}", flush=True)
    try:
        sagan_main.main(flags)
    except SystemExit as e:
        if e.code not in (0, None):
            raise UserError(f"the {config.version} run stopped ({e.code}); run the same command again to "
                            f"resume it") from None
    return run_dir


def scores(args, run_dir):
    """evaluate.py's FID/KID of the run's latest checkpoint (EMA generator when there is one)."""
    ev = evaluate.build_parser().parse_args([
        "--checkpoint", os.path.join(run_dir, "latest.pt"), "--real", args.real, "--features", args.features,
        "--num_samples", str(args.num_samples), "--num_real", str(args.num_real),
        "--batch_size", str(args.eval_batch_size), "--kid_subset_size", str(args.kid_subset_size),
        "--cache_dir", os.path.join(args.out, "fid_real"),
        *(["--feature_weights", args.feature_weights] if args.feature_weights else [])])
    return evaluate.evaluate(ev)[0]  # one result per --real set: here one


def curves(run_dir):
    """{series: {step: value}} of the losses and every gamma in metrics.jsonl."""
    out = {}
    for r in read_records(os.path.join(run_dir, "metrics.jsonl")):
        for k, v in r.items():
            if k in CURVES or k.startswith("gamma/"):
                out.setdefault(k, {})[r["step"]] = v
    return out


def compared(c):
    """The curves as compared: every gamma by its magnitude ('|gamma/G32|'). A gamma's sign is not a
    property of the recipe: gamma·o is unchanged when gamma and the value projection both change
    sign, and the same recipe's seeds do land on either sign (the showcase recipe's G32: +0.13 on one
    seed, -0.13 on another), so signed seed-mean curves would average to about 0."""
    out = {}
    for k, series in c.items():
        if k.startswith("gamma/"):
            k, series = f"|{k}|", {s: abs(v) for s, v in series.items()}
        out[k] = series
    return out


def seed_mean(runs, series):
    """The seeds' mean curve of one series, on the steps every run logged."""
    steps = sorted(set.intersection(*(set(c[series]) for c in runs)))
    return {s: statistics.fmean(c[series][s] for c in runs) for s in steps}


def mean_abs_gap(a, b):
    steps = sorted(set(a) & set(b))
    return statistics.fmean(abs(a[s] - b[s]) for s in steps) if steps else float("nan")


def compare(args, results):
    """The table rows and the verdicts, as a dict (also parity.json)."""
    ref = args.precisions[0]
    summary = {}
    for prec in args.precisions:
        fids = [results[prec][s]["fid"] for s in args.seeds]
        kids = [results[prec][s]["kid"] for s in args.seeds]
        summary[prec] = dict(fid_mean=statistics.fmean(fids), fid_range=[min(fids), max(fids)],
                             kid_mean=statistics.fmean(kids), kid_range=[min(kids), max(kids)])
    # the curves: how far each precision's seed-mean curve is from the reference's, against how far
    # the reference's own seeds are from each other (the noise floor of "the same recipe")
    runs = {p: [compared(results[p][s]["curves"]) for s in args.seeds] for p in args.precisions}
    ref_runs = runs[ref]
    names = sorted(set.intersection(*(set(c) for p in args.precisions for c in runs[p])))
    curve_gaps = {}
    for name in names:
        floor = (statistics.fmean(mean_abs_gap(a[name], b[name]) for i, a in enumerate(ref_runs)
                                  for b in ref_runs[i + 1:]) if len(ref_runs) > 1 else float("nan"))
        ref_mean = seed_mean(ref_runs, name)
        curve_gaps[name] = {"seed_to_seed_" + ref: floor, **{
            p: mean_abs_gap(seed_mean(runs[p], name), ref_mean)
            for p in args.precisions[1:]}}
    verdicts = {}
    for p in args.precisions[1:]:
        # the noise floor: the larger of the two precisions' own seed-to-seed FID ranges
        spread = max(summary[q]["fid_range"][1] - summary[q]["fid_range"][0] for q in (ref, p))
        gap = summary[p]["fid_mean"] - summary[ref]["fid_mean"]
        within = abs(gap) <= spread if len(args.seeds) > 1 else None
        verdicts[p] = (f"{p} FID {summary[p]['fid_mean']:.2f} vs {ref} {summary[ref]['fid_mean']:.2f}: "
                       f"{gap:+.2f}, seeds' spread {spread:.2f} (the larger seed range of the two): "
                       + ("within the seeds' spread" if within else "OUTSIDE the seeds' spread" if within is False
                          else "one seed: no spread to compare with"))
    return dict(recipe=args.recipe, seeds=args.seeds, features=args.features, num_samples=args.num_samples,
                runs={p: {str(s): {k: v for k, v in results[p][s].items() if k != "curves"} for s in args.seeds}
                      for p in args.precisions},
                summary=summary, curve_gaps=curve_gaps, verdicts=verdicts)


def print_table(args, report):
    print(f"\n{'precision':>9} {'seed':>4} {'step':>6} {'FID':>9} {'KID':>9}  final d_loss  g_loss  gammas")
    for p in args.precisions:
        for s in args.seeds:
            r = report["runs"][p][str(s)]
            gam = " ".join(f"{k[6:]} {v:+.3f}" for k, v in r["final"].items() if k.startswith("gamma/"))
            print(f"{p:>9} {s:>4} {r['step']:>6} {r['fid']:9.3f} {r['kid']:9.5f}  "
                  f"{r['final'].get('d_loss', float('nan')):12.4f} {r['final'].get('g_loss', float('nan')):7.4f}  {gam}")
    print(f"\ncurves: mean |difference| of the seed-mean curve from {args.precisions[0]}'s, beside "
          f"{args.precisions[0]}'s own seed-to-seed difference")
    for name, gaps in report["curve_gaps"].items():
        print(f"  {name:>10}: " + "  ".join(f"{k} {v:.3g}" for k, v in gaps.items()))
    for line in report["verdicts"].values():
        print(line)
    if args.features != "inception":
        print("(stand-in features: these FIDs are NOT comparable to published numbers)")


def main(argv=None):
    args = parse(argv)
    for prec in args.precisions:  # every run's flags checked before the first trains
        sagan_main.parse_args(run_flags(args, prec, args.seeds[0]))
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for prec in args.precisions:
        for seed in args.seeds:
            run_dir = train(args, prec, seed)
            s = scores(args, run_dir)
            c = curves(run_dir)
            final = {k: v[max(v)] for k, v in c.items()}
            step = load_checkpoint(os.path.join(run_dir, "latest.pt"))["step"]
            results.setdefault(prec, {})[seed] = dict(fid=s["fid"], kid=s["kid"], kid_std=s["kid_std"], step=step,
                                                      final=final, curves=c, run_dir=run_dir)
            print(f"[{prec}_seed{seed}] step {step}: FID {s['fid']:.3f}, KID {s['kid']:.5f}", flush=True)
    report = compare(args, results)
    print_table(args, report)
    with open(os.path.join(args.out, "parity.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    run(PROG, main)
