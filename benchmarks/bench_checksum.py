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


Timing = tuple[float, float]  # (wall, CPU) seconds


def compare(
    fns: dict[str, Callable[[], object]], repeats: int, before: Callable[[str], None] | None = None
) -> dict[str, Timing]:
    """Best wall and best CPU seconds (all threads, user + system) of each function over interleaved runs:
    on a shared machine the minimum is the least disturbed run, and CPU time is the steadier comparison."""
    runs: dict[str, list[Timing]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if before:
                before(name)
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            runs[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: (min(w for w, _ in r), min(c for _, c in r)) for name, r in runs.items()}


def show(what: str, timings: dict[str, Timing], nbytes: float | None) -> None:
    """One row: each layout's wall (and GB/s when `nbytes`) and CPU time, and checksum/no-checksum ratios."""
    (wa, ca), (wb, cb) = timings["no checksum"], timings["crc32c"]
    if nbytes:
        cells = f"{nbytes / wa / 1e9:6.2f} GB/s {ca:6.3f} s  {nbytes / wb / 1e9:6.2f} GB/s {cb:6.3f} s"
    else:
        cells = f"{wa * 1e3:7.1f} ms {ca:6.3f} s  {wb * 1e3:7.1f} ms {cb:6.3f} s"
    print(f"{what:36s} {cells}   {wa / wb:5.2f}x  {ca / cb:5.2f}x")


HEADER = (
    f"{'':36s} {'no checksum (wall, CPU)':>24s}  {'crc32c (wall, CPU)':>22s}   throughput ratio (wall, CPU)"
)


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

    def prepare(name: str) -> None:
        _zarr_entries.VERIFIED.clear()
        if args.cold:
            drop_page_cache(Path(urls[name]))

    rng = np.random.default_rng(1)
    picks = rng.choice(args.videos, size=min(args.scattered, args.videos), replace=False)

    def scan(url: str) -> Callable[[], None]:
        def run() -> None:
            for _, block in VideoIndex.open(url).iter_vectors():
                del block

        return run

    print(HEADER)
    show("iter_vectors", compare({n: scan(u) for n, u in urls.items()}, args.repeats, prepare), nbytes)
    loads = {n: (lambda u=u: VideoIndex.open(u).load_vectors()) for n, u in urls.items()}
    show("load_vectors", compare(loads, args.repeats, prepare), nbytes)
    scattered = {n: (lambda u=u: VideoIndex.open(u).read_rows(picks)) for n, u in urls.items()}
    show(f"read_rows({len(picks)} rows, first touch)", compare(scattered, args.repeats, prepare), None)
    for u in urls.values():
        VideoIndex.open(u).load_vectors()  # every chunk checked once in this process
    show(f"read_rows({len(picks)} rows, checked)", compare(scattered, args.repeats), None)

    print(f"\nbuilding two stores: {args.pack_videos} videos x {args.pack_rows} rows x {args.pack_dim} fp32")
    stores = {name: work / f"store-{int(c)}.zarr" for name, c in layouts.items()}
    shas = {
        n: build_store(stores[n], args.pack_videos, args.pack_rows, args.pack_dim, c)
        for n, c in layouts.items()
    }
    pack_bytes = args.pack_videos * args.pack_rows * args.pack_dim * 4
    subset = sorted(rng.choice(args.pack_videos, size=int(0.8 * args.pack_videos), replace=False))

    def prepare_store(name: str) -> None:
        _zarr_entries.VERIFIED.clear()
        if args.cold:
            drop_page_cache(stores[name])

    def reader(name: str, keys: list[str]) -> Callable[[], object]:
        return lambda: FeatureStore(stores[name], auto_pack=False, read_only=True).read_videos(FP, keys)

    print(HEADER.replace(" " * 14, "pack bulk read", 1))
    every = {n: reader(n, shas[n]) for n in layouts}
    show("read_videos (all)", compare(every, args.repeats, prepare_store), pack_bytes)
    part = {n: reader(n, [shas[n][i] for i in subset]) for n in layouts}
    show(
        "read_videos (80% subset, first touch)", compare(part, args.repeats, prepare_store), 0.8 * pack_bytes
    )
    for fn in every.values():
        fn()
    show("read_videos (80% subset, checked)", compare(part, args.repeats), 0.8 * pack_bytes)


if __name__ == "__main__":
    main()
