"""What the crc32c checksums cost on the read paths: index scan, index scattered rows, pack bulk read.

Builds the same data twice, once in the layout written before checksums (bytes codec only) and once with
`Crc32cCodec` chunks, and reads both through the current code: the pre-checksum layout takes the same raw-byte
path the code took before checksums existed, so the ratio is the checksum's cost. Reads are warm (page cache)
unless --cold; every read uses a freshly opened index/store and an empty `VerifiedChunks` memo unless noted.

    .venv/bin/python benchmarks/bench_checksum.py                       # 20k videos x 33 x 384 fp16 index
    .venv/bin/python benchmarks/bench_checksum.py --videos 2000 --pack-videos 200   # quicker
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from storage import _zarr_entries
from storage.feature_store import FeatureStore
from storage.index import VideoIndex

CLIPS, DIM = 32, 384
FP = "bench-visual"


def drop_page_cache(root: Path) -> None:
    """Evict every file under `root` from the page cache (sync first: dirty pages cannot be dropped)."""
    import os

    os.sync()
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def best(fn: Callable[[], object], repeats: int, before: Callable[[], None] | None = None) -> float:
    """Minimum wall seconds over `repeats` runs (a shared machine: the least disturbed run)."""
    times = []
    for _ in range(repeats):
        if before:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def build_index(url: str, n: int, checksum: bool) -> None:
    _zarr_entries.CHECKSUM = checksum
    try:
        index = VideoIndex.create(url, model_fingerprint="bench", dim=DIM, n_clips=CLIPS, dtype="float16")
        rng = np.random.default_rng(0)
        batch = 1024
        for start in range(0, n, batch):
            k = min(batch, n - start)
            vectors = rng.standard_normal((k, CLIPS + 1, DIM), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
            spans = np.zeros((k, CLIPS, 2), dtype=np.float32)
            ids = [f"v{start + i}" for i in range(k)]
            index.append(vectors, spans, ids, ids, ids)
        index.set_complete(True)
    finally:
        _zarr_entries.CHECKSUM = True


def build_store(url: Path, n: int, rows: int, dim: int, checksum: bool) -> list[str]:
    _zarr_entries.CHECKSUM = checksum
    try:
        store = FeatureStore(url)
        store.register_extractor(FP, kind="visual", dim=dim, config={"bench": True})
        shas = [f"{i:064x}" for i in range(n)]
        times = np.stack([np.arange(rows), np.arange(rows) + 1.0], axis=1)
        for i, sha in enumerate(shas):
            feats = np.random.default_rng(i).standard_normal((rows, dim), dtype=np.float32)
            store.write_video(sha, FP, feats, times)
        store.pack(FP)
    finally:
        _zarr_entries.CHECKSUM = True
    return shas


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=20_000, help="index rows")
    parser.add_argument("--pack-videos", type=int, default=1000, help="feature store entries")
    parser.add_argument("--pack-rows", type=int, default=128)
    parser.add_argument("--pack-dim", type=int, default=512)
    parser.add_argument("--scattered", type=int, default=300, help="rows per read_rows call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="drop the files from the page cache before reads")
    parser.add_argument("--work", help="scratch folder (default: a temp dir, removed after)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-checksum-"))
    try:
        run(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    layouts = {"no checksum": False, "crc32c": True}
    urls = {name: str(work / f"index-{int(c)}.zarr") for name, c in layouts.items()}
    for name, checksum in layouts.items():
        t = time.perf_counter()
        build_index(urls[name], args.videos, checksum)
        print(f"built index ({name}) in {time.perf_counter() - t:.1f} s")
    nbytes = VideoIndex.open(urls["crc32c"]).nbytes
    print(f"\nindex: {args.videos} videos x {CLIPS + 1} x {DIM} fp16 = {nbytes / 1e6:.0f} MB of vectors")

    def prepare(name: str) -> Callable[[], None]:
        def before() -> None:
            _zarr_entries.VERIFIED.clear()
            if args.cold:
                drop_page_cache(Path(urls[name]))

        return before

    results: dict[str, dict[str, float]] = {}
    rng = np.random.default_rng(1)
    picks = rng.choice(args.videos, size=min(args.scattered, args.videos), replace=False)
    for name in layouts:
        url = urls[name]

        def scan(url: str = url) -> None:
            for _, block in VideoIndex.open(url).iter_vectors():
                del block

        def load(url: str = url) -> None:
            VideoIndex.open(url).load_vectors()

        def scattered(url: str = url) -> None:
            VideoIndex.open(url).read_rows(picks)

        results[name] = {
            "iter_vectors": best(scan, args.repeats, prepare(name)),
            "load_vectors": best(load, args.repeats, prepare(name)),
            "read_rows (first touch)": best(scattered, args.repeats, prepare(name)),
        }
        VideoIndex.open(url).load_vectors()  # every chunk checked once in this process
        results[name]["read_rows (chunks already checked)"] = best(scattered, args.repeats)

    print(f"{'index read':38s} {'no checksum':>14s} {'crc32c':>14s} {'throughput ratio':>17s}")
    for what in results["crc32c"]:
        a, b = results["no checksum"][what], results["crc32c"][what]
        rate = (
            f"{nbytes / a / 1e9:6.2f} GB/s {nbytes / b / 1e9:6.2f} GB/s"
            if "vectors" in what
            else f"{a * 1e3:8.1f} ms {b * 1e3:8.1f} ms"
        )
        print(f"{what:38s} {rate:>30s} {a / b:16.2f}x")

    print(f"\nbuilding two stores: {args.pack_videos} videos x {args.pack_rows} rows x {args.pack_dim} fp32")
    stores = {name: work / f"store-{int(c)}.zarr" for name, c in layouts.items()}
    shas = {
        name: build_store(stores[name], args.pack_videos, args.pack_rows, args.pack_dim, c)
        for name, c in layouts.items()
    }
    pack_bytes = args.pack_videos * args.pack_rows * args.pack_dim * 4
    subset = sorted(rng.choice(args.pack_videos, size=int(0.8 * args.pack_videos), replace=False))
    print(f"{'pack bulk read':38s} {'no checksum':>14s} {'crc32c':>14s} {'throughput ratio':>17s}")
    pack_results: dict[str, dict[str, float]] = {}
    for name in layouts:
        url, keys = stores[name], shas[name]

        def before(url: Path = url) -> None:
            _zarr_entries.VERIFIED.clear()
            if args.cold:
                drop_page_cache(url)

        def read_all(url: Path = url, keys: list[str] = keys) -> None:
            FeatureStore(url, auto_pack=False, read_only=True).read_videos(FP, keys)

        def read_subset(url: Path = url, keys: list[str] = keys) -> None:
            FeatureStore(url, auto_pack=False, read_only=True).read_videos(FP, [keys[i] for i in subset])

        pack_results[name] = {
            "read_videos (all)": best(read_all, args.repeats, before),
            "read_videos (80% subset, first touch)": best(read_subset, args.repeats, before),
        }
        read_all()
        pack_results[name]["read_videos (80% subset, checked)"] = best(read_subset, args.repeats)
    for what in pack_results["crc32c"]:
        a, b = pack_results["no checksum"][what], pack_results["crc32c"][what]
        size = pack_bytes * (0.8 if "subset" in what else 1.0)
        print(f"{what:38s} {size / a / 1e9:9.2f} GB/s {size / b / 1e9:9.2f} GB/s {a / b:16.2f}x")


if __name__ == "__main__":
    main()
