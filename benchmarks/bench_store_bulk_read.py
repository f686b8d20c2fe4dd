"""Bulk read of a split's video features: FeatureStore.read_videos versus one contiguous .npy file.

Training reads every video of a split at once, so this is the store's hot path. The baseline is the fastest
thing a user could do by hand: `np.load` of one (videos*rows, dim) float32 file holding the same values.
"Cold" drops the files from the OS page cache first (sync + posix_fadvise DONTNEED, no root needed; a VM's
host may still cache the disk); "warm" reads them again. Each store read uses a fresh FeatureStore, so no
in-process cache helps. CPU seconds (all threads) are shown beside wall seconds: on a shared machine they are
the steadier comparison.

    .venv/bin/python benchmarks/bench_store_bulk_read.py                 # 2000 videos x 128 rows x 1024 dims
    .venv/bin/python benchmarks/bench_store_bulk_read.py --videos 200    # quicker
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from storage.feature_store import FeatureStore

FP = "bench-visual"
Timing = tuple[float, float]  # (wall, CPU) seconds


def drop_page_cache(root: Path) -> None:
    """Evict every file under `root` from the page cache (dirty pages cannot be dropped: sync first)."""
    os.sync()
    for path in [root] if root.is_file() else root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(read: Callable[[], object], root: Path, cold: bool) -> Timing:
    if cold:
        drop_page_cache(root)
    wall, cpu = time.perf_counter(), time.process_time()
    result = read()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    del result
    return wall, cpu


def compare(
    base: Callable[[], object], ours: Callable[[], object], roots: tuple[Path, Path], cold: bool, repeats: int
) -> tuple[Timing, Timing]:
    """Best (wall, CPU) of each side over interleaved runs: the machine is shared, the minimum is the least
    disturbed run, and interleaving exposes both sides to the same neighbours."""
    runs = [(timed(base, roots[0], cold), timed(ours, roots[1], cold)) for _ in range(repeats)]
    best = [(min(r[side][0] for r in runs), min(r[side][1] for r in runs)) for side in (0, 1)]
    return best[0], best[1]


def video_rows(i: int, rows: int, dim: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal((rows, dim), dtype=np.float32)


def build(work: Path, n: int, rows: int, dim: int) -> tuple[FeatureStore, list[str], Path]:
    """The same values twice: one store entry per video, and one contiguous .npy."""
    store = FeatureStore(work / "store.zarr")
    store.register_extractor(FP, kind="visual", dim=dim, config={"bench": True})
    shas = [f"{i:064x}" for i in range(n)]
    times = np.stack([np.arange(rows), np.arange(rows) + 1.0], axis=1)
    npy = work / "features.npy"
    whole = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(n * rows, dim))

    def write(i: int) -> None:
        feats = video_rows(i, rows, dim)
        whole[i * rows : (i + 1) * rows] = feats
        store.write_video(shas[i], FP, feats, times, video_id=f"video{i}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(n)))
    whole.flush()
    return store, shas, npy


def check_equal(store_url: str, shas: list[str], npy: Path, rows: int) -> None:
    """The timings only mean something if both sides return the same numbers."""
    got = FeatureStore(store_url).read_videos(FP, shas)
    ref = np.load(npy, mmap_mode="r")
    for i in (0, len(shas) // 2, len(shas) - 1):
        assert np.array_equal(got[i].features, ref[i * rows : (i + 1) * rows]), f"video {i} differs"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--subset", type=float, default=0.1, help="fraction read in the split-subset rows")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per packed measurement")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_store_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        store, shas, npy = build(work, args.videos, args.rows, args.dim)
        write_s = time.perf_counter() - t0
        url, root = store.url, Path(store.url)
        subset = sorted(
            np.random.default_rng(0).choice(len(shas), int(len(shas) * args.subset), replace=False)
        )
        sub_shas = [shas[i] for i in subset]
        sub_rows = np.concatenate([np.arange(i * args.rows, (i + 1) * args.rows) for i in subset])

        def npy_all() -> object:
            return np.load(npy)

        def npy_subset() -> object:
            return np.load(npy, mmap_mode="r")[sub_rows]

        def store_all() -> object:
            return FeatureStore(url, auto_pack=False).read_videos(FP, shas)

        def store_subset() -> object:
            return FeatureStore(url, auto_pack=False).read_videos(FP, sub_shas)

        results: list[tuple[str, str, Timing, Timing]] = []

        def measure(label: str, base: Callable[[], object], ours: Callable[[], object], repeats: int) -> None:
            for state in ("cold", "warm"):
                results.append((label, state, *compare(base, ours, (npy, root), state == "cold", repeats)))

        measure("all videos, per-entry arrays (before pack)", npy_all, store_all, 1)
        t0 = time.perf_counter()
        store.pack(FP)
        pack_s = time.perf_counter() - t0
        check_equal(url, shas, npy, args.rows)
        measure("all videos, packed", npy_all, store_all, args.repeats)
        measure(f"{args.subset:.0%} of videos, packed", npy_subset, store_subset, args.repeats)

        gib = args.videos * args.rows * args.dim * 4 / 2**30
        print(
            f"\n{args.videos} videos x {args.rows} rows x {args.dim} dims float32 ({gib:.2f} GiB); ", end=""
        )
        print(f"write {write_s:.1f} s (4 threads), pack {pack_s:.1f} s; {os.cpu_count()} CPUs; ", end="")
        print(
            f"load average {os.getloadavg()[0]:.1f}; packed rows: best of {args.repeats} interleaved runs\n"
        )
        print("| read | cache | .npy wall s | store wall s | ratio | .npy CPU s | store CPU s | CPU ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for label, state, (base_wall, base_cpu), (wall, cpu) in results:
            print(
                f"| {label} | {state} | {base_wall:.3f} | {wall:.3f} | {wall / base_wall:.2f}x "
                f"| {base_cpu:.3f} | {cpu:.3f} | {cpu / base_cpu:.2f}x |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
