"""Every command the README and docs/ show is checked against the code, so the pages cannot drift.

Commands are taken from fenced and indented code blocks and from inline code that starts like a
command (`python ...`, `make ...`, `torchrun ...`), after joining `\\` continuations and dropping
comments, `VAR=value` prefixes and `...`. Then, by program:

- `python X.py ...`, `python -m pkg.mod ...` (also under `torchrun` and `.venv/bin/python`): the script
  runs as `__main__` up to its first `parse_args`, which parses the documented flags with the script's
  own parser and stops it there; an unknown flag or a bad value fails, naming the doc file and line.
- the explorer's commands on `models/quick` run for real, at smoke size: on a 4-step checkpoint made
  by main.py, writing into a temporary folder.
- `make X`: X is a target of the Makefile. `pytest ...`: the test files it names exist.
- anything else must be one of OTHER_PROGRAMS (shell and system commands the pages mention).

A new command in a page needs nothing here: a script is found by its name, a flag by its parser.
"""
import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

import pytest

from conftest import ROOT, explorer_cli

PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
# what the pages mention that is not this project's: checked by their own authors
OTHER_PROGRAMS = {"source", "unzip", "ssh", "kill", "pip", "apt-get", "npm", "cd", "ls", "git"}
COMMAND_START = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S+\s+)*(?:python3?|\.venv/bin/python|make|torchrun|pytest)\s")


# ----------------------------------------------------------------------------- finding the commands

def code_lines(text):
    """(line number, text) of every line of a code block: fenced (``` with no language or a shell
    one) or indented by 4 spaces after a blank line; plus inline `code` that starts like a command."""
    lines, out, fence, indented = text.split("\n"), [], None, False
    for n, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if fence is None:
                fence = stripped[3:].strip() or "sh"
            else:
                fence = None
            continue
        if fence is not None:
            if fence in ("sh", "bash", "shell", "console"):
                out.append((n, line))
            continue
        prev_blank = n == 1 or not lines[n - 2].strip()
        if line.startswith("    ") and stripped and (indented or prev_blank) and not stripped.startswith(("-", "*", "|")):
            indented = True
            out.append((n, line))
            continue
        indented = indented and not stripped  # a blank line keeps an indented block open
        for code in re.findall(r"`([^`]+)`", line):
            if COMMAND_START.match(code):  # a program and something to do: `make` alone is a name
                out.append((n, code))
    return out


def commands(page):
    """(page, line, command text) for every command in the page, continuations joined."""
    found, pending, start = [], "", None
    for n, line in code_lines((ROOT / page).read_text()):
        text = line.strip()
        if text.startswith("$ "):
            text = text[2:]
        if not text or text.startswith("#"):
            continue
        pending, start = (pending + " " + text if pending else text), (start or n)
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        found.append((page, start, pending))
        pending, start = "", None
    return found


def words(command):
    """The command's words: comments, `VAR=value` prefixes, `...` and whole-word <placeholders> dropped."""
    command = re.sub(r"(?<!\S)<[^<>]*>(?!\S)", " ", command)  # `python main.py <same flags> --resume`
    try:
        argv = shlex.split(command, comments=True)
    except ValueError as e:
        raise AssertionError(f"cannot split it as a shell command ({e})") from None
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
        argv = argv[1:]
    return [a for a in argv if a not in ("...", "…")]


def program(argv):
    """('script', path, args), ('module', name, args), or (name, None, args) for anything else."""
    if argv and argv[0] == "torchrun":  # its own options come first, then the script
        i = 1
        while i < len(argv) and not argv[i].endswith(".py") and argv[i] != "-m":
            i += 1
        argv = ["python", *argv[i:]]
    if argv and Path(argv[0]).name in ("python", "python3"):
        if len(argv) > 2 and argv[1] == "-m":
            return ("pytest", None, argv[3:]) if argv[2] == "pytest" else ("module", argv[2], argv[3:])
        if len(argv) > 1 and argv[1].endswith(".py"):
            return "script", argv[1], argv[2:]
    return (argv[0] if argv else ""), None, argv[1:]


ALL = [c for page in PAGES for c in commands(page)]


def where(page, line, command):
    return f"{page}:{line}: `{command}`"


# ----------------------------------------------------------------------------- checking one

class Parsed(Exception):
    """Raised by parse_args once it has parsed: the documented flags are valid, nothing runs."""


@contextlib.contextmanager
def stop_after_parsing():
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def parse_with_its_parser(kind, name, args):
    """Run the script or module as __main__ until it has parsed `args`; '' or argparse's message."""
    err, saved_argv = io.StringIO(), sys.argv
    try:
        with stop_after_parsing(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
                warnings.catch_warnings():
            # runpy's note that the module was imported before (by another test): it runs afresh anyway
            warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
            if kind == "script":
                sys.argv = [str(ROOT / name), *args]
                runpy.run_path(str(ROOT / name), run_name="__main__")
            else:
                sys.argv = [name, *args]
                runpy.run_module(name, run_name="__main__", alter_sys=False)
    except Parsed:
        return ""
    except SystemExit as e:
        return err.getvalue().strip() or f"exited with {e.code}"
    finally:
        sys.argv = saved_argv
    return "it ran to the end without parsing its arguments through argparse"


def make_targets():
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:", (ROOT / "Makefile").read_text(), re.M))


def test_the_pages_have_commands():
    """The extraction finds what it should (a guard against a parser that finds nothing)."""
    found = {(page, cmd) for page, _, cmd in ALL}
    assert ("README.md", "make demo   # sets up .venv, trains on the built-in faces (CPU: a few minutes), "
            "writes the explorer page") in found
    assert any(page == "docs/training.md" and cmd.startswith("torchrun ") for page, cmd in found)
    assert len(ALL) >= 30, ALL
    assert words("SAGAN_CHECKPOINT=a.pt make notebook   # a given checkpoint") == ["make", "notebook"]
    assert words("python main.py <same flags> --resume") == ["python", "main.py", "--resume"]
    assert words("python dashboard.py models/<version>") == ["python", "dashboard.py", "models/<version>"]
    assert program(words("torchrun --nnodes=2 --node_rank=R main.py --batch_size 32 ...")) == \
        ("script", "main.py", ["--batch_size", "32"])
    assert program(["python", "-m", "tools.bench", "--steps", "5"]) == ("module", "tools.bench", ["--steps", "5"])


def test_a_flag_that_does_not_exist_fails():
    assert "unrecognized arguments: --no_such_flag" in parse_with_its_parser(
        "script", "main.py", ["--preset", "quick", "--no_such_flag", "1"])
    assert "invalid int value" in parse_with_its_parser("module", "tools.cache_speed", ["x", "--imsize", "big"])
    assert parse_with_its_parser("script", "visualize_attn.py", ["--view", "layers", "--with_d"]) == ""


@pytest.mark.parametrize("page,line,command", ALL, ids=[f"{p}:{n}" for p, n, _ in ALL])
def test_command(page, line, command, request, tmp_path):
    at = where(page, line, command)
    argv = words(command)
    kind, name, args = program(argv)
    if kind in ("script", "module"):
        if kind == "script" and not (ROOT / name).is_file():
            pytest.fail(f"{at}: {name} does not exist")
        if kind == "script" and name == "visualize_attn.py" and runs_on_the_quick_run(args):
            return run_explorer(at, args, request.getfixturevalue("checkpoint"), tmp_path)
        problem = parse_with_its_parser(kind, name, args)
        assert not problem, f"{at}: {problem}"
    elif kind == "make":
        missing = [t for t in args if not t.startswith("-") and t not in make_targets()]
        assert not missing, f"{at}: no Makefile target {', '.join(missing)}"
    elif kind == "pytest":
        for a in args:
            if a.startswith("tests"):
                assert (ROOT / a.split("::")[0]).exists(), f"{at}: {a} does not exist"
    else:
        assert kind in OTHER_PROGRAMS, (f"{at}: {kind!r} is neither a script of this repository nor a "
                                        f"known program (tests/test_docs.py OTHER_PROGRAMS)")


# ----------------------------------------------------------------------------- the explorer, for real

def runs_on_the_quick_run(args):
    """An explorer command on `make demo`'s run and nothing else from outside (no --d_image file)."""
    value = dict(zip(args, args[1:])).get("--checkpoint", "")
    return value in ("models/quick", "models/quick/latest.pt") and "--d_image" not in args


def run_explorer(at, args, checkpoint, tmp_path):
    """The command on the 4-step smoke run instead of models/quick, its --out and --table_out in tmp_path
    (a documented command that makes an asset must not overwrite it from the smoke run)."""
    args = list(args)
    i = args.index("--checkpoint")
    args[i + 1] = checkpoint if args[i + 1].endswith(".pt") else os.path.dirname(checkpoint)
    out = None
    if "--table_out" in args:
        j = args.index("--table_out")
        args[j + 1] = str(tmp_path / Path(args[j + 1]).name)
    if "--out" in args:
        j = args.index("--out")
        out = args[j + 1] = str(tmp_path / Path(args[j + 1]).name)
    code, message = explorer_cli(*args)
    assert code == 0, f"{at}: exit {code}: {message}"
    if out:
        assert os.path.getsize(out) > 0, f"{at}: wrote nothing to {out}"
