"""metrics.jsonl: one JSON record per log step, made, written and read here and nowhere else.

A record: {"step", "d_loss_real", "d_loss_fake", ["d_gp",] "d_loss", "g_loss", "gamma/G16", ...,
"gamma/D4", "it_s", "time"}: the losses averaged over the steps since the last record (and over
ranks), each attention layer's gamma (how much it contributes), steps per second, the wall clock.
"""
import json
import os
import time

from run_files import atomic_write_text


def gammas(G, D):
    """{'gamma/G16': ..., 'gamma/D8': ...}: how much each attention layer contributes."""
    out = {f"gamma/G{r}": m.gamma.item() for r, m in G.attn.items()}
    out.update({f"gamma/D{r}": m.gamma.item() for r, m in D.attn.items()})
    return out


def make_record(step, losses, G, D, steps, since):
    """The record of `step`: `losses` {name: float}, the gammas of G and D, and the speed of the
    `steps` steps taken since the time `since`."""
    now = time.time()
    return {"step": step, **losses, **gammas(G, D), "it_s": steps / (now - since), "time": now}


def append_record(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(path, until=None):
    """The records of a metrics.jsonl (none when it does not exist), up to step `until` if given;
    the half-written last line a kill can leave is skipped."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [r for r in map(_parse, f) if r]
    return [r for r in records if until is None or r["step"] <= until]


def write_records(path, records):
    """Replace the file with `records`, atomically: a kill in the middle must not lose the history."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _parse(line):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def status_line(r, total):
    """A record as the one console line per log step."""
    gam = " ".join(f"{k[6:]} {v:+.3f}" for k, v in r.items() if k.startswith("gamma/"))
    gp = f" gp {r['d_gp']:.3f}" if "d_gp" in r else ""
    return (f"step {r['step']}/{total} | {r['it_s']:.2f} it/s | D {r['d_loss']:.4f} "
            f"(real {r['d_loss_real']:.4f} fake {r['d_loss_fake']:.4f}{gp}) | G {r['g_loss']:.4f} | "
            f"gamma {gam or '(no attention)'}")
