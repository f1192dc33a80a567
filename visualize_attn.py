"""Where does a pixel of a generated image look? SAGAN attention figures and statistics from a
checkpoint, headless (PNG out, no display needed).

    python visualize_attn.py --checkpoint models/quick/latest.pt --out attn.png
    python visualize_attn.py --checkpoint models/quick/latest.pt --view layers --pixel 12,10 --out layers.png
    python visualize_attn.py --checkpoint models/quick/latest.pt --view grid --seeds 0-7 --out grid.png
    python visualize_attn.py --checkpoint models/quick/latest.pt --view html --out page.html
    python visualize_attn.py --checkpoint models/quick/latest.pt --table
    python visualize_attn.py --checkpoint models/quick/latest.pt --table --json    # JSON lines
    python visualize_attn.py --checkpoint models/quick --view film --out film.png  # and film.gif

Views: query (the seed README's figure for one layer), layers (every layer side by side), queries
(several colour-coded queries, the SAGAN paper's Figure 1), grid (one query across many images),
saliency (attention each key receives), contribution (the weights next to what each key adds to
the query's output), intervene (what changes in the image when one query's attention is replaced),
film (the same image and query across the run's saved checkpoints: a strip PNG and a GIF),
html (a standalone page: hover or click a pixel of --seeds' images, every layer of G and D follows).
A query is an image pixel --pixel X,Y (x right, y down, from 0) or a feature cell of --layer,
--cell ROW,COL. The generator shown is the EMA one when the
checkpoint has it (as in the run's samples), the raw G with --raw_g; every output says which.

This file is the command line only (its arguments, their checks, which function each view calls):
the session is explorer.py's, the table attention_stats.py's, the page attention_page.py's.
"""
import argparse
import contextlib
import os
import sys

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display

import explorer  # noqa: E402
from attention import INTERVENTIONS, TOPK  # noqa: E402
from attention_figures import save_figure  # noqa: E402
from attention_page import film_data, write_page  # noqa: E402
from attention_stats import format_json  # noqa: E402
from cli import Parser, UserError, run  # noqa: E402
from data_loader import load_image  # noqa: E402

VIEWS = ("query", "layers", "queries", "grid", "saliency", "contribution", "intervene", "film", "html")


def int_pair(text):
    try:
        a, b = (int(t) for t in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not two integers like 12,10") from None
    return a, b


def seed_list(text):
    """'0-7' -> [0..7]; '3,5,9' -> [3, 5, 9]."""
    try:
        if "-" in text.strip("-"):
            lo, hi = (int(t) for t in text.split("-"))
            if hi < lo:
                raise ValueError
            return list(range(lo, hi + 1))
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed list like 0-7 or 3,5,9") from None


def build_parser():
    p = Parser(prog="visualize_attn.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--checkpoint", help="a checkpoint of this project, e.g. models/quick/latest.pt, or a seed "
                            "repository's 64px <step>_G.pth / <step>-G.ckpt (default: "
                            "$SAGAN_CHECKPOINT, else the newest run under models/, else the showcase "
                            "model in assets/); for --view film also a run folder")
    a("--out", help="PNG file for the figure, HTML file for --view html (not needed with --table alone)")
    a("--view", choices=VIEWS, default="query",
      help="query: one layer, the seed's figure; layers: every layer; queries: several colour-coded "
           "queries (one --pixel each); grid: one query across --seeds; saliency: attention received; "
           "contribution: weights and ||gamma a v|| per key; intervene: the image with the query's "
           "attention changed (--intervention); film: one column per saved checkpoint of the run "
           "(--max_frames), and an animated GIF of them beside --out; html: a standalone page of "
           "every layer of G and D for the query under the mouse, over --seeds")
    a("--seed", type=int, default=0, help="seed of the generated image (z = randn from this seed)")
    a("--seeds", type=seed_list, default=list(range(8)), help="images of --view grid and html, e.g. 0-7")
    a("--layer", help="attention layer, e.g. G16 or D8 (default: the generator's largest)")
    a("--pixel", type=int_pair, action="append", metavar="X,Y",
      help="query as an image pixel (default: about a face's left eye); repeat for --view queries")
    a("--cell", type=int_pair, metavar="ROW,COL", help="query as a feature cell of --layer")
    a("--topk", type=int, default=TOPK, help="top attended locations marked")
    a("--upsample", choices=["nearest", "bilinear"], default="nearest",
      help="map over the image: nearest = the layer's true blocks (default), bilinear = smooth")
    a("--intervention", choices=INTERVENTIONS, default="uniform",
      help="--view intervene: the query's attention row made uniform (default), the mean of all rows, "
           "or its attention term removed")
    a("--max_frames", type=int, default=12,
      help="--view film: at most this many checkpoints, evenly spaced, always the last")
    a("--channel", type=int, help="feature panel shows this channel (default: mean over channels)")
    a("--raw_g", action="store_true", help="show the raw G, not the EMA generator")
    a("--with_d", action="store_true", help="include the discriminator's attention layers")
    a("--d_image", help="an image file D attends over (default: the generated image); implies --with_d")
    a("--center_crop", type=int, default=160, help="crop for --d_image as in training (0: largest square)")
    a("--table", action="store_true", help="print per-layer statistics over many images and queries")
    a("--table_images", type=int, default=16, help="generated images for --table")
    a("--table_queries", type=int, default=64, help="random query cells per layer for --table")
    a("--table_out", help="also write the --table markdown to this file")
    a("--json", action="store_true", help="print the --table as JSON lines, one object per layer "
                                          "(stdout then holds only them; other lines go to stderr)")
    a("--dpi", type=int, default=100)
    a("--device", default="cpu", help="cpu, cuda or auto")
    return p


def check_args(args):
    if not args.out and not args.table:
        raise UserError("nothing to do: give --out FILE.png for a figure and/or --table")
    if args.json and not args.table:
        raise UserError("--json prints the table: add --table")
    for name in ("topk", "table_images", "table_queries", "dpi", "max_frames"):
        if getattr(args, name) < (0 if name == "topk" else 1):
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.pixel and args.cell:
        raise UserError("give the query as --pixel X,Y or as --cell ROW,COL, not both")
    if args.pixel and len(args.pixel) > 1 and args.view != "queries":
        raise UserError("several --pixel are for --view queries")
    if args.cell and args.view in ("layers", "queries"):
        raise UserError(f"--view {args.view} takes image pixels (--pixel X,Y): cells differ per layer")
    for path in filter(None, (args.out, args.table_out)):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UserError(f"cannot write {path!r}: folder {folder!r} does not exist")
    if args.view == "html":
        if args.out and not args.out.lower().endswith((".html", ".htm")):
            raise UserError(f"--out {args.out!r}: --view html writes a .html file")
        if args.d_image:
            raise UserError("--view html shows D on the generated images: --d_image is for the figure views")
    elif args.out and not args.out.lower().endswith((".png", ".pdf", ".svg", ".jpg")):
        raise UserError(f"--out {args.out!r}: use a .png (or .pdf, .svg, .jpg) file name")


def make_figure(ex, args, d_image):
    pixel = args.pixel[0] if args.pixel else None
    if args.view != "queries" and pixel is None and args.cell is None:
        pixel = ex.default_pixel()
    if args.view == "query":
        return ex.query_figure(args.seed, args.layer, pixel, args.cell, args.topk, args.upsample,
                               args.channel, d_image)
    if args.view == "layers":
        return ex.layers_figure(args.seed, pixel, None, args.topk, args.upsample, d_image)
    if args.view == "queries":
        return ex.queries_figure(args.seed, args.layer, args.pixel, args.topk, args.upsample)
    if args.view == "grid":
        return ex.grid_figure(args.seeds, args.layer, pixel, args.cell, args.topk,
                              upsample=args.upsample)
    if args.view == "contribution":
        return ex.contribution_figure(args.seed, args.layer, pixel, args.cell, args.topk, args.upsample,
                                      d_image)
    if args.view == "intervene":
        return ex.intervention_figure(args.seed, args.layer, pixel, args.cell, args.intervention)
    return ex.saliency_figure(args.seed)


def film_args(args):
    """Film's arguments from the command line's: (path, seed, layer, pixel, cell, max_frames)."""
    return (args.checkpoint, args.seed, args.layer, args.pixel[0] if args.pixel else None, args.cell,
            args.max_frames)


def main(argv=None):
    """The figure and/or the table the arguments ask for, from one checkpoint."""
    args = build_parser().parse_args(argv)
    check_args(args)
    stdout = sys.stdout  # with --json it holds only the JSON lines: everything else said goes to stderr
    try:
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            from utils import pick_device
            device = pick_device(args.device)
            args.checkpoint, why = explorer.find_checkpoint(args.checkpoint)
            if why != "given":
                print(f"checkpoint: {args.checkpoint} ({why})")
            if args.view == "film":  # a run folder: the explorer and the table show its last checkpoint
                args.checkpoint = explorer.film_checkpoints(args.checkpoint)[-1]
            # the page shows every layer of G and D: D whenever the checkpoint has one
            with_d = args.with_d or bool(args.d_image) or (None if args.view == "html" else False)
            ex = explorer.Explorer.from_checkpoint(args.checkpoint, device, with_d=with_d, ema=not args.raw_g)
            if not ex.layers:
                raise UserError(f"{args.checkpoint!r} has no attention layers (trained with --g_attn none)")
            d_image = load_image(args.d_image, ex.imsize, args.center_crop) if args.d_image else None
            print(ex.describe())
            if args.out and args.view == "film":
                film = explorer.Film(*film_args(args), device, ema=not args.raw_g,
                                     with_d=args.with_d or bool(args.d_image), d_image=d_image)
                strip, gif = film.save(args.out, args.topk, args.dpi)
                print(f"steps {', '.join(map(str, film.steps))}: wrote {strip} and {gif}")
            elif args.out and args.view == "html":
                film = explorer.run_film(*film_args(args), device, ema=not args.raw_g)
                size, seconds = write_page(ex, args.out, args.seeds, args.topk,
                                           film_data(film, args.topk) if film else None)
                print(f"wrote {args.out}: {size / 1e6:.2f} MB, {len(args.seeds)} seeds, built in {seconds:.1f} s")
            elif args.out:
                fig, _ = make_figure(ex, args, d_image)
                save_figure(fig, args.out, dpi=args.dpi)
                print(f"wrote {args.out}")
            if args.table:
                text, table = ex.table(args.table_images, args.table_queries)
                if args.json:
                    print(format_json(table, args.table_images, args.table_queries, ex.generator), file=stdout)
                else:
                    print(text)
                if args.table_out:
                    with open(args.table_out, "w") as f:
                        f.write(text + "\n")
    except ValueError as e:  # the explorer's checks: a query off the map, an unknown layer, ...
        raise UserError(str(e)) from None


if __name__ == "__main__":
    run("visualize_attn.py", main)
