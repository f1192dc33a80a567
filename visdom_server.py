"""Offline visdom dashboard server.

Stock `visdom` fetches its front-end files from CDNs every time it starts and
crashes without internet. Here the same files come from the npm registry (the
one registry this machine can reach), are copied to the names visdom's own
build.py expects, and the server is started without the download step.

    python visdom_server.py --install_static          # once per venv
    python visdom_server.py [--port 8097] [--hostname localhost] [--env_path DIR]
    python visdom_server.py --background    # start one in the background unless one answers already

A run's panels are at http://localhost:8097/env/<its --version> (the front page is the empty 'main'
env); they are saved under --env_path and come back when the server restarts. A finished run goes back
on the dashboard from its folder with `python dashboard.py models/<version>`.

From tests:  proc = start_server(port, env_path=d); wait_until_up(port); stop_server(proc)
"""
import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

from cli import Parser, UserError, run

# (npm package@exact version, file inside the package, destination under visdom/static/).
# Destinations copy visdom 0.2.4's server/build.py download_scripts() exactly:
# its check is "file exists at this path", so any other name means a re-download.
_BOOTSTRAP = "bootstrap@3.3.7"
_MATHJAX = "mathjax@2.7.5"
STATIC_FILES = [
    ("jquery@3.1.1", "dist/jquery.min.js", "js/jquery.min.js"),
    (_BOOTSTRAP, "dist/js/bootstrap.min.js", "js/bootstrap.min.js"),
    ("react@16.2.0", "umd/react.production.min.js", "js/react-react.min.js"),
    ("react-dom@16.2.0", "umd/react-dom.production.min.js", "js/react-dom.min.js"),
    ("react-modal@3.1.10", "dist/react-modal.min.js", "js/react-modal.min.js"),
    # build.py takes cdn.plot.ly/plotly-2.11.1.min.js; this is the same build.
    ("plotly.js-dist-min@2.11.1", "plotly.min.js", "js/plotly-plotly.min.js"),
    ("sjcl@1.0.7", "sjcl.js", "js/sjcl.js"),
    ("layout-bin-packer@1.4.0", "dist/layout-bin-packer.js.map", "js/layout-bin-packer.js.map"),
    ("layout-bin-packer@1.4.0", "dist/layout-bin-packer.js", "js/layout_bin_packer.js"),
    # d3js.org's d3.v3 / d3-selection-multi.v1 are the last v3 / v1 releases.
    ("d3@3.5.17", "d3.min.js", "js/d3.v3.min.js"),
    ("d3-selection-multi@1.0.1", "build/d3-selection-multi.js", "js/d3-selection-multi.v1.js"),
    ("save-svg-as-png@1.4.17", "lib/saveSvgAsPng.js", "js/saveSvgAsPng.js"),
    ("react-resizable@1.4.6", "css/styles.css", "css/react-resizable-styles.css"),
    ("react-grid-layout@0.16.3", "css/styles.css", "css/react-grid-layout-styles.css"),
    (_BOOTSTRAP, "dist/css/bootstrap.min.css", "css/bootstrap.min.css"),
    # build.py saves unpkg's "classnames@2.2.5" (the package's main file) under fonts/.
    ("classnames@2.2.5", "index.js", "fonts/classnames"),
    (_BOOTSTRAP, "dist/fonts/glyphicons-halflings-regular.eot", "fonts/glyphicons-halflings-regular.eot"),
    (_BOOTSTRAP, "dist/fonts/glyphicons-halflings-regular.woff2", "fonts/glyphicons-halflings-regular.woff2"),
    (_BOOTSTRAP, "dist/fonts/glyphicons-halflings-regular.woff", "fonts/glyphicons-halflings-regular.woff"),
    (_BOOTSTRAP, "dist/fonts/glyphicons-halflings-regular.ttf", "fonts/glyphicons-halflings-regular.ttf"),
    # Yes, build.py keeps the URL fragment in the file name.
    (_BOOTSTRAP, "dist/fonts/glyphicons-halflings-regular.svg",
     "fonts/glyphicons-halflings-regular.svg#glyphicons_halflingsregular"),
] + [
    (_MATHJAX, f, "js/mathjax/2.7.5/" + f)
    for f in [
        "config/Safe.js",
        "config/TeX-AMS-MML_HTMLorMML.js",
        "extensions/Safe.js",
        "jax/output/SVG/fonts/TeX/fontdata.js",
        "jax/output/SVG/jax.js",
        "jax/output/SVG/fonts/TeX/Size1/Regular/Main.js",
        "jax/output/SVG/config.js",
        "MathJax.js",
    ]
]

DEFAULT_PORT = 8097
DEFAULT_HOSTNAME = "localhost"


def visdom_dir():
    # find_spec does not run visdom/__init__.py, which imports torch (~2 s).
    spec = importlib.util.find_spec("visdom")
    if spec is None:
        raise UserError("visdom is not installed in this Python (pip install visdom==0.2.4)")
    return Path(spec.origin).parent


def _visdom_version():
    # Same source visdom.__version__ reads; build.py compares it to static/version.built.
    try:
        return (visdom_dir() / "VERSION").read_text().strip()
    except OSError:
        return "no_version_file"


def missing_static():
    """Destinations (relative to visdom/static) that are absent, plus version.built if stale."""
    static = visdom_dir() / "static"
    missing = [dst for _, _, dst in STATIC_FILES if not (static / dst).exists()]
    built = static / "version.built"
    if not built.exists() or built.read_text().strip() != _visdom_version():
        missing.append("version.built")
    return missing


def npm_available():
    return shutil.which("npm") is not None


def install_static(quiet=False):
    """Idempotently put visdom's front-end files in place from the npm registry."""
    missing = missing_static()
    say = (lambda *a: None) if quiet else print
    if not missing:
        say("visdom static files already installed")
        return
    if not npm_available():
        raise UserError("npm not found; install Node.js + npm (e.g. `apt-get install -y npm`) "
                        "and rerun `python visdom_server.py --install_static`")
    static = visdom_dir() / "static"
    todo = [f for f in STATIC_FILES if f[2] in missing] if "version.built" not in missing else STATIC_FILES
    specs = sorted({spec for spec, _, _ in todo})
    say(f"fetching {len(specs)} npm packages for visdom's static files ...")
    with tempfile.TemporaryDirectory(prefix="visdom_npm_") as tmp:
        # `npm pack` only downloads tarballs: no dependency tree, no install scripts.
        res = subprocess.run(["npm", "pack", "--json", "--pack-destination", tmp, *specs],
                             cwd=tmp, capture_output=True, text=True)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise UserError(f"`npm pack` failed ({last}); is the npm registry reachable?")
        tarballs = {f"{p['name']}@{p['version']}": Path(tmp) / p["filename"]
                    for p in json.loads(res.stdout)}
        for spec in specs:
            with tarfile.open(tarballs[spec]) as tar:
                for _, src, dst in (f for f in todo if f[0] == spec):
                    data = tar.extractfile("package/" + src).read()
                    out = static / dst
                    out.parent.mkdir(parents=True, exist_ok=True)
                    part = out.with_name(out.name + ".part")
                    part.write_bytes(data)
                    os.replace(part, out)
    # Written last, so an interrupted install is noticed next time.
    (static / "version.built").write_text(_visdom_version())
    say(f"installed {len(todo)} files into {static}")


def default_env_path():
    """Where visdom saves envs unless --env_path says otherwise (~/.visdom/): it outlives the server,
    so a restarted one shows the runs it had (the dashboard client asks it to save each run's env)."""
    return os.path.join(os.path.expanduser("~"), ".visdom")


def serve(port=DEFAULT_PORT, hostname=DEFAULT_HOSTNAME, env_path=None):
    """Run the visdom server in this process until interrupted (no downloads)."""
    # Application + listen() is what visdom.server.run_server.start_server does,
    # minus its bind choice: it listens on every interface unless -bind_local,
    # and then only on 127.0.0.1. Here the socket is bound to `hostname` itself.
    from tornado import ioloop, web
    from visdom.server import app as visdom_app

    class StaticFiles(web.StaticFileHandler):
        # visdom's index.html has static_url("../user/style.css"). Since tornado 6.6,
        # versioning a path outside static/ raises 403, which turns GET / itself into
        # a 403. Such a path gets no ?v= hash here; the browser then asks /user/style.css,
        # which visdom's UserSettingsHandler serves.
        @classmethod
        def make_static_url(cls, settings, path, include_version=True):
            return super().make_static_url(settings, path,
                                           include_version and not path.startswith("../"))

    visdom_app.tornado_settings["static_handler_class"] = StaticFiles
    env_path = env_path or default_env_path()
    app = visdom_app.Application(port=port, env_path=env_path)
    app.listen(port, address=hostname, max_buffer_size=1024**3)
    print(f"visdom dashboard at http://{hostname}:{port}/  (env_path {os.path.abspath(env_path)})",
          flush=True)
    ioloop.IOLoop.current().start()


def start_server(port, host="127.0.0.1", env_path=None):
    """Start `python visdom_server.py` in a subprocess; output goes to proc.log_path."""
    log = tempfile.NamedTemporaryFile(prefix="visdom_server_", suffix=".log", delete=False)
    cmd = [sys.executable, os.path.abspath(__file__), "--port", str(port), "--hostname", host]
    if env_path is not None:
        cmd += ["--env_path", str(env_path)]
    # A file, not a pipe: tornado logs each request and a full pipe would block the server.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    proc.log_path = log.name
    return proc


def wait_until_up(port, timeout=15.0, host="127.0.0.1", proc=None):
    """Poll GET / until it answers 200; raise RuntimeError on timeout or if proc exits."""
    url = f"http://{host}:{port}/"
    deadline = time.monotonic() + timeout
    while not answering(port, host):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"visdom server exited with {proc.returncode}:\n{_log_tail(proc)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"visdom server not up at {url} after {timeout}s\n{_log_tail(proc)}")
        time.sleep(0.1)
    return url


def answering(port, host="127.0.0.1"):
    """True when something on host:port answers GET / with 200 (a dashboard is up)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def start_background(port, hostname, env_path=None, log_dir=".cache"):
    """A server that outlives this command (its own session; output in <log_dir>/visdom_<port>.log),
    started unless one answers on the port already; says where to open it."""
    url = f"http://{hostname}:{port}"
    runs = f"each run's panels at {url}/env/<its --version>"  # the front page is the empty 'main' env
    if answering(port, hostname):
        print(f"dashboard: already running at {url} ({runs})")
        return
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"visdom_{port}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--port", str(port), "--hostname", hostname]
    if env_path is not None:
        cmd += ["--env_path", str(env_path)]
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # Ctrl-C in this terminal leaves it running
    proc.log_path = log_path
    try:
        wait_until_up(port, timeout=30, host=hostname, proc=proc)
    except RuntimeError as e:
        raise UserError(f"the dashboard server did not start on {hostname}:{port} "
                        f"({str(e).splitlines()[0]}); see {log_path}") from None
    print(f"dashboard: started at {url} (pid {proc.pid}, log {log_path}; stop it with kill {proc.pid}); "
          f"{runs}, saved in {os.path.abspath(env_path or default_env_path())}")


def stop_server(proc, timeout=5.0):
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if getattr(proc, "log_path", None):
        Path(proc.log_path).unlink(missing_ok=True)


def _log_tail(proc, n=2000):
    path = getattr(proc, "log_path", None)
    return Path(path).read_text(errors="replace")[-n:] if path and os.path.exists(path) else ""


def port_number(text):
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1 to 65535)")
    return int(text)


def main(argv=None):
    """Install the front end (--install_static), or serve the dashboard until interrupted."""
    p = Parser(prog="visdom_server.py", description="Offline visdom dashboard server.")
    p.add_argument("--install_static", action="store_true",
                   help="install visdom's front-end files from the npm registry, then exit")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT)
    p.add_argument("--hostname", default=DEFAULT_HOSTNAME,
                   help="address to bind (default localhost; 0.0.0.0 exposes it to the network)")
    p.add_argument("--env_path", default=None,
                   help="where visdom saves each run's panels, loaded again when the server restarts "
                        "(default ~/.visdom/)")
    p.add_argument("--background", action="store_true",
                   help="start the server in the background and return, unless one answers already")
    args = p.parse_args(argv)

    if args.install_static:
        install_static()
        return
    if missing_static():
        # Serving half the page would look like a broken dashboard; fetch instead when possible.
        if not npm_available():
            raise UserError("visdom static files are missing and npm is not available; "
                            "run `python visdom_server.py --install_static` on a machine with npm")
        print("visdom static files missing; installing them first (--install_static)")
        install_static()
    if args.background:
        start_background(args.port, args.hostname, args.env_path)
        return
    # The server process never touches tensors; blocking torch saves ~2 s of startup
    # (visdom/__init__.py imports it only to recognise torch.Tensor arguments).
    sys.modules.setdefault("torch", None)
    try:
        serve(args.port, args.hostname, args.env_path)
    except KeyboardInterrupt:
        pass
    except OSError as e:  # the port is taken, or --hostname is no address of this machine
        raise UserError(f"cannot listen on {args.hostname}:{args.port} ({e.strerror or e}); pass another "
                        f"--port (or stop what uses it) or a --hostname of this machine") from None


if __name__ == "__main__":
    run("visdom_server.py", main)
