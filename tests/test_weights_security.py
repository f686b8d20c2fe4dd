"""Weights files are data: nothing in them runs, cached library files are used offline, and a file that is
not a fitting checkpoint is a one-line `MamFusionError` naming the file and the backbone."""

from __future__ import annotations

import json
import os
import socket
import zipfile
from pathlib import Path

import pytest
import torch

from models.backbones import WeightsFileError, build_backbone
from models.text_backbones import load_text_encoder
from storage.errors import MamFusionError


class _RunsCommand:
    """Unpickling this runs `touch <marker>`: what a crafted weights file would do with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _lite0_state(seed: int = 1) -> dict[str, torch.Tensor]:
    return build_backbone("efficientnet_lite0", f"random:{seed}").trunk.net.state_dict()


def _one_line_user_error(err: pytest.ExceptionInfo[WeightsFileError], *needles: str) -> str:
    message = str(err.value)
    assert isinstance(err.value, MamFusionError)
    assert "\n" not in message and len(message) < 600
    for needle in needles:
        assert needle in message, (needle, message)
    return message


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
@pytest.mark.parametrize("beside_weights", [False, True], ids=["alone", "beside-model_state"])
def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path: Path, legacy: bool, beside_weights: bool) -> None:
    marker = tmp_path / "MARKER"
    payload: object = _RunsCommand(marker)
    if beside_weights:  # a real-looking checkpoint with the payload where the config would be
        payload = {"model_state": _lite0_state(), "cfg": payload, "epoch": 3}
    path = tmp_path / "evil.pth"
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(WeightsFileError) as err:
        build_backbone("efficientnet_lite0", str(path))
    assert not marker.exists()
    _one_line_user_error(err, "efficientnet_lite0", str(path), "posix.system", "not loaded")


def test_a_crafted_pyth_for_i3d_and_a_planted_cache_file_run_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "MARKER"
    evil = tmp_path / "I3D_8x8_R50.pyth"
    torch.save({"model_state": {}, "cfg": _RunsCommand(marker)}, evil)
    with pytest.raises(WeightsFileError) as err:
        build_backbone("i3d_r50", str(evil), channels_last=False)
    _one_line_user_error(err, "i3d_r50", str(evil), "posix.system")
    # The library's default path reads the torch hub cache: a file planted there is no more trusted.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(_RunsCommand(marker), cache / "resnet152-f82ba261.pth")
    with pytest.raises(WeightsFileError) as err:
        build_backbone("resnet152", crop=32)
    _one_line_user_error(err, "resnet152", "resnet152-f82ba261.pth", "posix.system")
    assert not marker.exists()


def _block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("offline_flag", [False, True], ids=["online-env", "HF_HUB_OFFLINE"])
def test_i3d_default_weights_in_the_hub_cache_load_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_flag: bool
) -> None:
    from fvcore.common.config import CfgNode
    from pytorchvideo.models.hub import i3d_r50

    torch.manual_seed(7)
    source = i3d_r50(pretrained=False)
    cfg = CfgNode(
        {"MODEL": CfgNode({"ARCH": "i3d", "NUM_CLASSES": 400}), "DATA": CfgNode({"MEAN": [0.45] * 3})}
    )
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    # The layout of a PySlowFast/pytorchvideo training checkpoint: weights plus a pickled yacs config.
    torch.save(
        {"epoch": 196, "model_state": source.state_dict(), "optimizer_state": None, "cfg": cfg},
        cache / "I3D_8x8_R50.pyth",
    )
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    if offline_flag:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    _block_network(monkeypatch)
    loaded = build_backbone("i3d_r50", channels_last=False)
    expected = source.blocks[0].conv.weight
    torch.testing.assert_close(loaded.trunk[0].conv.weight, expected)
    torch.testing.assert_close(
        loaded.trunk[4].res_blocks[0].branch2.conv_a.weight,
        source.blocks[4].res_blocks[0].branch2.conv_a.weight,
    )


def test_files_that_are_not_checkpoints_name_the_file_and_backbone(tmp_path: Path) -> None:
    good = tmp_path / "good.pth"
    torch.save(_lite0_state(), good)
    data = good.read_bytes()
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("readme.txt", "not weights")
    listing = tmp_path / "list.pth"
    torch.save(["a", "list"], listing)
    cases = {
        text: "not a PyTorch checkpoint",
        truncated: "cannot be read as a PyTorch checkpoint",
        empty: "is empty",
        other_zip: "cannot be read as a PyTorch checkpoint",
        listing: "not a state dict",
        tmp_path: "is a directory",
    }
    if Path("/etc/passwd").is_file():
        cases[Path("/etc/passwd")] = "not a PyTorch checkpoint"
    for path, why in cases.items():
        with pytest.raises(WeightsFileError) as err:
            build_backbone("efficientnet_lite0", str(path))
        _one_line_user_error(err, "efficientnet_lite0", str(path), why, "--weights efficientnet_lite0=PATH")


def test_a_state_dict_of_the_wrong_network_names_the_mismatched_keys(tmp_path: Path) -> None:
    state = _lite0_state()
    del state["_bn0.running_var"]
    state["_conv_stem.weight"] = torch.zeros(8, 3, 3, 3)  # the network has 32 stem filters
    state["module.extra.weight"] = torch.zeros(1)
    path = tmp_path / "other.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(WeightsFileError) as err:
        build_backbone("efficientnet_lite0", str(path))
    _one_line_user_error(
        err,
        str(path),
        "does not fit the efficientnet_lite0 network",
        "1 missing keys (_bn0.running_var)",
        "1 unexpected keys (module.extra.weight)",
        "_conv_stem.weight: file (8, 3, 3, 3) vs network (32, 3, 3, 3)",
    )
    torch.save({"_conv_stem.weight": "not a tensor"}, path)
    with pytest.raises(WeightsFileError) as err:
        build_backbone("efficientnet_lite0", str(path))
    _one_line_user_error(err, "'_conv_stem.weight' (str)", "not tensors")
    with pytest.raises(WeightsFileError, match="whole number"):
        build_backbone("efficientnet_lite0", "random:abc")


def test_a_matching_file_still_loads_exactly(tmp_path: Path) -> None:
    from yacs.config import CfgNode

    state = _lite0_state(seed=5)
    path = tmp_path / "lite0.pyth"
    torch.save({"model_state": state, "cfg": CfgNode({"TRAIN": CfgNode({"LR": 0.1})})}, path)
    loaded = build_backbone("efficientnet_lite0", str(path)).trunk.net.state_dict()
    torch.testing.assert_close(loaded, state)


def _tiny_bert_dir(path: Path) -> Path:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    )
    BertModel(config).save_pretrained(path)
    return path


def test_text_weights_never_unpickle_or_run_directory_code(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    pickled = tmp_path / "pickled"
    _tiny_bert_dir(pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(_RunsCommand(marker), pickled / "pytorch_model.bin")
    with pytest.raises(WeightsFileError) as err:
        load_text_encoder("roberta-base", str(pickled))
    _one_line_user_error(err, str(pickled), "no *.safetensors", "pytorch_model.bin")

    remote = _tiny_bert_dir(tmp_path / "remote")
    config = json.loads((remote / "config.json").read_text())
    config |= {"model_type": "evil", "auto_map": {"AutoConfig": "evil.Cfg", "AutoModel": "evil.Model"}}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    with pytest.raises(WeightsFileError) as err:
        load_text_encoder("roberta-base", str(remote))
    _one_line_user_error(err, str(remote), "cannot be loaded")
    assert not marker.exists()
