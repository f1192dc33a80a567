"""Generator files saved by the seed repositories open through checkpoint.load_models and draw what
their own code draws.

The reference below restates their modules (heykeetae/Self-Attention-GAN's sagan_models.py and
spectral.py; houze-liu/Attention-Visualization-GAN's modules.py, self_attention.py and spectral.py):
the same module tree, so state_dict() gives their key names and shapes, and the same forward,
including the power iteration their SpectralNorm runs on every call. Weights are random.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch import nn

import explorer
import visualize_attn
from checkpoint import CheckpointError, load_checkpoint, load_generator, load_models
from cli import run
from sagan_models import Generator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
HEYKEETAE, HOUZE = "heykeetae/Self-Attention-GAN", "houze-liu/Attention-Visualization-GAN"


# ----------------------------------------------------------------------------- their modules, restated

def l2normalize(v, eps=1e-12):
    return v / (v.norm() + eps)


class SpectralNorm(nn.Module):
    """Their spectral.py: u, v, w_bar as parameters of the wrapped module; every forward runs one
    power iteration on w_bar.view(w_bar.shape[0], -1) and sets module.weight = w_bar / sigma."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        w = module.weight
        height = w.shape[0]
        width = w.view(height, -1).shape[1]
        u = nn.Parameter(l2normalize(w.data.new(height).normal_(0, 1)), requires_grad=False)
        v = nn.Parameter(l2normalize(w.data.new(width).normal_(0, 1)), requires_grad=False)
        w_bar = nn.Parameter(w.data)
        del module._parameters["weight"]
        module.register_parameter("weight_u", u)
        module.register_parameter("weight_v", v)
        module.register_parameter("weight_bar", w_bar)

    def forward(self, *args):
        u, v, w = self.module.weight_u, self.module.weight_v, self.module.weight_bar
        height = w.data.shape[0]
        v.data = l2normalize(torch.mv(torch.t(w.view(height, -1).data), u.data))
        u.data = l2normalize(torch.mv(w.view(height, -1).data, v.data))
        sigma = u.dot(w.view(height, -1).mv(v))
        setattr(self.module, "weight", w / sigma.expand_as(w))
        return self.module.forward(*args)


class SelfAttn(nn.Module):
    """heykeetae's Self_Attn, houze's SelfAttention: the same layers and formula (houze keeps the
    map in a watch list instead of returning it)."""

    def __init__(self, in_dim):
        super().__init__()
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, 1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, 1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        m_batchsize, C, width, height = x.size()
        proj_query = self.query_conv(x).view(m_batchsize, -1, width * height).permute(0, 2, 1)
        proj_key = self.key_conv(x).view(m_batchsize, -1, width * height)
        attention = torch.softmax(torch.bmm(proj_query, proj_key), dim=-1)
        proj_value = self.value_conv(x).view(m_batchsize, -1, width * height)
        out = torch.bmm(proj_value, attention.permute(0, 2, 1)).view(m_batchsize, C, width, height)
        return self.gamma * out + x, attention


def up(c_in, c_out, *stride_pad):
    return [SpectralNorm(nn.ConvTranspose2d(c_in, c_out, 4, *stride_pad)), nn.BatchNorm2d(c_out), nn.ReLU()]


class HeykeetaeG(nn.Module):
    """heykeetae's Generator: l1..l4, attn1 (128 channels) after l3, attn2 (64) after l4, last."""

    def __init__(self, image_size=64, z_dim=100, conv_dim=64):
        super().__init__()
        mult = 2 ** (int(torch.log2(torch.tensor(image_size)).item()) - 3)
        curr = conv_dim * mult
        self.l1 = nn.Sequential(*up(z_dim, curr))
        self.l2 = nn.Sequential(*up(curr, curr // 2, 2, 1))
        self.l3 = nn.Sequential(*up(curr // 2, curr // 4, 2, 1))
        curr //= 4
        if image_size == 64:
            self.l4 = nn.Sequential(*up(curr, curr // 2, 2, 1))
            curr //= 2
        self.last = nn.Sequential(nn.ConvTranspose2d(curr, 3, 4, 2, 1), nn.Tanh())
        self.attn1 = SelfAttn(128)
        self.attn2 = SelfAttn(64)

    def forward(self, z):
        out = self.l3(self.l2(self.l1(z.view(z.size(0), z.size(1), 1, 1))))
        out, p1 = self.attn1(out)
        out, p2 = self.attn2(self.l4(out))
        return self.last(out), p1, p2


class WatchedAttn(SelfAttn):
    """houze's SelfAttention, which sits in an nn.Sequential: returns the output, keeps the map."""

    def forward(self, x):
        out, self.attention = super().forward(x)
        return out


class HouzeG(nn.Module):
    """houze's Generator: one Sequential `main`, attention where the width reaches 128 and 64, also
    kept as the attributes attn2 and attn1 (so the state dict holds them twice)."""

    def __init__(self, image_size=64, z_dim=100, conv_dim=64):
        super().__init__()
        repeat_num = int(torch.log2(torch.tensor(image_size)).item()) - 3
        curr = conv_dim * 2 ** repeat_num
        layers = up(z_dim, curr)
        for _ in range(repeat_num):
            layers += up(curr, curr // 2, 2, 1)
            curr //= 2
            if curr == 64:
                self.attn1 = WatchedAttn(64)
                layers.append(self.attn1)
            if curr == 128:
                self.attn2 = WatchedAttn(128)
                layers.append(self.attn2)
        layers += [nn.ConvTranspose2d(curr, 3, 4, 2, 1), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z):
        out = self.main(z.view(z.size(0), z.size(1), 1, 1))
        return out, self.attn2.attention, self.attn1.attention


def heykeetae_d(conv_dim=64):
    """The first layers of heykeetae's Discriminator: what its '<step>_D.pth' starts with."""
    return nn.ModuleDict({"l1": nn.Sequential(SpectralNorm(nn.Conv2d(3, conv_dim, 4, 2, 1)), nn.LeakyReLU(0.1)),
                          "attn1": SelfAttn(256)})


def randomized(net, seed):
    """`net` with random weights and BatchNorm statistics, attention switched on (gamma != 0), eval."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(1000)
            if isinstance(m, SelfAttn):
                m.gamma.uniform_(0.5, 1.5)
                m.query_conv.weight.mul_(30), m.key_conv.weight.mul_(30)  # peaked maps, not uniform ones
            if hasattr(m, "weight_bar"):
                m.weight_bar.mul_(3)
    return net.eval()


SOURCES = {HEYKEETAE: (HeykeetaeG, "{}_G.pth"), HOUZE: (HouzeG, "{}-G.ckpt")}


def seed_file(tmp_path, source, z_dim=100, step=1000, seed=0, image_size=64):
    """(their generator, path of its state dict saved as their trainer saves it)."""
    cls, name = SOURCES[source]
    net = randomized(cls(image_size, z_dim), seed)
    path = tmp_path / name.format(step)
    torch.save(net.state_dict(), path)
    return net, path


# ----------------------------------------------------------------------------- the tests

def test_the_restated_modules_have_their_key_names_and_shapes(tmp_path):
    """Pins the reference to their code: names written out from their sagan_models.py / modules.py."""
    hk = {k: tuple(v.shape) for k, v in HeykeetaeG(64, 100).state_dict().items()}
    assert {k: hk.get(k) for k in ("l1.0.module.weight_bar", "l1.0.module.weight_u", "l1.0.module.weight_v",
                                   "l1.0.module.bias", "l1.1.running_var", "l4.0.module.weight_bar",
                                   "attn1.query_conv.weight", "attn2.value_conv.weight", "attn2.gamma",
                                   "last.0.weight")} == {
        "l1.0.module.weight_bar": (100, 512, 4, 4), "l1.0.module.weight_u": (100,),
        "l1.0.module.weight_v": (512 * 16,), "l1.0.module.bias": (512,), "l1.1.running_var": (512,),
        "l4.0.module.weight_bar": (128, 64, 4, 4), "attn1.query_conv.weight": (16, 128, 1, 1),
        "attn2.value_conv.weight": (64, 64, 1, 1), "attn2.gamma": (1,), "last.0.weight": (64, 3, 4, 4)}
    assert len(hk) == 4 * (4 + 5) + 2 * 7 + 2  # 4 SN convs + BNs, 2 attention layers, the output conv
    hz = {k: tuple(v.shape) for k, v in HouzeG(64, 128).state_dict().items()}
    assert {k: hz.get(k) for k in ("main.0.module.weight_bar", "main.9.query_conv.weight",
                                   "attn2.query_conv.weight", "main.13.gamma", "attn1.key_conv.weight",
                                   "main.14.weight")} == {
        "main.0.module.weight_bar": (128, 512, 4, 4), "main.9.query_conv.weight": (16, 128, 1, 1),
        "attn2.query_conv.weight": (16, 128, 1, 1), "main.13.gamma": (1,), "attn1.key_conv.weight": (8, 64, 1, 1),
        "main.14.weight": (64, 3, 4, 4)}
    assert len(hz) == len(hk) + 2 * 7  # the same tensors, plus the attention layers' second names


@pytest.mark.parametrize("source,z_dim", [(HEYKEETAE, 100), (HEYKEETAE, 128), (HOUZE, 128), (HOUZE, 100)])
def test_their_generator_draws_the_same_images_and_maps_for_the_same_z(tmp_path, source, z_dim):
    theirs, path = seed_file(tmp_path, source, z_dim)
    m = load_models(str(path), verbose=False)
    assert (m.step, m.source, m.D, m.generator) == (1000, source, None, f"G of {source}")
    assert m.G.model_args() == dict(image_size=64, z_dim=z_dim, conv_dim=64, attn_res=[16, 32],
                                    spectral_norm=False)
    z = torch.randn(6, z_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, p16, p32 = theirs(z)  # their first forward after loading: one power iteration from the stored u
        img, maps = m.G(z, return_attn=True)
    assert (ref.abs() > 0.99).float().mean() < 0.2 and ref.std() > 0.1  # images, not saturated noise
    assert (img - ref).abs().max() < 1e-3
    assert (maps[16] - p16).abs().max() < 1e-4 and (maps[32] - p32).abs().max() < 1e-4
    assert p32.max() > 20 / 1024  # the maps are peaked, so their placement is checked


def test_other_savings_of_the_same_generator_open_too(tmp_path):
    """nn.DataParallel's 'module.' prefix (heykeetae --parallel), and a file of PyTorch < 0.4.1:
    the legacy serialization and no BatchNorm num_batches_tracked."""
    theirs, _ = seed_file(tmp_path, HEYKEETAE)
    state = theirs.state_dict()
    z = torch.randn(3, 100)
    parallel = tmp_path / "parallel_G.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, parallel)
    old = tmp_path / "old_G.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, old,
               _use_new_zipfile_serialization=False)
    with torch.no_grad():
        ref = theirs(z)[0]
        for path in (parallel, old):
            G = load_generator(str(path), verbose=False)
            assert (G(z) - ref).abs().max() < 1e-3, path


def test_the_cli_draws_a_seed_file(tmp_path):
    _, path = seed_file(tmp_path, HEYKEETAE)
    out = tmp_path / "x.png"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "visualize_attn.py"), "--checkpoint", str(path),
                        "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"the generator of {HEYKEETAE} (z_dim 100" in r.stdout
    assert "64px generator at step 1000, z_dim 100, weights of the G of heykeetae" in r.stdout
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] >= 200
    # and houze's through the same main(), in this process
    _, path = seed_file(tmp_path, HOUZE, z_dim=128, step=4000)
    visualize_attn.main(["--checkpoint", str(path), "--view", "layers", "--out", str(tmp_path / "h.png")])
    assert (tmp_path / "h.png").is_file()


def test_the_page_film_and_interventions_work_on_a_seed_file(tmp_path, capsys):
    _, path = seed_file(tmp_path, HEYKEETAE)
    page, film = tmp_path / "page.html", tmp_path / "film.png"
    for argv in (["--view", "html", "--seeds", "0-1", "--out", page],
                 ["--view", "film", "--out", film],
                 ["--view", "intervene", "--out", tmp_path / "i.png"],
                 ["--table", "--json", "--table_images", "2", "--table_queries", "4"]):
        visualize_attn.main(["--checkpoint", str(path), *map(str, argv)])
    assert "G16" in page.read_text() and "G32" in page.read_text()
    with Image.open(film.with_suffix(".gif")) as gif:
        assert gif.n_frames == 1  # one file, not a run: a film of one frame
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["layer"] for r in rows] == ["G16", "G32"] and all("ablation_delta" in r for r in rows)


def test_the_notebook_opens_a_seed_file(tmp_path, monkeypatch, capsys):
    """The notebook's opening cell (the one that picks and loads the checkpoint) on a seed file:
    with_d=None shows D's layers only where the file has a D."""
    import nbformat

    _, path = seed_file(tmp_path, HOUZE, z_dim=128, step=4000)
    monkeypatch.setenv("SAGAN_CHECKPOINT", str(path))
    nb = nbformat.read(os.path.join(ROOT, "visualize_attn.ipynb"), as_version=4)
    first = next(c.source for c in nb.cells if c.cell_type == "code")
    scope = {}
    exec(first, scope)
    assert scope["ex"].D is None and sorted(scope["ex"].layers) == ["G16", "G32"]
    assert f"weights of the G of {HOUZE}" in capsys.readouterr().out


def malformed(tmp_path):
    """{case: (path, what the one-line error must say)}."""
    theirs, _ = seed_file(tmp_path, HEYKEETAE)
    state = theirs.state_dict()

    def save(name, sd):
        torch.save(sd, tmp_path / name)
        return tmp_path / name

    missing = {k: v for k, v in state.items() if k != "attn1.gamma"}
    wrong = dict(state, **{"l2.0.module.weight_bar": torch.zeros(512, 128, 4, 4)})
    (tmp_path / "128").mkdir(exist_ok=True)
    _, big = seed_file(tmp_path / "128", HOUZE, image_size=128, step=7)
    d = randomized(heykeetae_d(), 0)
    houze_d = nn.Sequential(SpectralNorm(nn.Conv2d(3, 64, 4, 2, 1)), nn.BatchNorm2d(64))
    pixelwise = {k.replace("attn1.query_conv", "attn1.f_"): v for k, v in state.items()}
    return {
        "missing": (save("1_G.pth", missing), f"nor the 64px generator of {HEYKEETAE} it resembles "
                                              f"(z_dim 100; missing attn1.gamma)"),
        "wrong shape": (save("2_G.pth", wrong), "shape l2.0.module.weight_bar (512, 128, 4, 4) "
                                                "(expected (512, 256, 4, 4))"),
        "128px": (big, "(main.0.module.weight_bar has shape (100, 1024, 4, 4): 1024 channels at 4x4, "
                "where the 64px, conv_dim 64 generator has 512: another image size or conv_dim)"),
        "D": (save("3_D.pth", d.state_dict()), "it is the discriminator (l1.0.module.weight_bar takes 3-channel"),
        "houze D": (save("3-D.ckpt", {f"main.{k}": v for k, v in houze_d.state_dict().items()}),
                    "it is the discriminator (main.0.module.weight_bar"),
        # heykeetae's first version: a pixel-wise attention with layers f_, g_, h_
        "early attention": (save("4_G.pth", pixelwise), "missing attn1.query_conv.weight, attn1.query_conv.bias; "
                                                        "unexpected attn1.f_.weight, attn1.f_.bias"),
        "unknown": (save("5_G.pth", {"conv.weight": torch.zeros(3)}),
                    "nor a seed repository's generator (found a state dict of 1 tensors: conv.weight)"),
    }


def test_anything_else_is_a_one_line_error_naming_what_was_found(tmp_path):
    supported = (f"supported: this project's checkpoints and the 64px, conv_dim 64 generators '<step>_G.pth' "
                 f"of {HEYKEETAE} and '<step>-G.ckpt' of {HOUZE}")
    for case, (path, expected) in malformed(tmp_path).items():
        with pytest.raises(CheckpointError) as e:
            load_models(str(path), verbose=False)
        message = str(e.value)
        assert str(path) in message and "not a checkpoint of this project" in message, (case, message)
        assert expected in message and "\n" not in message, (case, message)
        assert case.endswith("D") or supported in message, (case, message)
    # through the CLI: the same line, exit code 1
    path, expected = malformed(tmp_path)["128px"]
    with pytest.raises(SystemExit) as e:
        run("visualize_attn.py", visualize_attn.main, ["--checkpoint", str(path), "--out", str(tmp_path / "x.png")])
    assert expected in str(e.value.code) and "\n" not in str(e.value.code)


def test_a_seed_file_has_no_d_and_cannot_be_resumed(tmp_path):
    _, path = seed_file(tmp_path, HOUZE)
    with pytest.raises(CheckpointError, match=f"is a generator saved by {HOUZE} and holds no discriminator"):
        load_models(str(path), with_d=True)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project .* cannot be resumed or exported"):
        load_checkpoint(str(path))
    with pytest.raises(CheckpointError, match="cannot be resumed or exported"):
        explorer.export_models(str(path), str(tmp_path / "small.pt"))


def test_the_trained_architecture_is_unchanged():
    """spectral_norm is an argument only a loaded seed generator turns off; the default model_args
    (what every saved checkpoint holds) gain no key."""
    G = Generator(64, 100)
    assert G.model_args() == dict(image_size=64, z_dim=100, conv_dim=64, attn_res=[16, 32])
    assert sum(k.endswith("parametrizations.weight.original") for k in G.state_dict()) == 4 + 6 + 1
    plain = Generator(**dict(G.model_args(), spectral_norm=False))
    assert not any("parametrizations" in k for k in plain.state_dict())
    assert Generator(**plain.model_args()).model_args() == plain.model_args()
