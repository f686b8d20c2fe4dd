"""Frame sampling with decord: windows, VFR, rotation, padding, odd sizes, corrupt input, PyAV agreement."""

from __future__ import annotations

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
