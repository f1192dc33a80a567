"""The run's one config: built once from the flags, frozen, saved alike in config.json and the
checkpoint, read back from today's files and older ones."""
import dataclasses
import json

import pytest

from config import TrainConfig, load_config
from conftest import ROOT, SMOKE, metrics, run_main
from main import build_parser, parse_args
from sagan_models import Discriminator, Generator


def test_the_config_is_resolved_once_and_frozen():
    config = parse_args([*SMOKE, "--center_crop", "80", "--image_path", "a", "b"])
    # 'auto' attention placement and the one crop for both folders are concrete values now
    assert config.g_attn == (8, 16) and config.d_attn == (8, 4) and config.center_crop == (80, 80)
    assert config.folders() == [("a", 80), ("b", 80)] and config.world_size == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.imsize = 64


def test_every_field_but_the_resolved_ones_is_a_flag_and_the_defaults_are_the_fields():
    flags = vars(build_parser().parse_args([]))
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert set(fields) - set(flags) == {"world_size", "precision_reason"}  # decided at start-up, not by a flag
    assert {name: flags[name] for name in flags} == {name: fields[name] for name in flags}


def test_model_args_build_the_networks_the_config_names():
    config = parse_args([*SMOKE, "--g_attn", "16", "--d_attn", "none"])
    args = config.model_args()
    assert Generator(**args["G"]).model_args() == args["G"] == dict(image_size=32, z_dim=16, conv_dim=8,
                                                                   attn_res=[16])
    assert Discriminator(**args["D"]).model_args() == args["D"]
    stored = dict(G=dict(args["G"], attn_res=[8, 16]), D=args["D"])
    assert config.arch_differences(stored) == {"g_attn": ([8, 16], [16])}


def test_config_json_and_checkpoint_hold_the_same_config_and_load_back(tmp_path):
    import torch
    run_main(tmp_path, "--version", "c")
    run = tmp_path / "models" / "c"
    saved = json.loads((run / "config.json").read_text())
    assert torch.load(run / "latest.pt", weights_only=True)["config"] == saved
    again = parse_args([*SMOKE, "--version", "c", "--model_save_path", str(tmp_path / "models"),
                        "--sample_path", str(tmp_path / "samples")])
    # --precision auto is decided again at every start (a probe: its measured ratio differs run to run)
    again = dataclasses.replace(again, precision=saved["precision"], precision_reason=saved["precision_reason"])
    assert load_config(str(run / "config.json")) == load_config(saved) == again
    assert [r["step"] for r in metrics(run)] == [1, 2]


def test_older_files_load_with_defaults_for_what_they_lack():
    import torch
    shipped = torch.load(ROOT / "assets" / "showcase_celeba64.pt", weights_only=True)["config"]
    config = load_config(shipped)
    assert config.imsize == 64 and config.center_crop == (160, 80)
    assert config.crop_for(shipped["image_path"][1]) == 80
    # a single folder and crop (before --image_path took several), no world_size or ema fields,
    # and a key this version does not know
    old = load_config({"imsize": 32, "image_path": "data/celebA", "center_crop": 140, "g_attn": [16],
                       "retired_flag": 1})
    assert old.folders() == [("data/celebA", 140)] and old.crop_for("elsewhere") == 140
    assert old.g_attn == (16,) and old.d_attn == (8, 4) and old.world_size == 1 and old.ema_decay == 0.999
    assert load_config({}) == TrainConfig.from_flags(dataclasses.asdict(TrainConfig()))  # a seed file
    assert TrainConfig.from_flags(dataclasses.asdict(TrainConfig()), world_size=4).world_size == 4
