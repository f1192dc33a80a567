"""The long-range experiment: does SAGAN's attention learn the built-in faces' eye-colour rule?

    python -m experiments.attention_ablation                     # the experiment (defaults below)
    python -m experiments.attention_ablation --score_only        # score the runs that exist, again
    python -m experiments.attention_ablation --imsize 32 --steps 2000 --conv_dim 32 --out runs/ablation32

(from the repository root, as a module: it imports the project's modules from there). The defaults
are the recommended run: 64px (at 32px an iris is about 2 pixels), conv_dim 16, batch 32, 10,000
steps, seeds 0 and 1, two runs at a time with one thread each: 99 min of training and under a minute
of scoring on a 2-core CPU (measured; README has the result). It prints its wall time at the end.

Every built-in face has both irises in one random colour. Two arms, equal budget (same steps, batch,
widths, data and seeds): 'attn' with the default attention (G at 16 and 32 at 64px, D at 8 and 4),
'noattn' with none. Each (arm, seed) is an ordinary `main.py` run in <out>/models/<arm>_seed<seed>,
--jobs of them side by side (a seed's two arms together, so both see the same machine), resumed
when its folder exists and extended when --steps grew. Scores use the raw G (the runs keep no EMA,
so a short budget isn't judged by an average that still remembers the first steps).

What it measures (experiments/eye_metrics.py has the definitions):
- eye agreement: the fraction of generated faces whose two irises read as one colour, against the
  same generator's eyes paired at random (its chance); 'above chance' is the difference. Real faces
  give the reader's ceiling and real random pairs the chance level.
- along training: the same at every saved checkpoint (--model_save_step), so the log shows at which
  step agreement rises above chance (its 95% interval above zero).
- attention: the mass a query at one eye puts on the other eye, and on a control region the same
  distance away that holds no eye in any built-in face, both over uniform attention, and their ratio.
- the causal test: eye agreement with one attention layer's term removed at inference (attention's
  layers_removed: the layer passes its input through, as with gamma 0), and with all of them removed.
Uncertainty: 95% bootstrap intervals over generated faces (resampled within each seed) and the
seeds' min-max. Written to <out>/results.md and <out>/results.json, with figures of where the eye
query looks (attention_viz.Explorer) for one checkpoint of each arm with attention, and the eyes of
the same z at every checkpoint of both arms (irises_seed<seed>.png: when irises appear).
"""
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import matplotlib
import numpy as np
import torch

from attention import INERT_SHARE, attention_layers, face_pixels, layers_removed, map_hw, pixel_queries
from attention_viz import Explorer, save_figure
from checkpoint import ckpt_name, load_generator, saved_steps
from cli import Parser, UserError, run
from data_loader import synthetic_face
from experiments.eye_metrics import (eye_agreement, eye_attention, eye_cells, eye_colours, eye_layout,
                                     pair_score, read_irises, region_masks)
from experiments.uncertainty import difference, public, summarise
from utils import denorm

PROG = "experiments.attention_ablation"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where main.py is
ARMS = {"attn": [], "noattn": ["--g_attn", "none", "--d_attn", "none"]}
ARM_NAMES = {"attn": "G with attention", "noattn": "G without attention"}
Z_SEED = 1234        # the scored z: the same for every checkpoint, never a training seed's stream
ATTN_IMAGES = 256    # images whose eye queries' attention is measured


def build_parser():
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--steps", type=int, default=10_000, help="generator updates per run")
    a("--imsize", type=int, default=64, help="image size; at 32px an iris is about 2 pixels")
    a("--conv_dim", type=int, default=16, help="g_conv_dim and d_conv_dim")
    a("--batch_size", type=int, default=32)
    a("--z_dim", type=int, default=128)
    a("--synthetic_size", type=int, default=20_000)
    a("--seeds", default="0,1", help="training seeds, comma-separated: one run per arm and seed")
    a("--model_save_step", type=int, default=0,
      help="checkpoint (and score along training) every this many steps (0: --steps / 10)")
    a("--out", default=os.path.join("runs", "long_range"), help="run folders, logs, results, figures")
    a("--num_samples", type=int, default=1000, help="generated (and real) faces scored per final checkpoint")
    a("--series_samples", type=int, default=500, help="faces scored per checkpoint along training")
    a("--tol", type=float, default=0.1, help="eyes match when their RGB colours (0..1) are this close")
    a("--jobs", type=int, default=2, help="runs trained at once")
    a("--threads", type=int, default=1, help="torch threads per run (and --jobs x this for scoring)")
    a("--score_only", action="store_true", help="don't train; score the checkpoints at --steps")
    a("--validate_reader", action="store_true",
      help="print one JSON line: the iris reader's score on built-in faces with the rule, without it, "
           "without irises, and with noise, blur and a shift (--num_samples faces each), then exit")
    return p


def check_args(args):
    try:
        args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. 0,1") from None
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise UserError("--seeds needs at least one seed, each once")
    if args.steps <= 0 or args.num_samples < 2 or args.series_samples < 2 or args.jobs < 1 or args.threads < 1:
        raise UserError("--steps, --jobs and --threads must be positive, --num_samples and --series_samples "
                        "at least 2")
    args.model_save_step = args.model_save_step or max(args.steps // 10, 1)
    return args


def run_dir(args, arm, seed):
    return os.path.join(args.out, "models", f"{arm}_seed{seed}")


def runs(args):
    """[(arm, seed)], seed by seed, so the two arms of a seed train side by side."""
    return [(arm, seed) for seed in args.seeds for arm in ARMS]


# ============================================================================ training

def train_command(args, arm, seed):
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--dataset", "synthetic",
           "--imsize", str(args.imsize), "--g_conv_dim", str(args.conv_dim), "--d_conv_dim", str(args.conv_dim),
           "--z_dim", str(args.z_dim), "--batch_size", str(args.batch_size), "--synthetic_size",
           str(args.synthetic_size), "--seed", str(seed), "--num_workers", "0", "--total_step", str(args.steps),
           "--log_step", str(max(args.steps // 40, 1)), "--sample_step", str(args.model_save_step),
           "--model_save_step", str(args.model_save_step), "--ema_decay", "0", "--no_visdom",
           "--version", os.path.basename(run_dir(args, arm, seed)),
           "--model_save_path", os.path.join(args.out, "models"), "--sample_path", os.path.join(args.out, "samples"),
           *ARMS[arm]]
    if os.path.exists(os.path.join(run_dir(args, arm, seed), "latest.pt")):
        cmd.append("--resume")
    return cmd


def say(line):
    """One line in one write: the runs' threads print side by side without mixing lines."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train_one(args, arm, seed):
    """One run as a main.py subprocess, its output appended to <out>/<run>.log: (log path, exit status)."""
    name = os.path.basename(run_dir(args, arm, seed))
    log_path = os.path.join(args.out, f"{name}.log")
    if args.steps in saved_steps(run_dir(args, arm, seed)):
        return log_path, 0  # already trained this far
    cmd = train_command(args, arm, seed)
    say(f"training '{name}': {' '.join(cmd[1:])}")
    with open(log_path, "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT,
                             env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    say(f"'{name}' {'done' if rc == 0 else f'failed (exit {rc})'}")
    return log_path, rc


def train_runs(args):
    """Every run, --jobs at a time; the runs that fail are named after all have ended."""
    os.makedirs(args.out, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda r: train_one(args, *r), runs(args)))
    failed = [log for log, rc in results if rc != 0]
    if failed:
        raise UserError(f"{len(failed)} run(s) failed, see {', '.join(failed)}")


# ============================================================================ scoring

def real_faces(n, imsize, seed=777, eyes="rule"):
    """(n, H, W, 3) floats in [0, 1]: held-out built-in faces (a seed the runs never saw)."""
    return np.stack([synthetic_face(np.random.default_rng([seed, i]), imsize, eyes=eyes)[0]
                     for i in range(n)]) / 255.0


@torch.no_grad()
def generated_faces(G, z, batch=250):
    """(n, H, W, 3) floats in [0, 1]: G's images of z (n, z_dim)."""
    imgs = torch.cat([denorm(G(z[i:i + batch])) for i in range(0, len(z), batch)])  # (n, 3, H, W)
    return imgs.permute(0, 2, 3, 1).numpy()


def fixed_z(n, z_dim):
    return torch.randn(n, z_dim, generator=torch.Generator().manual_seed(Z_SEED))  # (n, z_dim)


def agreement(G, z, layout, tol):
    """eye_agreement (per-face arrays) of G's faces of z."""
    return eye_agreement(eye_colours(generated_faces(G, z), layout), tol)


def score_run(args, arm, seed, layout):
    """Scores of one run's checkpoint at --steps: per-face arrays, intact, per layer removed and
    all removed; the eye queries' attention; and the series of earlier checkpoints."""
    folder = run_dir(args, arm, seed)
    G = load_generator(os.path.join(folder, ckpt_name(args.steps)), ema=False, verbose=False)
    z = fixed_z(args.num_samples, G.z_dim)
    names = list(attention_layers(G))
    out = dict(intact=agreement(G, z, layout, args.tol), removed={},
               attention=eye_attention(G, z[:ATTN_IMAGES], layout) if names else {})
    for removed in [[n] for n in names] + ([names] if len(names) > 1 else []):
        key = removed[0] if len(removed) == 1 else "all"
        with layers_removed(G, removed):
            out["removed"][key] = agreement(G, z, layout, args.tol)
    zs = fixed_z(args.series_samples, G.z_dim)
    out["series"] = []
    for step in saved_steps(folder):
        if step <= args.steps:
            Gs = G if step == args.steps else load_generator(os.path.join(folder, ckpt_name(step)),
                                                             ema=False, verbose=False)
            a = summarise([agreement(Gs, zs, layout, args.tol)["excess"]])
            out["series"].append(dict(step=step, excess=a["mean"], ci=a["ci"]))
    return out


def first_above_chance(series):
    """The first step whose excess interval lies above zero, or None."""
    return next((p["step"] for p in series if p["ci"][0] > 0), None)


def aggregate(args, scored, real):
    """The results: every number the tables and the summary use (JSON-ready, no replicates)."""
    res = dict(config=dict(vars(args)), real=real, arms={})
    boot_seed = itertools.count(1)  # every summary its own resampling stream: arms' differences need it
    stat = lambda parts, key: summarise([p[key] for p in parts], seed=next(boot_seed))  # noqa: E731
    excess = {}
    for arm in ARMS:
        per_seed = [scored[(arm, s)] for s in args.seeds]
        intact = [p["intact"] for p in per_seed]
        excess[arm] = stat(intact, "excess")
        a = dict(match=public(stat(intact, "match")), chance=public(stat(intact, "chance")),
                 excess=public(excess[arm]), removed={}, attention={})
        for key in per_seed[0]["removed"]:
            removed = [p["removed"][key] for p in per_seed]
            drop = [dict(d=x["excess"] - y["excess"]) for x, y in zip(intact, removed)]  # paired: the same z
            a["removed"][key] = dict(match=public(stat(removed, "match")), excess=public(stat(removed, "excess")),
                                     drop=public(stat(drop, "d")))
        for layer in per_seed[0]["attention"]:
            at = [p["attention"][layer] for p in per_seed]
            e = dict(other=public(stat(at, "other")), share=public(stat(at, "share")),
                     control_cells=at[0]["control_cells"])
            if not np.isnan(at[0]["control"]).all():
                e["control"] = public(stat(at, "control"))
                e["other_minus_control"] = public(stat([dict(d=x["other"] - x["control"]) for x in at], "d"))
                e["ratio"] = dict(mean=e["other"]["mean"] / e["control"]["mean"],
                                  seeds=[o / c for o, c in zip(e["other"]["seeds"], e["control"]["seeds"])])
            a["attention"][layer] = e
        a["series"] = {str(s): p["series"] for s, p in zip(args.seeds, per_seed)}
        a["first_above_chance"] = {str(s): first_above_chance(p["series"]) for s, p in zip(args.seeds, per_seed)}
        res["arms"][arm] = a
    res["attn_minus_noattn"] = difference(excess["attn"], excess["noattn"])
    return res


# ============================================================================ the reader's validation

def blur(images):
    """(B, H, W, 3) -> the same blurred by the 5-tap binomial kernel (a Gaussian of sd 1 pixel)
    down and across, edges repeated."""
    k = np.array([1, 4, 6, 4, 1]) / 16
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (2, 2)
        x = np.pad(images, pad, mode="edge")
        n = images.shape[axis]
        images = sum(w * np.take(x, range(i, i + n), axis=axis) for i, w in enumerate(k))
    return images


def shift(images, px):
    """(B, H, W, 3) moved `px` pixels right and `px` down, the uncovered edge repeated."""
    x = np.pad(images, [(0, 0), (px, 0), (px, 0), (0, 0)], mode="edge")
    return x[:, :images.shape[1], :images.shape[2]]


VALIDATION_SEED = 777  # held-out faces (the training runs use SyntheticFaces' seeds 0, 1, ...)


def validate_reader(n, imsize, tol=0.1):
    """The reader on built-in faces whose answer is known: {case: dict(points, ci, threshold)}, its
    primary score in points above chance with a 95% bootstrap interval over faces, and the
    secondary threshold view (eyes within `tol` minus random pairs within `tol`, in points).
    Faces with the rule must score high, also with pixel noise, a blur and a shift; faces without
    the rule or without irises must score at chance: else the reader is not reading the rule."""
    layout = eye_layout(imsize)
    faces = lambda eyes: real_faces(n, imsize, seed=VALIDATION_SEED, eyes=eyes)  # noqa: E731
    rule = faces("rule")
    noise = np.random.default_rng(0).normal(0, 0.05, rule.shape)
    cases = {"rule": rule, "no_rule": faces("independent"), "no_iris": faces("none"),
             "rule_noise_0.05": np.clip(rule + noise, 0, 1), "rule_blur_sd1": blur(rule),
             "rule_shift_4px": shift(rule, 4)}
    out = {}
    for k, (case, images) in enumerate(cases.items()):
        colours = read_irises(images, layout)["colours"]
        s = pair_score(colours, seed=k)
        t = eye_agreement(colours, tol)
        out[case] = dict(points=round(s["points"], 2), ci=[round(v, 2) for v in s["ci"]],
                         threshold=round(100 * t["excess"].mean(), 2))
    return out


def score_real(args, layout):
    a = eye_agreement(eye_colours(real_faces(args.num_samples, args.imsize), layout), args.tol)
    return dict(match=public(summarise([a["match"]], seed=7)), chance=public(summarise([a["chance"]], seed=8)))


# ============================================================================ report

def pct(s, ci=True, seeds=True):
    """'12.3% [10.1, 14.5] (seeds 11.0 to 13.6)' for a summary of fractions."""
    f = lambda v: f"{100 * v:.1f}"  # noqa: E731
    text = f"{f(s['mean'])}%"
    if ci:
        text += f" [{f(s['ci'][0])}, {f(s['ci'][1])}]"
    if seeds and len(s.get("seeds", [])) > 1:
        text += f" (seeds {f(min(s['seeds']))} to {f(max(s['seeds']))})"
    return text


def points(s):
    """'+1.2 points [-0.3, +2.6] (seeds +0.8 to +1.6)' for a summary of differences of fractions."""
    text = f"{100 * s['mean']:+.1f} points [{100 * s['ci'][0]:+.1f}, {100 * s['ci'][1]:+.1f}]"
    if len(s.get("seeds", [])) > 1:
        text += f" (seeds {100 * min(s['seeds']):+.1f} to {100 * max(s['seeds']):+.1f})"
    return text


def times(s, seeds=True):
    """'2.41x [2.30, 2.52] (seeds 2.30 to 2.52)' for a summary of ratios over uniform."""
    text = f"{s['mean']:.2f}x"
    if "ci" in s:
        text += f" [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}]"
    if seeds and len(s.get("seeds", [])) > 1:
        text += f" (seeds {min(s['seeds']):.2f} to {max(s['seeds']):.2f})"
    return text


def tables(res):
    args, arms = res["config"], res["arms"]
    seeds = ",".join(map(str, args["seeds"]))
    out = [f"Eye-colour agreement at step {args['steps']} ({args['imsize']}px, conv_dim {args['conv_dim']}, "
           f"batch {args['batch_size']}, seeds {seeds}; {args['num_samples']} faces per run). Mean over seeds, "
           f"[95% bootstrap interval over faces], (seeds' min to max); 'above chance' in percentage points.", "",
           f"| images | eyes match (RGB distance < {args['tol']}) | random pairs of its eyes (chance) | "
           f"above chance |", "|---|---|---|---|",
           f"| real built-in faces (ceiling) | {pct(res['real']['match'])} | {pct(res['real']['chance'])} | "
           f"{100 * (res['real']['match']['mean'] - res['real']['chance']['mean']):+.1f} points |",
           f"| random pairs of real eyes (chance) | {pct(res['real']['chance'])} | - | - |"]
    out += [f"| {ARM_NAMES[arm]} | {pct(a['match'])} | {pct(a['chance'])} | {points(a['excess'])} |"
            for arm, a in arms.items()]
    d = res["attn_minus_noattn"]
    out += ["", f"With minus without attention, above chance: {100 * d['mean']:+.1f} points "
                f"[{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}].", ""]

    out += ["Attention of a query at one eye (attention.FACE_QUERIES), over uniform attention: on the 3x3 cells "
            "around the other eye, and on a control region as far from the query holding no eye "
            f"(first {ATTN_IMAGES} faces of each run).", "",
            "| arm | layer | changes its input by | other eye / uniform | control / uniform | other / control | "
            "other - control |", "|---|---|---|---|---|---|---|"]
    for arm, a in arms.items():
        for layer, e in a["attention"].items():
            if "control" in e:
                r = e["ratio"]
                spread = f" (seeds {min(r['seeds']):.2f} to {max(r['seeds']):.2f})" if len(r["seeds"]) > 1 else ""
                d = e["other_minus_control"]
                out.append(f"| {arm} | {layer} | {pct(e['share'], ci=False)} | {times(e['other'])} | "
                           f"{times(e['control'])} | {r['mean']:.2f}{spread} | "
                           f"{d['mean']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] |")
            else:
                out.append(f"| {arm} | {layer} | {pct(e['share'], ci=False)} | {times(e['other'])} | "
                           f"n/a: no eye-free cells at that distance | - | - |")
    out += ["", "Causal test: the same z, with attention layers' terms removed (gamma = 0) at inference.", "",
            "| arm | attention removed | eyes match | above chance | drop in above-chance vs intact |",
            "|---|---|---|---|---|"]
    for arm, a in arms.items():
        if a["removed"]:
            out.append(f"| {arm} | none (intact) | {pct(a['match'])} | {points(a['excess'])} | - |")
        for key, r in a["removed"].items():
            label = "all layers" if key == "all" else key
            out.append(f"| {arm} | {label} | {pct(r['match'])} | {points(r['excess'])} | {points(r['drop'])} |")
    out += ["", f"Along training: above chance in points ({args['series_samples']} faces per checkpoint), "
                f"* = its 95% interval above zero.", ""]
    cols = [(arm, s) for arm in arms for s in map(str, args["seeds"])]
    out += ["| step | " + " | ".join(f"{arm} seed {s}" for arm, s in cols) + " |", "|---|" + "---|" * len(cols)]
    steps = sorted({p["step"] for arm, s in cols for p in arms[arm]["series"][s]})
    for step in steps:
        cells = []
        for arm, s in cols:
            p = next((p for p in arms[arm]["series"][s] if p["step"] == step), None)
            cells.append("-" if p is None else f"{100 * p['excess']:+.1f}{'*' if p['ci'][0] > 0 else ''}")
        out.append(f"| {step} | " + " | ".join(cells) + " |")
    firsts = [f"{arm} seed {s}: {arms[arm]['first_above_chance'][s] or 'never'}" for arm, s in cols]
    out += ["", "First step above chance: " + "; ".join(firsts) + "."]
    return "\n".join(out)


# rules of thumb for the summary's words; the numbers beside them are what counts
NEGLIGIBLE = 0.01    # a change in agreement whose whole interval lies within 1 point is negligible
CLEAR_RATIO = 1.25   # other eye over control: below this a preference beyond distance is slight


def span(ci):
    return f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def summary(res):
    """Plain sentences made from the numbers: what the experiment shows, and what it does not."""
    args, arms, real = res["config"], res["arms"], res["real"]
    n_seeds = len(args["seeds"])
    say, learned = [], {}
    for arm, a in arms.items():
        e = a["excess"]
        learned[arm] = e["ci"][0] > 0
        verdict = ("above chance" if e["ci"][0] > 0 else
                   "below chance" if e["ci"][1] < 0 else "not distinguishable from chance")
        say.append(f"{ARM_NAMES[arm]}: {pct(a['match'], ci=False, seeds=False)} of faces have matching eyes against "
                   f"{pct(a['chance'], ci=False, seeds=False)} for random pairs of its own eyes, {points(e)}: "
                   f"{verdict} (real faces: {pct(real['match'], ci=False)} against {pct(real['chance'], ci=False)}).")

    d, ea, en = res["attn_minus_noattn"], arms["attn"]["excess"], arms["noattn"]["excess"]
    seeds_apart = n_seeds == 1 or min(ea["seeds"]) > max(en["seeds"]) or max(ea["seeds"]) < min(en["seeds"])
    diff = f"{100 * abs(d['mean']):.1f} points {span(d['ci'])}"
    if not any(learned.values()):
        say.append(f"Neither generator draws matching eyes above chance at {args['steps']} steps, so this budget "
                   f"cannot tell whether attention helps with the rule (with minus without attention: "
                   f"{100 * d['mean']:+.1f} points {span(d['ci'])}).")
    elif d["ci"][0] > 0 and seeds_apart:
        say.append(f"Attention helped: {diff} more faces match above chance with it than without"
                   + (", and every seed with attention beat every seed without." if n_seeds > 1 else "."))
    elif d["ci"][1] < 0 and seeds_apart:
        say.append(f"Attention hurt at this budget: {diff} fewer faces match above chance with it than without"
                   + (", in every seed." if n_seeds > 1 else "."))
    elif d["ci"][0] > 0 or d["ci"][1] < 0:
        say.append(f"The arms differ on these faces ({100 * d['mean']:+.1f} points {span(d['ci'])} with minus "
                   f"without attention), but their seeds overlap: with {n_seeds} seeds per arm that is not shown "
                   f"to come from attention rather than from the training run.")
    else:
        say.append(f"Attention did not measurably help: with minus without attention is {100 * d['mean']:+.1f} "
                   f"points {span(d['ci'])}, an interval that includes zero.")

    for layer, e in arms["attn"]["attention"].items():
        share = f"{layer} (changes its input by {pct(e['share'], ci=False, seeds=False)})"
        if "control" not in e:
            say.append(f"{share} puts {e['other']['mean']:.2f}x its uniform share on the other eye, but at that "
                       f"resolution no eye-free region lies as far away, so that number is no evidence either way.")
            continue
        lo, hi = e["other_minus_control"]["ci"]
        ratio = e["ratio"]["mean"]
        if lo > 0:
            pref = (f"{'more' if ratio >= CLEAR_RATIO else 'slightly more'} than on the control: a preference "
                    f"beyond distance for the other eye (for eye-like features, which alone says nothing "
                    f"about their colour)")
        elif hi < 0:
            pref = "less than on the control"
        else:
            pref = "no more than on the control, so its other-eye number is no evidence of the eye rule"
        inert = (f"; but the layer changes its input by under {INERT_SHARE:.0%}, so where it looks barely "
                 f"reaches the image" if e["share"]["mean"] < INERT_SHARE else "")
        say.append(f"{share}: an eye query puts {e['other']['mean']:.2f}x its uniform share on the other eye and "
                   f"{e['control']['mean']:.2f}x on an eye-free region as far away (ratio {ratio:.2f}), {pref}{inert}.")

    for key, r in arms["attn"]["removed"].items():
        lo, hi = r["drop"]["ci"]
        what = "every attention layer" if key == "all" else key
        if -NEGLIGIBLE < lo and hi < NEGLIGIBLE:
            effect = "changes agreement above chance by less than 1 point"
        elif lo > 0:
            effect = "lowers agreement above chance"
        elif hi < 0:
            effect = "raises agreement above chance"
        else:
            effect = "does not measurably change agreement above chance"
        say.append(f"Removing {what} at inference {effect} (drop {100 * r['drop']['mean']:+.1f} points "
                   f"{span(r['drop']['ci'])}).")
    say.append(f"What this does not show: {n_seeds} seed{'s' if n_seeds > 1 else ''} per arm and one budget "
               f"({args['steps']} steps at {args['imsize']}px, conv_dim {args['conv_dim']}), so a longer run or "
               f"another width may differ; the eye reader finds matching eyes in only "
               f"{pct(real['match'], ci=False)} of real faces; and removing a layer also changes the input of every "
               f"later layer, so a drop shows the layer is needed, not that it alone carries the rule.")
    return say


def outline_regions(ax, G, layer, layout):
    """Outline, over an image panel of `layer`, the left-eye query's two regions: the other eye's
    (green) and the control's (white, dashed)."""
    from matplotlib.patches import Rectangle
    hw, S = map_hw(layer), G.image_size
    faces = face_pixels(S)
    cells = pixel_queries(G, [faces["left eye"], faces["right eye"]])[layer]
    m = region_masks(cells, hw, eye_cells(layout, hw))
    sx, sy = S / hw[1], S / hw[0]
    for mask, colour, style in ((m["other"][0], "lime", "-"), (m["control"][0], "white", "--")):
        for n in mask.nonzero().flatten().tolist():
            i, j = divmod(n, hw[1])
            ax.add_patch(Rectangle((j * sx, i * sy), sx, sy, fill=False, ec=colour, ls=style, lw=1.2, zorder=5))


def eye_query_figures(args, layout):
    """Where the left-eye query looks, for the final checkpoint of the first seed of each arm with
    attention: every layer for one face, and the largest layer across 8 faces, the other eye's
    and the control's regions outlined. Returns the paths written."""
    paths = []
    pixel = face_pixels(args.imsize)["left eye"]
    legend = "green: the other eye's region; white dashed: the control region (as far away, no eye)"
    for arm in ARMS:
        G = load_generator(os.path.join(run_dir(args, arm, args.seeds[0]), ckpt_name(args.steps)),
                           ema=False, verbose=False)
        if not G.attn_res:
            continue
        ex = Explorer(G, step=args.steps, generator="raw G")
        base = os.path.join(args.out, f"{arm}_seed{args.seeds[0]}_eye_query")
        fig, axes = ex.layers_figure(seed=0, pixel=pixel)
        for layer in attention_layers(G):
            outline_regions(axes[layer], G, layer, layout)
        fig.text(0.5, 0.0, legend, ha="center", va="top", fontsize=8)
        paths.append(save_figure(fig, f"{base}_layers.png"))
        layer = ex.pick_layer()
        fig, axes = ex.grid_figure(seeds=range(8), layer=layer, pixel=pixel)
        for ax in axes:
            outline_regions(ax, G, layer, layout)
        fig.text(0.5, 0.0, legend, ha="center", va="top", fontsize=8)
        paths.append(save_figure(fig, f"{base}_grid.png"))
    return paths


IRIS_FACES = 6  # faces per arm in the irises-along-training figure


def eye_band(images, layout, pad=2):
    """(n, h, w, 3): the part of `images` (n, H, W, 3) that holds both eye windows, `pad` more each side."""
    (x0, x1, y0, y1), (u0, u1, v0, v1) = layout["windows"]
    x0, x1, y0, y1 = min(x0, u0) - pad, max(x1, u1) + pad, min(y0, v0) - pad, max(y1, v1) + pad
    return images[:, max(y0, 0):y1 + 1, max(x0, 0):x1 + 1]


def irises_figure(args, layout):
    """When irises appear and start to match: for seed args.seeds[0], one row per saved checkpoint,
    the eye band of the same IRIS_FACES z for each arm side by side (the raw G, as scored)."""
    import matplotlib.pyplot as plt
    seed = args.seeds[0]
    steps = [s for s in saved_steps(run_dir(args, "attn", seed)) if s <= args.steps]
    z = fixed_z(IRIS_FACES, args.z_dim)
    rows = []
    for step in steps:
        row = []
        for arm in ARMS:
            G = load_generator(os.path.join(run_dir(args, arm, seed), ckpt_name(step)), ema=False, verbose=False)
            band = eye_band(generated_faces(G, z), layout)                  # (n, h, w, 3)
            gap = np.ones((band.shape[1], 1, 3))
            row.append(np.concatenate([x for b in band for x in (b, gap)][:-1], axis=1))  # (h, n * (w + 1) - 1, 3)
        gap = np.ones((row[0].shape[0], 4, 3))
        rows.append(np.concatenate([x for r in row for x in (r, gap)][:-1], axis=1))
    h = rows[0].shape[0]
    grid = np.concatenate([np.concatenate([r, np.ones((2, r.shape[1], 3))]) for r in rows])[:-2]
    fig, ax = plt.subplots(figsize=(10, 10 * grid.shape[0] / grid.shape[1] + 0.8))
    ax.imshow(grid.clip(0, 1), interpolation="nearest")
    ax.set_yticks([(h + 2) * i + h / 2 for i in range(len(steps))], [f"step {s}" for s in steps])
    arm_w = row[0].shape[1] + 4
    ax.set_xticks([arm_w * k + row[0].shape[1] / 2 for k in range(len(ARMS))], [ARM_NAMES[a] for a in ARMS])
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(f"The eyes of the same {IRIS_FACES} z along training (seed {seed}, raw G, {args.imsize}px)",
                 fontsize=10, pad=24)
    return save_figure(fig, os.path.join(args.out, f"irises_seed{seed}.png"))


def main(argv=None):
    start = time.perf_counter()
    matplotlib.use("Agg")  # headless: the figures go to files (attention_viz imports pyplot on first use)
    args = check_args(build_parser().parse_args(argv))
    if args.validate_reader:
        torch.set_num_threads(args.threads)
        print(json.dumps(validate_reader(args.num_samples, args.imsize, args.tol)))
        return
    if not args.score_only:
        train_runs(args)
    trained = time.perf_counter()
    torch.set_num_threads(args.jobs * args.threads)
    layout = eye_layout(args.imsize)
    say(f"scoring the raw G of every checkpoint in {os.path.join(args.out, 'models')} (the runs keep no EMA)")
    scored = {(arm, seed): score_run(args, arm, seed, layout) for arm, seed in runs(args)}
    res = aggregate(args, scored, score_real(args, layout))
    res["summary"] = summary(res)
    res["figures"] = eye_query_figures(args, layout) + [irises_figure(args, layout)]
    text = tables(res) + "\n\n" + "\n".join(res["summary"])
    res["wall_s"] = dict(training=trained - start, scoring=time.perf_counter() - trained)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(text)
    print(f"\nresults: {os.path.join(args.out, 'results.md')}, results.json; figures: {', '.join(res['figures'])}")
    total = time.perf_counter() - start
    print(f"wall time: {total / 60:.1f} min (training {res['wall_s']['training'] / 60:.1f}, "
          f"scoring {res['wall_s']['scoring'] / 60:.1f})")


if __name__ == "__main__":
    run(PROG, main)
