"""Every command fed malformed files ends with one line `<prog>: error: ...` naming the file, a
non-zero exit status and no traceback: random bytes, a real checkpoint cut at many lengths, an empty
file, torch files that are not checkpoints, and checkpoints with wrong types or shapes inside.

The commands run as real processes. A fresh `python <command>` costs seconds of imports on a busy
machine, so most cases run in a process forked from one that imported the commands once (conftest's
fork server): the child runs the command's file as __main__ with its arguments, and ends as the
interpreter would. One case per command also runs as a fresh process.
"""
import pickle
import random
import shutil
import subprocess
import sys
import pytest
import torch
from PIL import Image

from checkpoint import CheckpointError, load_generator
from conftest import ROOT, SMOKE, one_thread_env

ENV = one_thread_env(PYTHONUNBUFFERED="1")
COMMANDS = ("main.py", "visualize_attn.py", "evaluate.py")
# damage that only the commands reading that part must refuse: evaluate.py never rebuilds D, only a
# resumed run restores the RNG states, and resuming compares the architecture flags it knows
READ_BY = {"D_wrong_shapes": ("main.py", "visualize_attn.py"), "rng_empty": ("main.py",),
           "opt_g_reordered": ("main.py",),
           "unknown_model_arg": ("visualize_attn.py", "evaluate.py")}


# ----------------------------------------------------------------------------- the inputs

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A real checkpoint of `main.py --preset smoke`, and a folder of real images for evaluate.py."""
    tmp = tmp_path_factory.mktemp("real")
    subprocess.run([sys.executable, "main.py", *SMOKE, "--model_save_path", str(tmp / "models"),
                    "--sample_path", str(tmp / "samples")], cwd=ROOT, env=ENV, check=True,
                   capture_output=True, timeout=300)
    return tmp / "models" / "smoke" / "latest.pt", image_folder(tmp / "images", 4)


def image_folder(folder, n):
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (40, 40), (10 * i, 100, 200)).save(folder / f"{i}.png")
    return folder


def edited(ckpt, edit):
    """A deep-enough copy of the checkpoint dict with `edit` applied."""
    c = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ckpt.items()}
    c["model_args"] = {k: dict(v) for k, v in ckpt["model_args"].items()}
    edit(c)
    return c


def narrowed(weights):
    return {k: t[..., :1].clone() if t.dim() else t for k, t in weights.items()}


def reordered(opt_state):
    """An optimizer state with its per-parameter states in reverse order: what a checkpoint looks
    like to code that registers the network's layers in another order (it once crashed the fused
    Adam step with corrupted memory instead of an error)."""
    states = opt_state["state"]
    keys = sorted(states)
    return dict(opt_state, state={k: states[keys[-1 - i]] for i, k in enumerate(keys)})


def truncation_lengths(size, n):
    """n lengths from 1 byte to size - 1, denser at both ends (headers and the zip's directory)."""
    ends = [1, 2, 10, 64, 100, 512, 1000, 4096]
    return sorted({*ends, *(size - e for e in ends), *(size * i // n for i in range(1, n))})


def write_malformed(real_ckpt, folder):
    """{name: path} of every malformed input. Cut and random files are from seeded draws."""
    data = real_ckpt.read_bytes()
    ckpt = torch.load(real_ckpt, weights_only=True)
    files = {"empty": b"", "random": random.Random(0).randbytes(5000),
             "a_plain_pickle": pickle.dumps({"step": 1}),  # a protocol torch's safe unpickler warns about
             **{f"cut_{n}": data[:n] for n in (1, 100, 1000, len(data) // 2, len(data) - 10)}}
    not_checkpoints = {
        "a_list": [1, 2, 3],
        "a_tensor": torch.zeros(3),
        "seed_repo_state_dict": {"l1.weight": torch.zeros(2, 2)},
        "dict_without_G": edited(ckpt, lambda c: (c.pop("G"), c.pop("G_ema"))),
        "step_a_string": edited(ckpt, lambda c: c.update(step="2")),
        "config_none": edited(ckpt, lambda c: c.update(config=None)),
        "model_args_a_list": edited(ckpt, lambda c: c.update(model_args=[1])),
        "model_args_G_none": edited(ckpt, lambda c: c["model_args"].update(G=None)),
        "model_args_without_D": edited(ckpt, lambda c: c["model_args"].pop("D")),
        "image_size_a_string": edited(ckpt, lambda c: c["model_args"]["G"].update(image_size="64")),
        "image_size_none": edited(ckpt, lambda c: c["model_args"]["G"].update(image_size=None)),
        "image_size_a_list": edited(ckpt, lambda c: c["model_args"]["G"].update(image_size=[64])),
        "image_size_a_float": edited(ckpt, lambda c: c["model_args"]["G"].update(image_size=32.0)),
        "image_size_huge": edited(ckpt, lambda c: c["model_args"]["G"].update(image_size=2 ** 40)),
        "z_dim_negative": edited(ckpt, lambda c: c["model_args"]["G"].update(z_dim=-3)),
        "attn_res_a_string": edited(ckpt, lambda c: c["model_args"]["G"].update(attn_res="16")),
        "unknown_model_arg": edited(ckpt, lambda c: c["model_args"]["G"].update(bogus=1)),
        "G_a_list": edited(ckpt, lambda c: c.update(G=[1])),
        "G_wrong_shapes": edited(ckpt, lambda c: c.update(G=narrowed(c["G"]))),
        "G_ema_wrong_shapes": edited(ckpt, lambda c: c.update(G_ema=narrowed(c["G_ema"]))),
        "G_and_G_ema_wrong_shapes": edited(ckpt, lambda c: c.update(G=narrowed(c["G"]), G_ema=narrowed(c["G_ema"]))),
        "D_wrong_shapes": edited(ckpt, lambda c: c.update(D=narrowed(c["D"]))),
        "rng_empty": edited(ckpt, lambda c: c.update(rng={})),
        "opt_g_reordered": edited(ckpt, lambda c: c.update(opt_g=reordered(c["opt_g"]))),
    }
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name}.pt"
        paths[name].write_bytes(content)
    for name, obj in not_checkpoints.items():
        paths[name] = folder / f"{name}.pt"
        torch.save(obj, paths[name])
    return paths


@pytest.fixture(scope="module")
def malformed(real, tmp_path_factory):
    return write_malformed(real[0], tmp_path_factory.mktemp("malformed"))


# ----------------------------------------------------------------------------- running the commands

def run_all(fork_server, runs, folder):
    """{key: (script, args)} -> {key: (exit status, stdout, stderr)}, two runs at a time (2 cores)."""
    results, running = {}, {}

    def collect():
        pid, code = fork_server.wait_any()
        key, out, err = running.pop(pid)
        results[key] = (code, out.read_text(), err.read_text())

    for i, (key, (script, args)) in enumerate(runs.items()):
        if len(running) == 2:
            collect()
        out, err = folder / f"run{i}.out", folder / f"run{i}.err"
        running[fork_server.run(script, args, out, err)] = (key, out, err)
    while running:
        collect()
    return results


def command_line(command, path, images, folder):
    """(arguments, the file the message must name) to run `command` on the checkpoint `path`."""
    if command == "main.py":  # resume from it, as the run folder's latest.pt
        latest = folder / "models" / "smoke" / "latest.pt"
        latest.parent.mkdir(parents=True)
        shutil.copy(path, latest)
        return [*SMOKE, "--model_save_path", folder / "models", "--sample_path",
                folder / "samples", "--resume"], latest
    if command == "visualize_attn.py":
        return ["--checkpoint", path, "--out", folder / "attn.png", "--with_d"], path
    return ["--checkpoint", path, "--real", images, "--features", "randconv", "--num_samples", "4",
            "--num_real", "4", "--batch_size", "4", "--kid_subset_size", "2", "--kid_subsets", "2",
            "--cache_dir", folder / "cache"], path


def assert_one_line_error(prog, result, *named):
    code, out, err = result
    assert code != 0, (prog, named, out, err)
    assert "Traceback" not in out + err, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert all(str(n) in lines[0] for n in named), (named, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- tests

def test_loading_any_malformed_file_is_one_checkpoint_error_naming_it(real, malformed, tmp_path):
    """In this process, so the real checkpoint can be cut at many lengths and damaged at many places."""
    data = real[0].read_bytes()
    # load_generator reads what evaluate.py reads: the generator and what describes it
    files = {name: path for name, path in malformed.items() if "evaluate.py" in READ_BY.get(name, COMMANDS)}
    for n in truncation_lengths(len(data), 40):
        files[f"cut_{n}"] = tmp_path / f"cut_{n}.pt"
        files[f"cut_{n}"].write_bytes(data[:n])
    rng = random.Random(0)
    flipped = []
    for i in range(30):  # bytes changed at random places: the file may still be a valid checkpoint
        damaged = bytearray(data)
        for _ in range(rng.choice([1, 8, 64])):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        flipped.append(tmp_path / f"flipped_{i}.pt")
        flipped[-1].write_bytes(bytes(damaged))
    for path in [*files.values(), *flipped, *(malformed[name] for name in READ_BY if name not in files)]:
        for ema in (True, False):
            try:
                load_generator(str(path), ema=ema, verbose=False)
            except CheckpointError as e:
                assert "\n" not in str(e) and str(path) in str(e), (path.name, str(e))
                assert path in files.values() or path in flipped, (path.name, str(e))
            else:  # bytes changed inside a tensor, or damage to what the generator does not read
                assert path not in files.values(), f"{path.name} loaded"


def test_every_command_ends_every_malformed_file_with_one_line(real, malformed, fork_server, tmp_path):
    runs, named = {}, {}
    for command in COMMANDS:
        for name, path in malformed.items():
            if command not in READ_BY.get(name, COMMANDS):
                continue
            folder = tmp_path / command / name
            folder.mkdir(parents=True)
            args, named[command, name] = command_line(command, path, real[1], folder)
            runs[command, name] = (command, args)
    results = run_all(fork_server, runs, tmp_path)
    for (command, name), result in results.items():
        assert_one_line_error(command, result, named[command, name])


@pytest.mark.parametrize("command", COMMANDS)
def test_an_empty_checkpoint_in_a_fresh_process(real, tmp_path, command):
    """The known traceback: an IndexError while quoting the EOFError's empty message."""
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    args, named = command_line(command, empty, real[1], tmp_path)
    proc = subprocess.run([sys.executable, command, *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    line = assert_one_line_error(command, (proc.returncode, proc.stdout, proc.stderr), named)
    assert "corrupt or truncated (EOFError)" in line


def test_bad_image_folders_are_one_line_errors_before_training(fork_server, tmp_path):
    a_file = tmp_path / "celeba.zip"
    a_file.write_bytes(b"PK")
    few = image_folder(tmp_path / "few", 3)
    common = [*SMOKE, "--dataset", "celeb", "--cache", "off", "--batch_size", "4",
              "--model_save_path", tmp_path / "models", "--sample_path", tmp_path / "samples"]
    runs = {"file": ("main.py", [*common, "--image_path", a_file]),
            "few": ("main.py", [*common, "--image_path", few])}
    results = run_all(fork_server, runs, tmp_path)
    line = assert_one_line_error("main.py", results["file"], a_file)
    assert "is a file, not a folder" in line
    line = assert_one_line_error("main.py", results["few"], f"--image_path {str(few)!r} has 3 images")
    assert "fewer than the global batch 4 (--batch_size 4): lower --batch_size" in line
    assert not (tmp_path / "models" / "smoke" / "metrics.jsonl").exists()  # no trainer was built
