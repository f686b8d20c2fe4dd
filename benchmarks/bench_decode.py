"""Decoding: sampled frames per second with decord (tasks.decode) vs PyAV, and peak memory vs video length.

Throughput: on the real videos, both paths produce the same thing — the `lite` sampling (2 frames per second;
`--every` changes it), short side 256, centre crop 224, uint8. decord seeks to the sampled frames and resizes
in the decoder; the PyAV baseline decodes every frame in one pass and converts/resizes only the sampled ones
(decode everything, then sample; no frame is kept beyond its turn). One decoder thread each.

Memory: peak RSS of a fresh process that decodes a synthetic 1-minute and a 10-minute video (written here with
PyAV at 320x240, 25 fps, into a temporary folder) through `VideoStream.chunks` (bounded chunks), against one
`get_batch` of every sampled frame at once (what chunking avoids).

    .venv/bin/python benchmarks/bench_decode.py [--videos DIR] [--minutes 1 10] [--skip-memory] [--repeats 2]
    .venv/bin/python benchmarks/bench_decode.py --skip-memory --every 5   # sparse sampling
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from tasks.decode import VideoStream

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VIDEOS = Path(os.environ.get("MAMFUSION_SHARED", REPO.parent / "shared")) / "realdata" / "videos"
SHORT, CROP = 256, 224
LITE_EVERY_S = 0.5  # the lite profile samples 2 frames per second


def decord_sampled(path: Path, every: float) -> int:
    stream = VideoStream(path, window_s=every, frames_per_window=1, short_side=SHORT, crop=CROP)
    return sum(len(chunk.frames) for chunk in stream.chunks(32))


def pyav_sampled(path: Path, every: float) -> int:
    """One pass over every frame; convert, resize and crop only the frame each sample time falls on.

    Frame times are index / average rate (exact for these constant-rate files), so no frame is ever stored.
    """
    out: list[np.ndarray] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # like decord's decode_threads=1
        fps = float(stream.average_rate)
        for index, frame in enumerate(container.decode(stream)):
            while math.floor((len(out) + 0.5) * every * fps) <= index:
                out.append(_resize_crop(frame))
    n_windows = max(1, math.ceil((index + 1) / fps / every - 1e-6))
    if len(out) < n_windows:  # samples past the end repeat the last frame
        out.extend([_resize_crop(frame)] * (n_windows - len(out)))
    return len(np.stack(out))


def _resize_crop(frame: av.VideoFrame) -> np.ndarray:
    scale = SHORT / min(frame.width, frame.height)
    rgb = frame.reformat(round(frame.width * scale), round(frame.height * scale), format="rgb24").to_ndarray()
    top, left = (rgb.shape[0] - CROP) // 2, (rgb.shape[1] - CROP) // 2
    return rgb[top : top + CROP, left : left + CROP].transpose(2, 0, 1)


def best_time(fn, path: Path, every: float, repeats: int) -> tuple[float, int]:
    """Best of `repeats` (the machine is shared: the minimum is the least disturbed run)."""
    best, n = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn(path, every)
        best = min(best, time.perf_counter() - t0)
    return best, n


def throughput_table(videos: list[Path], every: float, repeats: int) -> None:
    print("| video | sampled frames | decord (frames/s) | PyAV decode-all (frames/s) | decord / PyAV |")
    print("|---|---:|---:|---:|---:|")
    totals = np.zeros(3)
    for path in videos:
        t_decord, n = best_time(decord_sampled, path, every, repeats)
        t_pyav, n_pyav = best_time(pyav_sampled, path, every, repeats)
        assert n == n_pyav
        totals += (n, t_decord, t_pyav)
        print(f"| {path.name} | {n} | {n / t_decord:.0f} | {n / t_pyav:.0f} | {t_pyav / t_decord:.1f}x |")
    n, a, b = totals
    print(f"| **all** | {n:.0f} | {n / a:.0f} | {n / b:.0f} | {b / a:.1f}x |")


def write_long_video(path: Path, minutes: float, fps: int = 25, size: tuple[int, int] = (320, 240)) -> None:
    """A moving textured pattern (cheap to encode, not trivially compressible)."""
    width, height = size
    base = np.random.default_rng(0).integers(0, 256, (height, width * 2, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        for i in range(int(minutes * 60 * fps)):
            shift = (i * 2) % width
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, shift : shift + width]), "rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _peak_rss_child(path: str, mode: str) -> None:
    """Run inside a fresh interpreter: decode the whole video, print the peak RSS in MiB as JSON."""
    stream = VideoStream(path, window_s=LITE_EVERY_S, frames_per_window=1, short_side=SHORT, crop=CROP)
    if mode == "chunks":
        n = sum(len(chunk.frames) for chunk in stream.chunks(32))
    else:
        n = len(stream._reader.get_batch(np.unique(stream.plan.indices).tolist()).asnumpy())
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (PyAV-heavy) parent.
    status = Path("/proc/self/status").read_text()
    peak = int(status.split("VmHWM:")[1].split()[0]) / 1024
    print(json.dumps({"frames": n, "peak_mib": peak}))


def memory_table(minutes: list[float]) -> None:
    print("| video length | sampled frames | peak RSS, chunked (MiB) | peak RSS, one get_batch (MiB) |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for length in minutes:
            path = Path(tmp) / f"long_{length:g}min.mp4"
            write_long_video(path, length)
            row = {}
            for mode in ("chunks", "one_batch"):
                code = f"from benchmarks.bench_decode import _peak_rss_child as f; f({str(path)!r}, {mode!r})"
                out = subprocess.run(
                    [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO
                )
                row[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"| {length:g} min | {row['chunks']['frames']} | {row['chunks']['peak_mib']:.0f} | "
                f"{row['one_batch']['peak_mib']:.0f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=Path, default=DEFAULT_VIDEOS)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="best of N per measurement")
    parser.add_argument("--every", type=float, default=LITE_EVERY_S, help="seconds between samples")
    args = parser.parse_args()
    videos = sorted(p for p in args.videos.iterdir() if p.name != "corrupted.mp4")
    throughput_table(videos, args.every, args.repeats)
    if not args.skip_memory:
        print()
        memory_table(args.minutes)


if __name__ == "__main__":
    main()
