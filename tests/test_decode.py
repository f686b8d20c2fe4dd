"""Frame sampling with decord: windows, VFR, rotation, padding, odd sizes, corrupt input, PyAV agreement."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from tasks.decode import DecodeError, VideoStream, plan_windows

READABLE = [
    "big_buck_bunny_vp8.webm",
    "carphone_176x144.mp4",
    "eye_makeup_mpeg4.avi",
    "flipping_a_pancake.mkv",
    "rotated_90.mov",
    "v_GGSY1Qvo990.mp4",
    "v_ZNVhz7ctTq0.mp4",
]


def write_vfr_video(path: Path, pts_ms: list[int]) -> None:
    """Frame i is flat grey 10 + 20 i, shown at pts_ms[i]: the pixels tell which frame was sampled."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for i, pts in enumerate(pts_ms):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 + 20 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def all_frames(stream: VideoStream) -> np.ndarray:
    """(W, F, 3, H, W) uint8 for the whole video."""
    return np.concatenate([c.frames for c in stream.chunks(4)])


def pyav_frames(path: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """Start time (from the first frame) and RGB pixels of every frame, decoding everything with PyAV."""
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    # AVI has no presentation timestamps: PyAV passes on the B-frame-reordered packet times, so the k-th frame
    # shown is at the k-th smallest time. Elsewhere the times are already in display order.
    times = np.sort(np.array([f.time for f in frames], dtype=np.float64))
    return times - times[0], [f.to_ndarray(format="rgb24") for f in frames]


def test_plan_windows_maps_times_to_the_frame_on_screen() -> None:
    starts = np.arange(10) / 10.0  # 10 fps, 1 s
    plan = plan_windows(starts, 1.0, window_s=0.25, frames_per_window=1)
    assert plan.indices.ravel().tolist() == [1, 3, 6, 8]  # sample times 0.125, 0.375, 0.625, 0.875
    np.testing.assert_allclose(plan.times, [[0, 0.25], [0.25, 0.5], [0.5, 0.75], [0.75, 1.0]])
    assert plan.padded == 0


def test_plan_windows_segments_and_padding_past_the_end() -> None:
    starts = np.arange(3) / 30.0  # a 0.1 s clip, shorter than one segment
    plan = plan_windows(starts, 0.1, window_s=1.5, frames_per_window=8)
    assert plan.indices.shape == (1, 8)
    assert plan.indices.ravel().tolist() == [2] * 8  # first sample at 0.094 s, the rest repeat the last frame
    assert plan.padded == 7
    np.testing.assert_allclose(plan.times, [[0.0, 0.1]])


def test_plan_windows_partial_last_window_is_clipped_to_duration() -> None:
    plan = plan_windows(np.arange(25) / 10.0, 2.5, window_s=1.0, frames_per_window=2)
    np.testing.assert_allclose(plan.times, [[0, 1], [1, 2], [2, 2.5]])
    assert plan.padded == 1  # the sample at 2.75 s
    with pytest.raises(ValueError, match="window_s"):
        plan_windows(np.zeros(1), 1.0, window_s=0.0, frames_per_window=1)


def test_variable_frame_rate_uses_container_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "vfr.mkv"
    pts = [0, 40, 80, 300, 340, 900, 940, 980, 1500, 1540]
    write_vfr_video(path, pts)
    stream = VideoStream(path, window_s=0.1, frames_per_window=1, short_side=None, crop=None)
    assert stream.info.timestamps == "container"
    expected = [
        max(i for i, p in enumerate(pts) if p <= 100 * k + 50) for k in range(len(stream.plan.indices))
    ]
    assert stream.plan.indices.ravel().tolist() == expected
    grey = all_frames(stream)[:, 0].mean(axis=(1, 2, 3))
    np.testing.assert_allclose(grey, [10 + 20 * i for i in expected], atol=3)


def test_rotation_metadata_gives_upright_frames(realdata: Path) -> None:
    path = realdata / "videos" / "rotated_90.mov"
    stream = VideoStream(path, window_s=0.03, frames_per_window=1, short_side=None, crop=None)
    assert (stream.info.width, stream.info.height) == (320, 568)
    frames = all_frames(stream)[:, 0].transpose(0, 2, 3, 1)  # (W, H, W, 3)
    with av.open(str(path)) as container:
        raw = next(container.decode(video=0))
        assert raw.rotation == -90  # the container asks for a 90° clockwise turn
        upright = np.rot90(raw.to_ndarray(format="rgb24"), k=-1)
    assert frames.shape[1:] == upright.shape == (568, 320, 3)
    assert np.abs(frames[0].astype(int) - upright).mean() < 2


def test_resize_and_crop_for_the_backbone(realdata: Path) -> None:
    stream = VideoStream(realdata / "videos" / "carphone_176x144.mp4", window_s=0.5, frames_per_window=2)
    chunks = list(stream.chunks(3))
    assert [len(c.frames) for c in chunks] == [3, 3, 3]  # bounded chunks: 9 windows of a 4 s video
    assert chunks[0].frames.shape[1:] == (2, 3, 224, 224) and chunks[0].frames.dtype == np.uint8
    assert stream.frames_decoded == len(np.unique(stream.plan.indices))
    whole = VideoStream(realdata / "videos" / "carphone_176x144.mp4", window_s=0.5, frames_per_window=2)
    np.testing.assert_array_equal(np.concatenate([c.frames for c in chunks]), all_frames(whole))


@pytest.mark.parametrize("name", READABLE)
def test_decord_sampling_agrees_with_pyav(realdata: Path, name: str) -> None:
    path = realdata / "videos" / name
    stream = VideoStream(path, window_s=0.5, frames_per_window=1, short_side=None, crop=None)
    times, pixels = pyav_frames(path)
    assert stream.info.n_frames == len(pixels)
    reference = plan_windows(times, stream.info.duration, 0.5, 1)
    np.testing.assert_array_equal(stream.plan.indices, reference.indices)
    assert abs(stream.info.duration - (times[-1] + 1 / stream.info.fps)) < 1e-3
    decoded = all_frames(stream)[:, 0].transpose(0, 2, 3, 1)
    for frame, index in zip(decoded, stream.plan.indices[:, 0], strict=True):
        expected = pixels[index] if name != "rotated_90.mov" else np.rot90(pixels[index], k=-1)
        assert np.abs(frame.astype(int) - expected).mean() < 3, f"{name} frame {index} differs from PyAV"


def test_corrupt_video_raises_a_typed_error(realdata: Path) -> None:
    path = realdata / "videos" / "corrupted.mp4"
    stream = VideoStream(path, window_s=0.5, frames_per_window=1)  # opens: decord reports 50 frames
    with pytest.raises(DecodeError) as err:
        all_frames(stream)
    assert err.value.path == str(path)
    assert "decoding frames" in err.value.reason and "Error sending packet" in err.value.reason


def test_non_video_raises_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("not a video")
    with pytest.raises(DecodeError, match="cannot open") as err:
        VideoStream(path, window_s=0.5, frames_per_window=1)
    assert err.value.path == str(path)


def write_cfr_video(path: Path, n_frames: int, fps: int, size: int = 32) -> None:
    """Constant-rate MPEG-4 clip; frame i is flat grey 5 + 10 (i % 24), so the pixels tell frames apart."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            grey = np.full((size, size, 3), 5 + 10 * (i % 24), np.uint8)
            frame = av.VideoFrame.from_ndarray(grey, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_plan_windows_never_samples_faster_than_the_video() -> None:
    starts = np.arange(5, dtype=np.float64)  # 1 fps, 5 s
    upsampled = plan_windows(starts, 5.0, window_s=0.5, frames_per_window=1)  # without fps: as asked
    assert upsampled.indices.ravel().tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    plan = plan_windows(starts, 5.0, window_s=0.5, frames_per_window=1, fps=1.0)
    assert plan.indices.ravel().tolist() == [0, 1, 2, 3, 4]  # every frame once
    np.testing.assert_allclose(plan.times, [[k, k + 1] for k in range(5)])
    assert (plan.window_s, plan.native_rate, plan.padded) == (1.0, True, 0)
    segment = plan_windows(np.arange(20.0), 20.0, window_s=1.5, frames_per_window=8, fps=1.0)
    assert segment.window_s == 8.0 and segment.indices[0].tolist() == list(range(8))
    assert len(np.unique(segment.indices[:2])) == 16  # two segments, sixteen distinct frames
    fast_enough = plan_windows(np.arange(50) / 25.0, 2.0, window_s=0.5, frames_per_window=1, fps=25.0)
    assert (fast_enough.window_s, fast_enough.native_rate, len(fast_enough.times)) == (0.5, False, 4)


def test_plan_windows_has_no_sliver_row_from_float32_timestamps() -> None:
    # decord's stamps are float32: 930 frames at 30 fps end at 31.0000005 s, not 31 s
    starts = (np.arange(930) / 30.0).astype(np.float32).astype(np.float64)
    duration = float(starts[-1] + 1 / 30)
    assert duration > 31.0 and math.ceil(duration / 0.5 - 1e-6) == 63  # what made [31.0, 31.0000005]
    plan = plan_windows(starts, duration, window_s=0.5, frames_per_window=1, fps=30.0)
    assert len(plan.times) == 62
    np.testing.assert_allclose(plan.times[-1], [30.5, duration])
    assert np.all(np.diff(plan.times, axis=1) >= 0.5 - 1e-9)
    # real partial windows are kept, even 4 ms of the last frame of a 120-frame NTSC clip
    partial = plan_windows(np.arange(93) / 30.0, 3.1, window_s=0.5, frames_per_window=1, fps=30.0)
    np.testing.assert_allclose(partial.times[-1], [3.0, 3.1])
    ntsc = plan_windows(np.arange(120) / 29.97, 120 / 29.97, window_s=0.5, frames_per_window=1, fps=29.97)
    assert len(ntsc.times) == 9 and ntsc.indices[-1, 0] == 119
    np.testing.assert_allclose(ntsc.times[-1], [4.0, 4.004], atol=1e-4)
    with pytest.raises(ValueError, match="positive duration"):
        plan_windows(np.zeros(1), 0.0, window_s=0.5, frames_per_window=1)


def test_one_fps_video_gives_one_row_per_frame(tmp_path: Path) -> None:
    path = tmp_path / "slow.mp4"
    write_cfr_video(path, n_frames=12, fps=1)
    stream = VideoStream(path, window_s=0.5, frames_per_window=1, short_side=None, crop=None)
    assert stream.info.fps == pytest.approx(1.0) and stream.info.duration == pytest.approx(12.0)
    assert (stream.plan.window_s, stream.plan.native_rate) == (pytest.approx(1.0), True)
    assert stream.plan.indices.ravel().tolist() == list(range(12))
    np.testing.assert_allclose(stream.plan.times, [[k, k + 1] for k in range(12)], atol=1e-6)
    grey = all_frames(stream)[:, 0].mean(axis=(1, 2, 3))
    np.testing.assert_allclose(grey, [5 + 10 * k for k in range(12)], atol=3)  # twelve different frames


def test_video_an_exact_multiple_of_the_window_has_no_empty_last_row(tmp_path: Path) -> None:
    path = tmp_path / "thirty_one_seconds.mp4"
    write_cfr_video(path, n_frames=930, fps=30, size=16)
    stream = VideoStream(path, window_s=0.5, frames_per_window=1, short_side=None, crop=None)
    times = stream.plan.times
    assert stream.info.duration == pytest.approx(31.0, abs=1e-5)
    assert len(times) == 62 and not stream.plan.native_rate
    assert times[-1, 0] == 30.5 and times[-1, 1] == stream.info.duration
    assert np.all(times[:, 1] - times[:, 0] >= 0.5 - 1e-6)
    assert stream.plan.indices[-1, 0] == 929 - 7  # the frame on screen at 30.75 s


def test_decode_error_reasons_are_one_printable_line() -> None:
    err = DecodeError("/v/zero.mp4", "cannot open:" + "\x00" * 300 + " moov atom\nnot found\r")
    assert err.reason == "cannot open: moov atom not found"
    assert str(err) == "/v/zero.mp4: cannot open: moov atom not found"
