"""The long-range experiment: can SAGAN's attention carry the built-in faces' eye-colour rule?

    python -m experiments.attention_ablation --validate_reader       # the reader's scores on known faces
    python -m experiments.attention_ablation                         # the experiment (defaults below)
    python -m experiments.attention_ablation --score_only            # score the runs that exist, again

(from the repository root, as a module). Every built-in face has both irises in one random colour.
Each (arm, seed) is an ordinary `main.py` run in <out>/models/<arm>_seed<seed>, --jobs side by side;
a run whose folder exists is resumed (`main.py --resume`), so a killed experiment, or one continued in
another session, picks up where its runs stopped; scores of every checkpoint are kept in
<out>/scores/ and reused. Runs keep no EMA (--ema_decay 0): scores use the raw G.

Why the seed's networks cannot answer the question (64px; eye centres 12.8 to 16.6 px apart, the
nearest pixels of the two irises 7.0 to 12.3 px apart; a unit must see a pixel of each iris to
compare them). G's first layer maps z densely onto the 4x4 map, so every unit of G knows all of z:
G can paint both irises from the same latent channels, no attention needed. D's convolutions (4x4,
stride 2) see 4 px at 32x32, 10 px at 16x16, 22 px at 8x8 and 46 px at 4x4, and its last 4x4 conv
the whole image: in 500 of 500 built-in faces some 8x8 unit sees iris pixels of both eyes. So
without attention D can check the rule and G can obey it: a null is what that design predicts,
and by itself it says nothing about what attention can do.

The arms, named for what they remove (equal steps, batch, widths, data and seeds):
  gd          G+D attention (the seed's: G at 16 and 32, D at 8 and 4)
  none        no attention in G or D
  g, d        attention in G only, in D only (with gd and none: the 2x2 of G x D, if the budget allows)
  gd_norule   negative control: G+D attention trained on faces WITHOUT the rule (each iris its own
              colour, --synthetic_eyes independent); what the score reads when there is no rule to learn
  none_norule the same for the arm without attention. On generated images a face's two irises also
              share what the whole image shares (a tint, blur, noise), which the reader cannot tell
              from the rule: in seed 0, gd_norule read +10 to +16 points at five of its first seven
              checkpoints. How much of that a G draws may depend on the arm, so each arm is read net
              of its own twin.
  patch_attn  positive control: a patch D that stops at 32x32 (--d_patch 32: each unit sees 4 px,
              its score the mean of 1x1 scores per unit) with attention at 32x32 before its head; G
              without attention. In 0 of 500 built-in faces does a 4 px window hold pixels of both
              irises (at 16x16, 10 px, 51 of 500 do: that patch would leak). The patch score is a
              sum of terms that each see one eye at most, and G's hinge loss is linear in it, so
              without attention nothing rewards matching eyes; D's attention is the only route.
  patch_none  the positive control's baseline: the same patch D without attention.
If patch_attn does not beat patch_none, this budget cannot show an attention benefit even where
attention is the only route, and a null in gd vs none means nothing (the code says "cannot tell").
G can still draw matching eyes by accident (one latent for both), so patch_none need not be at chance.
As built, the patch arms do not work: in a 900-step pilot the 4 px patch D collapsed G to one tiled
texture (every image alike, no face layout; per-position head weights and 1x1 depth per patch did
not help), where the seed's D had face-shaped, varied images by step 600 (docs/experiments.md).
They are left out of the default arms until a positive control that trains faces exists; every
score now comes with the drawing check (layout, diversity) that caught this.
  local_attn  positive control on G's side: a local G (--g_local 16, z_dim 1024: z is a 16x16 map of
              4 noise channels per cell; then only 1x1 convs, with the pixel coordinates as inputs,
              and nearest upsampling), widths 32, with attention at 16 and 32; the seed's D. Without
              attention every pixel is a function of its coordinates and the one noise cell above
              it, and the two irises never share a 4x4 block (tests/test_local_generator.py), so
              only attention can give both irises one colour (or anything else one value per face).
  local_none  its baseline: the same local G without attention (the seed's D keeps its attention).
As built, the local arms collapse too: in a 3,000-step pilot both drew one blocky image, not a
face (diversity 0.00 from step 1,500), with or without attention (docs/experiments.md). Not in
the default arms; with no working positive control the answer is never "no difference".

The score (experiments/eye_metrics.py): the iris reader finds both eyes' iris regions and scores a
set of faces by the probability that a face's own two irises are closer in colour than irises of two
different faces of the set, in points above chance (50 = every face's eyes match best; 0 = no rule).
`--validate_reader` shows it is specific (rule-free and iris-free faces at chance) and robust (noise,
blur, a shift). The endpoint of a run is the mean score over its last --last checkpoints; the
headline is, per comparison, the mean of the seed-matched differences with a t interval over seeds
(the seeds are the unit: one training run is one observation). decide() turns an interval into
"helps" / "hurts" (the interval excludes 0), "no difference" (the interval lies inside +-MARGIN points)
or "cannot tell" (neither). The headline is NET, (gd - gd_norule) - (none - none_norule) per seed:
what attention adds to the rule beyond what each arm's images share anyway. Its "helps" stands only
if gd beats gd_norule, its "hurts" only if none beats none_norule (the winner must have learned the
rule), its "no difference" only if one of them did and a positive control says "helps"; else
"cannot tell", with the reason.

At the last checkpoint of each run with G attention it also measures: where an eye query looks
(the other eye vs an eye-free control as far away, by weights and by contributions); the causal
test (the score with each G attention layer's term removed at inference); and the mechanism test
(experiments/mechanism.py: the eye queries read another face's value vectors at the other eye, or
at the mouth, with trained and with randomised query/key weights).

Budget (64px, conv_dim 16, batch 32, 10,000 steps, 3 seeds, 2 jobs of 1 thread; the defaults), in
bf16 on the project's 2-core AMD EPYC (AVX512-BF16, no AMX), idle: gd and gd_norule 3.7-3.9 it/s,
none and none_norule 10.7-11.3 it/s, so about 46 + 46 + 15 + 15 run-minutes per seed, about 3.1 h
for the four default arms on an idle machine; checkpoints are scored as they land (what the runs
took: docs/experiments.md). Without a working positive control a null cannot be read (the headline
says "cannot tell").
"""
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import matplotlib
import numpy as np
import torch

from attention import attention_layers, face_pixels, layers_removed, map_hw, pixel_queries
from attention_figures import save_figure
from checkpoint import ckpt_name, load_generator, saved_steps
from cli import Parser, UserError, run
from data_loader import synthetic_face
from experiments.eye_metrics import (drawing, eye_agreement, eye_attention, eye_cells, eye_layout, pair_score,
                                     read_irises, region_masks)
from experiments.mechanism import mechanism
from explorer import Explorer
from utils import denorm

PROG = "experiments.attention_ablation"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where main.py is
NO_G, NO_D = ["--g_attn", "none"], ["--d_attn", "none"]
LOCAL_G = ["--g_local", "16", "--z_dim", "1024", "--g_conv_dim", "32"]  # 4 noise channels per 16x16 cell
ARMS = {
    "gd": dict(name="G+D attention", flags=[]),
    "none": dict(name="no attention in G or D", flags=NO_G + NO_D),
    "g": dict(name="attention in G only", flags=NO_D),
    "d": dict(name="attention in D only", flags=NO_G),
    "gd_norule": dict(name="G+D attention, rule-free faces (negative control)",
                      flags=["--synthetic_eyes", "independent"]),
    "none_norule": dict(name="no attention, rule-free faces (negative control)",
                        flags=NO_G + NO_D + ["--synthetic_eyes", "independent"]),
    "patch_attn": dict(name="patch D (4 px) with attention at 32x32, G without (positive control)",
                       flags=NO_G + ["--d_patch", "32", "--d_attn", "32"]),
    "patch_none": dict(name="patch D (4 px) without attention, G without (positive control's baseline)",
                       flags=NO_G + ["--d_patch", "32", "--d_attn", "none"]),
    "local_attn": dict(name="local G (z as a 16x16 noise map, 1x1 convs, widths 32) with attention, the seed's D "
                            "(positive control)", flags=LOCAL_G),
    "local_none": dict(name="local G without attention, the seed's D (positive control's baseline)",
                       flags=LOCAL_G + NO_G),
}
DEFAULT_ARMS = "gd,none,gd_norule,none_norule"  # the patch and local arms collapse G (see the docstring)
# (name, arm, baseline): each a seed-matched difference of endpoints
COMPARISONS = [("attention in G and D", "gd", "none"),
               ("attention in G", "g", "none"),
               ("attention in D", "d", "none"),
               ("positive control: D attention where only it can see both eyes", "patch_attn", "patch_none"),
               ("positive control: G attention where only it carries anything across the image", "local_attn",
                "local_none"),
               ("rule learned: rule faces minus rule-free faces (G+D attention)", "gd", "gd_norule"),
               ("rule learned: rule faces minus rule-free faces (no attention)", "none", "none_norule")]
POSITIVE = [c[0] for c in COMPARISONS if c[0].startswith("positive control")]
NEGATIVE, NEGATIVE_NONE = COMPARISONS[-2][0], COMPARISONS[-1][0]
# The headline's comparison: what attention adds to the rule itself, each arm net of its rule-free twin,
# (gd - gd_norule) - (none - none_norule) per seed. On generated images a face's two irises also share
# what the image shares (a tint, blur, noise): the rule-free arms score that, and it may differ by arm.
NET = "attention in G and D, net of each arm's rule-free control"
NET_ARMS = ("gd", "gd_norule", "none", "none_norule")
WINDOWS = 6          # the endpoint's sensitivity: the answer with the mean over the last 1..WINDOWS checkpoints
MARGIN = 5.0         # points: seed-level differences whose whole interval lies within +-MARGIN are "no difference"
Z_SEED = 1234        # the scored z: the same for every checkpoint, never a training seed's stream
ATTN_IMAGES = 256    # images whose eye queries' attention is measured
MECHANISM_IMAGES = 128


def build_parser():
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--steps", type=int, default=10_000, help="generator updates per run")
    a("--imsize", type=int, default=64, help="image size (the reader and the positive control assume 64)")
    a("--conv_dim", type=int, default=16, help="g_conv_dim and d_conv_dim")
    a("--batch_size", type=int, default=32)
    a("--z_dim", type=int, default=128)
    a("--synthetic_size", type=int, default=20_000)
    a("--seeds", default="0,1,2", help="training seeds, comma-separated: one run per arm and seed")
    a("--arms", default=DEFAULT_ARMS, help=f"comma-separated, of {', '.join(ARMS)}")
    a("--model_save_step", type=int, default=0, help="checkpoint (and score) every this many steps (0: --steps / 10)")
    a("--last", type=int, default=3, help="endpoint: the mean score over this many last checkpoints")
    a("--out", default=os.path.join("runs", "long_range"), help="run folders, logs, scores, results, figures")
    a("--num_samples", type=int, default=1000, help="faces scored per checkpoint")
    a("--tol", type=float, default=0.1, help="the secondary, threshold view: eyes match within this RGB distance")
    a("--jobs", type=int, default=2, help="runs trained at once")
    a("--threads", type=int, default=1, help="torch threads per run (and --jobs x this for scoring)")
    a("--score_only", action="store_true", help="don't train; score the checkpoints at --steps")
    a("--no_mechanism", action="store_true", help="skip the attention, causal and mechanism measures")
    a("--validate_reader", action="store_true",
      help="print one JSON line: the iris reader's score on built-in faces with the rule, without it, "
           "without irises, and with noise, blur and a shift (--num_samples faces each), then exit")
    return p


def check_args(args):
    try:
        args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. 0,1,2") from None
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise UserError("--seeds needs at least one seed, each once")
    args.arms = [a.strip() for a in str(args.arms).split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or not args.arms or len(set(args.arms)) != len(args.arms):
        raise UserError(f"--arms {','.join(args.arms)}: give each at most once, of {', '.join(ARMS)}")
    if args.steps <= 0 or args.num_samples < 2 or args.jobs < 1 or args.threads < 1 or args.last < 1:
        raise UserError("--steps, --jobs, --threads and --last must be positive, --num_samples at least 2")
    args.model_save_step = args.model_save_step or max(args.steps // 10, 1)
    return args


def run_dir(args, arm, seed):
    return os.path.join(args.out, "models", f"{arm}_seed{seed}")


def runs(args):
    """[(arm, seed)], seed by seed, so the arms of a seed train side by side on the same machine."""
    return [(arm, seed) for seed in args.seeds for arm in args.arms]


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
           *ARMS[arm]["flags"]]
    if os.path.exists(os.path.join(run_dir(args, arm, seed), "latest.pt")):
        cmd.append("--resume")  # a killed or shorter run continues (bitwise as if never stopped)
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


def face_score(images, layout, tol, seed=0):
    """The primary score of a set of faces, JSON-ready: dict(points, ci) and the threshold view
    (eyes within `tol` minus random pairs within `tol`, in points)."""
    colours = read_irises(images, layout)["colours"]
    s = pair_score(colours, seed=seed)
    return dict(points=float(s["points"]), ci=[float(v) for v in s["ci"]],
                threshold=float(100 * eye_agreement(colours, tol)["excess"].mean()), **drawing(images, layout))


def checkpoint_score(args, arm, seed, step, layout):
    """face_score of one checkpoint's raw G on the fixed z, kept in <out>/scores/<run>/step<k>.json
    (scoring is resumed like training: a kept score is read, not recomputed)."""
    path = os.path.join(args.out, "scores", f"{arm}_seed{seed}", f"step{step}_n{args.num_samples}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    G = load_generator(os.path.join(run_dir(args, arm, seed), ckpt_name(step)), ema=False, verbose=False)
    score = face_score(generated_faces(G, fixed_z(args.num_samples, G.z_dim)), layout, args.tol)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(score, f)
    os.replace(path + ".tmp", path)
    return score


def on_grid(args, step):
    """Whether a checkpoint is on the --model_save_step grid (or the last step). A stopped run also
    saves where it stopped (step 6700, say): such a checkpoint is scored and drawn, but kept out of
    endpoints, so that a window of k checkpoints spans the same steps in every run."""
    return step % args.model_save_step == 0 or step == args.steps


def endpoint_steps(args, arm, seed):
    """The saved steps up to --steps, and the last --last of them on the grid (the endpoint's)."""
    steps = [s for s in saved_steps(run_dir(args, arm, seed)) if s <= args.steps]
    if args.steps not in steps:
        raise UserError(f"{run_dir(args, arm, seed)} has no checkpoint at step {args.steps}: train it first "
                        f"(drop --score_only)")
    return steps, [s for s in steps if on_grid(args, s)][-args.last:]


def score_run(args, arm, seed, layout):
    """One run: its series (score per checkpoint), endpoint (mean over the last checkpoints) and, at
    its last checkpoint, for a G with attention: eye attention, the causal test and the mechanism."""
    steps, last = endpoint_steps(args, arm, seed)
    series = [dict(step=s, **checkpoint_score(args, arm, seed, s, layout)) for s in steps]
    at_end = [p for p in series if p["step"] in last]
    out = dict(series=series, endpoint=float(np.mean([p["points"] for p in at_end])),
               drawing={k: float(np.mean([p.get(k, np.nan) for p in at_end])) for k in ("layout", "diversity")},
               endpoint_steps=last)
    G = load_generator(os.path.join(run_dir(args, arm, seed), ckpt_name(args.steps)), ema=False, verbose=False)
    names = list(attention_layers(G))
    if args.no_mechanism or not names:
        return out
    z = fixed_z(args.num_samples, G.z_dim)
    intact = series[-1]["points"]
    out["removed"] = {}
    for removed in [[n] for n in names] + ([names] if len(names) > 1 else []):
        with layers_removed(G, removed):
            s = face_score(generated_faces(G, z), layout, args.tol)
        out["removed"]["all" if len(removed) > 1 else removed[0]] = dict(points=s["points"], drop=intact - s["points"])
    att = eye_attention(G, z[:ATTN_IMAGES], layout)
    out["attention"] = {name: {k: (float(np.nanmean(v)) if isinstance(v, np.ndarray) else v) for k, v in a.items()}
                        for name, a in att.items()}
    out["mechanism"] = mechanism(G, layout, n=min(MECHANISM_IMAGES, args.num_samples), seed=seed)
    return out


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




# ============================================================================ statistics

T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # Student t, df 1..10


def t_quantile(df):
    """The 97.5% quantile of Student's t with `df` degrees of freedom (table to 10, then the
    Cornish-Fisher expansion, within 0.1% there)."""
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def seed_interval(values):
    """dict(mean, ci, n, values): the mean of per-seed values with its 95% t interval over seeds
    (ci None for one seed: one training run has no spread to measure)."""
    v = np.asarray(values, dtype=float)
    n, mean = len(v), float(v.mean())
    if n < 2:
        return dict(mean=mean, ci=None, n=n, values=v.tolist())
    half = t_quantile(n - 1) * v.std(ddof=1) / math.sqrt(n)
    return dict(mean=mean, ci=[mean - half, mean + half], n=n, values=v.tolist())


def decide(diffs, margin=MARGIN):
    """The seed-matched differences (points) of a comparison -> (verdict, seed_interval):
    'helps' / 'hurts' when the interval excludes 0, 'no difference' when it lies within +-margin,
    'cannot tell' otherwise (or with fewer than 2 seeds)."""
    s = seed_interval(diffs)
    if s["ci"] is None:
        return "cannot tell", s
    lo, hi = s["ci"]
    if lo > 0:
        return "helps", s
    if hi < 0:
        return "hurts", s
    if -margin < lo and hi < margin:
        return "no difference", s
    return "cannot tell", s


def headline(comparisons):
    """The experiment's answer from its comparisons ({name: dict(verdict, ...)}): the verdict of NET,
    what attention adds to the rule net of each arm's rule-free control. 'helps' stands only where the
    G+D arm beat its rule-free control, 'hurts' only where the no-attention arm beat its own (else the
    winner's higher score is not shown to be the rule), 'no difference' only where at least one arm
    beat its rule-free control and a positive control detected a benefit of attention where only
    attention can carry the rule. Otherwise: 'cannot tell', and why."""
    net = comparisons.get(NET)
    if net is None:
        return "cannot tell", ("the answer needs G+D attention and no attention, each with its rule-free "
                               "control (arms " + ", ".join(NET_ARMS) + ")")
    verdict, why = net["verdict"], []
    learned = lambda name: comparisons.get(name, {}).get("verdict") == "helps"  # noqa: E731
    if verdict == "helps" and not learned(NEGATIVE):
        why.append("the G+D arm did not beat its rule-free control, so its gain is not shown to be the rule")
    if verdict == "hurts" and not learned(NEGATIVE_NONE):
        why.append("the no-attention arm did not beat its rule-free control, so its lead is not shown to be the rule")
    if verdict == "no difference":
        if not (learned(NEGATIVE) or learned(NEGATIVE_NONE)):
            why.append("neither arm beat its rule-free control: neither is shown to have learned the rule")
        if not any(learned(p) for p in POSITIVE):
            why.append("no positive control showed a benefit of attention where only attention can carry the rule")
    return ("cannot tell" if why else verdict), "; ".join(why)


def aggregate(args, scored):
    """Every number the tables and the summary use, JSON-ready."""
    res = dict(config=dict(vars(args)), arms={}, comparisons={})
    for arm in args.arms:
        per_seed = [scored[(arm, s)] for s in args.seeds]
        a = dict(name=ARMS[arm]["name"], endpoint=seed_interval([p["endpoint"] for p in per_seed]),
                 drawing={k: seed_interval([p["drawing"][k] for p in per_seed]) for k in ("layout", "diversity")},
                 endpoint_steps=per_seed[0]["endpoint_steps"],
                 series={str(s): p["series"] for s, p in zip(args.seeds, per_seed)})
        if "removed" in per_seed[0]:
            a["removed"] = {k: dict(drop=seed_interval([p["removed"][k]["drop"] for p in per_seed]))
                            for k in per_seed[0]["removed"]}
            a["attention"] = {layer: {k: seed_interval([p["attention"][layer][k] for p in per_seed])
                                      for k in ("other", "control", "other_contrib", "control_contrib", "share")}
                              for layer in per_seed[0]["attention"]}
            a["mechanism"] = {layer: {part: {key: seed_interval([
                p["mechanism"][layer][part][key]["change"]["mean"] if key in ("other", "control")
                else p["mechanism"][layer][part][key]["mean"] for p in per_seed])
                for key in ("other", "control", "other_by_weight", "other_by_contribution", "control_by_weight",
                            "control_by_contribution")}
                for part in ("trained", "random_qk")} for layer in per_seed[0]["mechanism"]}
            a["mechanism_runs"] = {str(s): p["mechanism"] for s, p in zip(args.seeds, per_seed)}
        res["arms"][arm] = a
    res["comparisons"] = compare(args, lambda arm, s: scored[(arm, s)]["endpoint"])
    res["headline"] = dict(zip(("verdict", "why"), headline(res["comparisons"])))
    res["sensitivity"] = sensitivity(args, scored)
    return res


def compare(args, e):
    """Every comparison the arms allow, from e(arm, seed) -> a run's endpoint: {name: dict(arms,
    verdict, seed interval)}."""
    out = {}
    for name, arm, base in COMPARISONS:
        if arm in args.arms and base in args.arms:
            verdict, interval = decide([e(arm, s) - e(base, s) for s in args.seeds])
            out[name] = dict(arms=f"{arm} - {base}", verdict=verdict, reads=reads(name, verdict), **interval)
    if all(a in args.arms for a in NET_ARMS):
        diffs = [(e("gd", s) - e("gd_norule", s)) - (e("none", s) - e("none_norule", s)) for s in args.seeds]
        verdict, interval = decide(diffs)
        out[NET] = dict(arms="(gd - gd_norule) - (none - none_norule)", verdict=verdict,
                        reads=reads(NET, verdict), **interval)
    return out


def sensitivity(args, scored):
    """How the answer depends on the endpoint: the headline's comparisons and answer as `--last k`
    would compute them, for k = 1..WINDOWS (while every run has k checkpoints). A run's score can move
    by tens of points from one checkpoint to the next, so an answer that holds at one k only is fragile."""
    if not all(a in args.arms for a in NET_ARMS):
        return []
    grid = {(a, s): [p["points"] for p in scored[(a, s)]["series"] if on_grid(args, p["step"])]
            for a in NET_ARMS for s in args.seeds}
    rows = []
    for k in range(1, WINDOWS + 1):
        if any(len(v) < k for v in grid.values()):
            break
        c = compare(args, lambda arm, s: float(np.mean(grid[(arm, s)][-k:])))
        rows.append(dict(last=k, comparisons={n: c[n] for n in (NET, NEGATIVE, NEGATIVE_NONE)},
                         answer=headline(c)[0]))
    return rows


def reads(name, verdict):
    """A comparison's verdict in its own words: a rule-learned comparison 'learned the rule' rather
    than 'helps'."""
    if name in (NEGATIVE, NEGATIVE_NONE):
        return {"helps": "learned the rule", "hurts": "below its rule-free control",
                "no difference": "no difference from its rule-free control"}.get(verdict, verdict)
    return verdict


# ============================================================================ report

def span(s, fmt="{:+.1f}"):
    """'+1.2 [-0.3, +2.6] (seeds +0.8, +1.6, +1.2)' for a seed_interval."""
    text = fmt.format(s["mean"])
    if s["ci"] is not None:
        text += " [" + ", ".join(fmt.format(v) for v in s["ci"]) + "]"
    return text + " (seeds " + ", ".join(fmt.format(v) for v in s["values"]) + ")"


def tables(res):
    args, arms = res["config"], res["arms"]
    last = ",".join(map(str, next(iter(arms.values()))["endpoint_steps"]))
    out = [f"The iris reader on known faces (--validate_reader, {res['reader']['n']} faces each), points above "
           f"chance [95% bootstrap interval over faces]: " + "; ".join(
               f"{k} {v['points']:+.1f} [{v['ci'][0]:+.1f}, {v['ci'][1]:+.1f}]"
               for k, v in res["reader"]["cases"].items()),
           "",
           f"Eye-colour rule score ({args['imsize']}px, conv_dim {args['conv_dim']}, batch {args['batch_size']}, "
           f"{args['steps']} steps, seeds {','.join(map(str, args['seeds']))}; {args['num_samples']} faces per "
           f"checkpoint): points above chance (50 = every face's eyes match best, 0 = no rule), the endpoint "
           f"a run's mean over steps {last}; mean over seeds [95% t interval over seeds] (each seed). Whether G "
           f"draws faces at all, over the same steps: layout = correlation of the mean generated image with the "
           f"built-in faces' mean image (1 = their layout, about 0 for a texture), diversity = per-pixel sd "
           f"across images over the built-in faces' (0 = every image the same); an arm that draws no faces "
           f"reads at chance without having been tested.", "",
           "| arm | what it is | endpoint | layout | diversity |", "|---|---|---|---|---|"]
    out += [f"| {arm} | {a['name']} | {span(a['endpoint'])} | {span(a['drawing']['layout'], '{:.2f}')} | "
            f"{span(a['drawing']['diversity'], '{:.2f}')} |" for arm, a in arms.items()]
    out += ["", f"Seed-matched differences of endpoints (points), verdict at a margin of +-{MARGIN:g} points:", "",
            "| comparison | arms | difference | verdict |", "|---|---|---|---|"]
    out += [f"| {name} | {c['arms']} | {span(c)} | {c['reads']} |"
            for name, c in res["comparisons"].items()]
    h = res["headline"]
    out += ["", f"Answer: {h['verdict']}" + (f" ({h['why']})" if h["why"] else "") + "."]
    if res["sensitivity"]:
        out += ["", f"How the answer depends on the endpoint (the experiment's: the last {args['last']} "
                    f"checkpoints): the same comparisons with a run's endpoint its mean over its last k "
                    f"checkpoints on the --model_save_step grid (`--last k`).", "",
                "| last k | net | gd - gd_norule | none - none_norule | answer |", "|---|---|---|---|---|"]
        out += [f"| {r['last']} | " + " | ".join(f"{span(r['comparisons'][n])}: {r['comparisons'][n]['reads']}"
                                               for n in (NET, NEGATIVE, NEGATIVE_NONE)) + f" | {r['answer']} |"
                for r in res["sensitivity"]]

    with_g = {arm: a for arm, a in arms.items() if "attention" in a}
    if with_g:
        out += ["", "Eye queries' attention at the last checkpoint, over uniform (1 = no preference): on the other "
                    "eye and on an eye-free control as far away, by weights and by contributions ||gamma a v||.", "",
                "| arm | layer | changes its input by | other eye (weights) | control (weights) | "
                "other eye (contributions) | control (contributions) |", "|---|---|---|---|---|---|---|"]
        for arm, a in with_g.items():
            for layer, e in a["attention"].items():
                f = lambda k: "n/a" if np.isnan(e[k]["mean"]) else span(e[k], "{:.2f}")  # noqa: E731
                out.append(f"| {arm} | {layer} | {100 * e['share']['mean']:.1f}% | {f('other')} | {f('control')} | "
                           f"{f('other_contrib')} | {f('control_contrib')} |")
        out += ["", "Causal test: the drop in the score (points) with attention layers' terms removed at inference.",
                "", "| arm | removed | drop |", "|---|---|---|"]
        out += [f"| {arm} | {'all layers' if k == 'all' else k} | {span(r['drop'])} |"
                for arm, a in with_g.items() for k, r in a["removed"].items()]
        out += ["", "Mechanism test: the left iris's colour change (RGB distance, 0..1) when its queries read another "
                    "face's value vectors at the other eye or at the mouth (a control with contrast), with the trained "
                    "and with randomised query/key weights; and the eye queries' mass on each region over uniform, "
                    "by weights and by contributions.", "",
                "| arm | layer | weights | change: other eye | change: mouth | other eye by weight | "
                "by contribution | mouth by weight | by contribution |", "|---|---|---|---|---|---|---|---|---|"]
        for arm, a in with_g.items():
            for layer, m in a["mechanism"].items():
                for part in ("trained", "random_qk"):
                    p = m[part]
                    out.append(f"| {arm} | {layer} | {part} | {span(p['other'], '{:.4f}')} | "
                               f"{span(p['control'], '{:.4f}')} | {span(p['other_by_weight'], '{:.2f}')} | "
                               f"{span(p['other_by_contribution'], '{:.2f}')} | "
                               f"{span(p['control_by_weight'], '{:.2f}')} | "
                               f"{span(p['control_by_contribution'], '{:.2f}')} |")
    cols = [(arm, s) for arm in arms for s in map(str, args["seeds"])]
    out += ["", "Along training: the score (points) of every checkpoint; * = its face-level 95% interval above "
                "zero.", "",
            "| step | " + " | ".join(f"{arm} s{s}" for arm, s in cols) + " |", "|---|" + "---|" * len(cols)]
    for step in sorted({p["step"] for arm, s in cols for p in arms[arm]["series"][s]}):
        cells = []
        for arm, s in cols:
            p = next((p for p in arms[arm]["series"][s] if p["step"] == step), None)
            cells.append("-" if p is None else f"{p['points']:+.1f}{'*' if p['ci'][0] > 0 else ''}")
        out.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def summary(res):
    """Plain sentences, each naming its numbers."""
    args, say = res["config"], []
    for name, c in res["comparisons"].items():
        ci = ("no interval with one seed" if c["ci"] is None
              else f"95% t interval [{c['ci'][0]:+.1f}, {c['ci'][1]:+.1f}]")
        say.append(f"{name} ({c['arms']}): {c['mean']:+.1f} points, {ci} over {c['n']} "
                   f"seed{'s' if c['n'] > 1 else ''}: {c['reads']}.")
    h = res["headline"]
    say.append(f"Answer to 'does attention help carry the eye-colour rule?': {h['verdict']}"
               + (f", because {h['why']}" if h["why"] else "") + ".")
    if res["sensitivity"]:
        say.append(f"The answer with the endpoint over each run's last k checkpoints (the experiment's: k = "
                   f"{args['last']}): " + ", ".join(f"k = {r['last']} {r['answer']}" for r in res["sensitivity"])
                   + ".")
    say.append(f"What this does not show: one budget ({args['steps']} steps at {args['imsize']}px, conv_dim "
               f"{args['conv_dim']}) and {len(args['seeds'])} seeds; the built-in faces, not real ones; and removing "
               f"or swapping inside a layer also changes the input of every later layer.")
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
    for arm in args.arms:
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


def series_figure(res, path):
    """The score of every checkpoint along training: one panel per arm, one line per seed, the
    endpoint's checkpoints shaded; the rule-free controls' panels show what the score reads without
    a rule. Returns `path`."""
    import matplotlib.pyplot as plt
    arms = res["arms"]
    fig, axes = plt.subplots(1, len(arms), figsize=(3.2 * len(arms), 3), sharey=True, squeeze=False)
    for ax, (arm, a) in zip(axes[0], arms.items()):
        for seed, series in a["series"].items():
            ax.plot([p["step"] for p in series], [p["points"] for p in series], marker=".", label=f"seed {seed}")
        last = a["endpoint_steps"]
        ax.axvspan(last[0], last[-1], color="0.9", zorder=0)
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_title(f"{arm}\nendpoint {a['endpoint']['mean']:+.1f}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("points above chance", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Eye-colour score of every checkpoint (grey: the endpoint's checkpoints)", fontsize=10, y=1.04)
    return save_figure(fig, path)


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
    arms = [a for a in NET_ARMS if a in args.arms] or args.arms[:2]
    steps = [s for s in saved_steps(run_dir(args, arms[0], seed)) if s <= args.steps]
    rows = []
    for step in steps:
        row = []
        for arm in arms:
            G = load_generator(os.path.join(run_dir(args, arm, seed), ckpt_name(step)), ema=False, verbose=False)
            band = eye_band(generated_faces(G, fixed_z(IRIS_FACES, G.z_dim)), layout)  # (n, h, w, 3)
            gap = np.ones((band.shape[1], 1, 3))
            row.append(np.concatenate([x for b in band for x in (b, gap)][:-1], axis=1))  # (h, n * (w + 1) - 1, 3)
        gap = np.ones((row[0].shape[0], 4, 3))
        rows.append(np.concatenate([x for r in row for x in (r, gap)][:-1], axis=1))
    h = rows[0].shape[0]
    grid = np.concatenate([np.concatenate([r, np.ones((2, r.shape[1], 3))]) for r in rows])[:-2]
    width = max(10, grid.shape[1] / 50)  # about 2 screen pixels per image pixel
    fig, ax = plt.subplots(figsize=(width, width * grid.shape[0] / grid.shape[1] + 0.8))
    ax.imshow(grid.clip(0, 1), interpolation="nearest")
    ax.set_yticks([(h + 2) * i + h / 2 for i in range(len(steps))], [f"step {s}" for s in steps])
    arm_w = row[0].shape[1] + 4
    ax.set_xticks([arm_w * k + row[0].shape[1] / 2 for k in range(len(arms))], arms)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(f"The eyes of the same {IRIS_FACES} z along training (seed {seed}, raw G, {args.imsize}px)",
                 fontsize=10, pad=24)
    return save_figure(fig, os.path.join(args.out, f"irises_seed{seed}.png"))


def main(argv=None):
    start = time.perf_counter()
    matplotlib.use("Agg")  # headless: the figures go to files (attention_figures imports pyplot on first use)
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
    res = aggregate(args, scored)
    res["reader"] = dict(n=args.num_samples, cases=validate_reader(args.num_samples, args.imsize, args.tol))
    res["summary"] = summary(res)
    res["figures"] = (([] if args.no_mechanism else eye_query_figures(args, layout))
                      + [series_figure(res, os.path.join(args.out, "scores_along_training.png")),
                         irises_figure(args, layout)])
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
