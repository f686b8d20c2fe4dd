"""Official checkpoint compatibility: every key/shape of official_checkpoint_keys.tsv loads; param counts."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointError, load_official_checkpoint
from models.mamfusion import MamFusion

SHARED = Path(os.environ.get("MAMFUSION_SHARED", Path(__file__).resolve().parents[2] / "shared"))
TSV = SHARED / "official_checkpoint_keys.tsv"
DEAD_CONV_PARAMS = 2 * (15680 * 5 + 15680)


@pytest.fixture(scope="module")
def official_shapes() -> dict[str, tuple[int, ...]]:
    if not TSV.is_file():
        pytest.skip(f"{TSV} not found")
    shapes = {}
    for line in TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        shapes[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return shapes


@pytest.fixture(scope="module")
def tvr_model() -> MamFusion:
    return MamFusion.from_preset("tvr")


def random_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_state_dict_keys_equal_official_minus_dead_conv(official_shapes, tvr_model) -> None:
    ours = {k: tuple(v.shape) for k, v in tvr_model.state_dict().items()}
    dead = {k for k in official_shapes if ".vid_embed_proj." in k}
    assert len(dead) == 4
    assert ours == {k: s for k, s in official_shapes.items() if k not in dead}


def test_every_parameter_is_loaded_from_its_source(official_shapes, tvr_model, caplog) -> None:
    state = random_state(official_shapes)
    with caplog.at_level(logging.INFO, logger="models.checkpoint"):
        load_official_checkpoint(tvr_model, state)
    assert "vid_embed_proj" in caplog.text
    for name, tensor in tvr_model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_loads_from_a_file_and_from_the_official_ckpt_layout(official_shapes, tvr_model, tmp_path) -> None:
    state = random_state(official_shapes)
    path = tmp_path / "official.ckpt"
    torch.save({"epoch": 3, "state_dict": state}, path)
    load_official_checkpoint(tvr_model, path)
    assert torch.equal(tvr_model.query_encoder.self.query.weight, state["query_encoder.self.query.weight"])


def test_refuses_pickled_objects(tmp_path, tvr_model) -> None:
    path = tmp_path / "with_object.ckpt"
    torch.save({"config": argparse.Namespace(a=1), "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_official_checkpoint(tvr_model, path)


def test_mismatches_are_reported_by_key(official_shapes, tvr_model) -> None:
    state = random_state(official_shapes)
    del state["frame_encoder_2_mamba.0.A_log"]
    state["extra.weight"] = torch.zeros(1)
    state["query_input_proj.net.1.weight"] = torch.zeros(384, 1024)
    with pytest.raises(CheckpointError) as err:
        load_official_checkpoint(tvr_model, state)
    message = str(err.value)
    assert "frame_encoder_2_mamba.0.A_log" in message and "extra.weight" in message
    assert "query_input_proj.net.1.weight (384, 1024) != (384, 768)" in message


@pytest.mark.parametrize(
    ("preset", "official_total"),
    [("tvr", 18_372_480), ("activitynet", 16_693_632), ("charades", 17_283_456)],
)
def test_parameter_counts_match_the_official_model(preset: str, official_total: int) -> None:
    model = MamFusion.from_preset(preset)
    assert sum(p.numel() for p in model.parameters()) == official_total - DEAD_CONV_PARAMS
