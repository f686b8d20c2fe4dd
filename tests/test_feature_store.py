"""FeatureStore: round trips, typed errors, packs, and the crash/concurrency guarantees (real processes)."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import pickle
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage import _zarr_entries, _zarr_packs, feature_store
from storage.feature_store import (
    FeatureDimensionError,
    FeatureStore,
    FeatureStoreError,
    MissingFeatureError,
    text_key,
)

DIM = 6
FP = "vis-test"
TFP = "txt-test"


def sha(i: int) -> str:
    return hashlib.sha256(f"video-{i}".encode()).hexdigest()


def feats(i: int, rows: int | None = None, value: float | None = None) -> np.ndarray:
    rows = rows if rows is not None else 2 + i % 5
    if value is not None:
        return np.full((rows, DIM), value, dtype=np.float32)
    return np.random.default_rng(i).standard_normal((rows, DIM)).astype(np.float32)


def times(rows: int) -> np.ndarray:
    start = np.arange(rows) * 0.5
    return np.stack([start, start + 0.75], axis=1)


def open_store(url: str | Path) -> FeatureStore:
    store = FeatureStore(url)
    store.register_extractor(FP, kind="visual", dim=DIM, config={"backbone": "test", "fps": 1.0})
    store.register_extractor(TFP, kind="text", dim=DIM, config={"model": "tiny"})
    return store


@pytest.fixture(params=["memory", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> FeatureStore:
    """Both store kinds: memory:// goes through fsspec and zarr's reader, local paths take the fast path."""
    url = f"memory://fs-{uuid.uuid4().hex}" if request.param == "memory" else tmp_path / "store.zarr"
    return open_store(url)


@pytest.fixture
def small_pack_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pack chunks of 3 feature rows (4 times rows), so entries straddle chunk borders, subsets read partial
    chunks, and the two arrays' chunks do not line up."""
    monkeypatch.setattr(_zarr_packs, "PACK_CHUNK_BYTES", 3 * DIM * 4)


def write_videos(store: FeatureStore, ids: range) -> None:
    for i in ids:
        f = feats(i)
        store.write_video(sha(i), FP, f, times(len(f)), video_id=f"vid{i}", attrs={"index": i})


def assert_video(store: FeatureStore, i: int) -> None:
    got = store.read_video(sha(i), FP)
    np.testing.assert_array_equal(got.features, feats(i))
    np.testing.assert_array_equal(got.times, times(len(feats(i))))
    assert got.features.dtype == np.float32 and got.times.dtype == np.float64


# --- round trips -----------------------------------------------------------------------------------------
def test_video_round_trip_with_provenance(store: FeatureStore) -> None:
    f64 = np.random.default_rng(0).standard_normal((4, DIM))
    store.write_video(sha(0), FP, f64, times(4), video_id="clip/a b.mp4", attrs={"backbone": {"name": "x"}})
    assert store.has_video(sha(0), FP) and not store.has_video(sha(1), FP)
    got = store.read_video(sha(0), FP)
    np.testing.assert_array_equal(got.features, f64.astype(np.float32))
    np.testing.assert_array_equal(got.times, times(4))
    assert got.attrs["backbone"] == {"name": "x"}
    assert (got.attrs["sha256"], got.attrs["fingerprint"], got.attrs["video_id"]) == (
        sha(0),
        FP,
        "clip/a b.mp4",
    )
    assert got.attrs["written_at"].endswith("+00:00")


def test_stored_video_attrs_answers_for_many_videos_at_once(store: FeatureStore) -> None:
    write_videos(store, range(3))
    asked = [sha(2), sha(7), sha(0), sha(2)]
    assert store.stored_video_attrs(FP, asked) == [{"index": 2}, None, {"index": 0}, {"index": 2}]
    store.pack(FP)  # packed entries keep their markers
    assert store.stored_video_attrs(FP, [sha(1), sha(5)]) == [{"index": 1}, None]
    assert store.stored_video_attrs(FP, []) == []
    assert store.stored_video_attrs("vis-other", [sha(0)]) == [None]  # another extractor's features


def test_read_videos_keeps_order_and_duplicates(store: FeatureStore) -> None:
    write_videos(store, range(4))
    order = [3, 0, 3, 1]
    got = store.read_videos(FP, [sha(i) for i in order])
    for i, video in zip(order, got, strict=True):
        np.testing.assert_array_equal(video.features, feats(i))
        assert video.attrs["index"] == i
    assert store.read_videos(FP, []) == []


def test_resolve_video_ids_maps_names_to_complete_entries(store: FeatureStore) -> None:
    write_videos(store, range(3))
    assert store.resolve_video_ids(FP, ["vid2", "vid0", "nope"]) == {"vid2": sha(2), "vid0": sha(0)}
    store.write_video(sha(9), FP, feats(9), times(len(feats(9))), video_id="vid0")  # vid0's content changed
    assert store.resolve_video_ids(FP, ["vid0"]) == {"vid0": sha(9)}
    store.register_extractor("other", kind="visual", dim=DIM, config={})
    assert store.resolve_video_ids("other", ["vid0"]) == {}


def test_queries_round_trip(store: FeatureStore) -> None:
    texts = ["a person opens the door", "Ünïcode ✓", "a person opens the door"]
    arrays = [feats(1, 3), feats(2, 5).astype(np.float64), feats(1, 3)]
    store.write_queries(TFP, texts, arrays)
    assert store.has_queries(TFP, [texts[1], "unseen"]) == [True, False]
    got = store.read_queries(TFP, [texts[1], texts[0]])
    np.testing.assert_array_equal(got[0], arrays[1].astype(np.float32))
    np.testing.assert_array_equal(got[1], arrays[0])
    assert got[0].dtype == np.float32
    assert text_key("abc") == hashlib.sha256(b"abc").hexdigest()


def test_registry(store: FeatureStore) -> None:
    store.register_extractor(
        FP, kind="visual", dim=DIM, config={"backbone": "test", "fps": 1.0}
    )  # idempotent
    info = store.extractor_info(TFP)
    assert info == {"kind": "text", "dim": DIM, "config": {"model": "tiny"}}
    info["config"]["model"] = "mutated"
    assert store.extractor_info(TFP)["config"] == {"model": "tiny"}
    assert set(store.extractors()) == {FP, TFP}
    assert FeatureStore(store.url).extractor_info(FP)["config"] == {"backbone": "test", "fps": 1.0}
    with pytest.raises(FeatureStoreError, match=r"'vis-test' is already registered with a different dim"):
        store.register_extractor(FP, kind="visual", dim=DIM + 1, config={"backbone": "test", "fps": 1.0})
    with pytest.raises(FeatureStoreError, match="config"):
        store.register_extractor(FP, kind="visual", dim=DIM, config={"backbone": "other", "fps": 1.0})
    with pytest.raises(MissingFeatureError, match="'unknown' is not registered"):
        store.extractor_info("unknown")
    with pytest.raises(FeatureStoreError, match="JSON"):
        store.register_extractor("bad", kind="text", dim=3, config={"x": float("nan")})
    with pytest.raises(FeatureStoreError, match="kind"):
        store.register_extractor("bad", kind="audio", dim=3, config={})  # type: ignore[arg-type]


def test_store_pickles_to_the_same_store(store: FeatureStore) -> None:
    write_videos(store, range(1))
    clone = pickle.loads(pickle.dumps(store))
    assert clone.url == store.url
    np.testing.assert_array_equal(clone.read_video(sha(0), FP).features, feats(0))


# --- errors ----------------------------------------------------------------------------------------------
def test_missing_keys_name_sha_and_fingerprint(store: FeatureStore) -> None:
    write_videos(store, range(1))
    with pytest.raises(MissingFeatureError) as err:
        store.read_video(sha(5), FP)
    assert sha(5) in str(err.value) and FP in str(err.value) and isinstance(err.value, KeyError)
    assert err.value.keys == [sha(5)] and err.value.fingerprint == FP
    with pytest.raises(MissingFeatureError, match=rf"{sha(7)}, {sha(8)}"):
        store.read_videos(FP, [sha(0), sha(7), sha(8)])
    with pytest.raises(MissingFeatureError, match="'never written'"):
        store.read_queries(TFP, ["never written"])
    with pytest.raises(MissingFeatureError, match="'unknown-fp' is not registered"):
        store.write_video(sha(0), "unknown-fp", feats(0), times(len(feats(0))))


def test_dimension_mismatch_names_both_dims(store: FeatureStore) -> None:
    with pytest.raises(FeatureDimensionError) as err:
        store.write_video(sha(0), FP, np.zeros((3, DIM + 2)), times(3))
    assert (err.value.expected, err.value.actual, err.value.fingerprint) == (DIM, DIM + 2, FP)
    assert f"dim {DIM + 2}" in str(err.value) and f"dim {DIM}" in str(err.value) and FP in str(err.value)
    with pytest.raises(FeatureDimensionError, match="query 1"):
        store.write_queries(TFP, ["ok", "bad"], [np.zeros((2, DIM)), np.zeros((2, 3))])
    assert store.has_queries(TFP, ["ok"]) == [False]  # a batch is validated before anything is written


@pytest.mark.parametrize(
    ("features", "times_", "match"),
    [
        (np.full((2, DIM), np.nan), times(2), "row 0 column 0 is nan"),
        (np.array([[0.0] * (DIM - 1) + [1e39]] * 2), times(2), "not finite as float32"),
        (np.zeros((2, DIM)), np.zeros((3, 2)), r"times must have shape \(2, 2\)"),
        (np.zeros((2, DIM)), np.array([[0.0, 1.0], [2.0, 1.0]]), "times row 1"),
        (np.zeros((2, DIM)), np.array([[0.0, 1.0], [np.inf, np.inf]]), "times row 1"),
        (np.zeros(DIM), times(1), "2-D"),
        (np.zeros((0, DIM)), np.zeros((0, 2)), "no rows"),
        (np.array([["a"] * DIM]), times(1), "real numbers"),
    ],
)
def test_bad_values_are_rejected(
    store: FeatureStore, features: np.ndarray, times_: np.ndarray, match: str
) -> None:
    with pytest.raises(FeatureStoreError, match=match):
        store.write_video(sha(0), FP, features, times_)
    assert not store.has_video(sha(0), FP)


def test_bad_keys_and_attrs_are_rejected(store: FeatureStore) -> None:
    f = feats(0)
    for key in ["../escape", "a/b", "", ".hidden", "zarr.json"]:
        with pytest.raises(FeatureStoreError, match="invalid video sha256"):
            store.write_video(key, FP, f, times(len(f)))
    with pytest.raises(FeatureStoreError, match="reserved"):
        store.write_video(sha(0), FP, f, times(len(f)), attrs={"sha256": "x"})
    with pytest.raises(FeatureStoreError, match="JSON"):
        store.write_video(sha(0), FP, f, times(len(f)), attrs={"x": object()})
    with pytest.raises(FeatureStoreError, match="is a text extractor, not visual"):
        store.write_video(sha(0), TFP, f, times(len(f)))
    with pytest.raises(FeatureStoreError, match="different features"):
        store.write_queries(TFP, ["same", "same"], [np.zeros((1, DIM)), np.ones((1, DIM))])


def test_refuses_a_zarr_group_that_is_not_a_feature_store(tmp_path: Path) -> None:
    zarr.open_group(tmp_path / "other.zarr", mode="w").attrs["x"] = 1
    with pytest.raises(FeatureStoreError, match="not a MamFusion feature store"):
        FeatureStore(tmp_path / "other.zarr")


# --- packs -----------------------------------------------------------------------------------------------
def test_pack_serves_the_same_values_and_stays_current(
    store: FeatureStore, small_pack_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_videos(store, range(8))
    store.write_video(sha(8), FP, np.zeros((4, DIM)), times(4))  # all-zero chunks are stored too
    info = store.pack(FP)
    assert (info.entries, info.rows) == (9, sum(len(feats(i)) for i in range(8)) + 4)
    assert store.pack(FP) == info  # nothing changed: no new pack
    fresh = FeatureStore(store.url)
    for subset in [range(8), [6, 1, 4], [7], [0, 2, 5]]:
        for i, video in zip(subset, fresh.read_videos(FP, [sha(i) for i in subset]), strict=True):
            np.testing.assert_array_equal(video.features, feats(i))
            np.testing.assert_array_equal(video.times, times(len(feats(i))))
            assert video.attrs["index"] == i and video.attrs["video_id"] == f"vid{i}"
    np.testing.assert_array_equal(fresh.read_video(sha(8), FP).features, np.zeros((4, DIM)))
    assert fresh.resolve_video_ids(FP, ["vid3"]) == {"vid3": sha(3)}

    write_videos(store, range(8, 10))  # after the pack: read entry by entry until the next pack
    store.write_video(sha(2), FP, feats(2, value=7.0), times(len(feats(2))))  # replaces a packed entry
    got = fresh.read_videos(FP, [sha(1), sha(2), sha(9)])
    np.testing.assert_array_equal(got[1].features, feats(2, value=7.0))
    np.testing.assert_array_equal(got[2].features, feats(9))
    assert store.pack(FP).entries == 10
    loose_reads = []
    read_entry = _zarr_entries.read_entry

    async def counting_read_entry(*args: object) -> object:
        loose_reads.append(args[3])
        return await read_entry(*args)

    monkeypatch.setattr(_zarr_entries, "read_entry", counting_read_entry)
    np.testing.assert_array_equal(fresh.read_video(sha(2), FP).features, feats(2, value=7.0))
    assert_video(fresh, 9)
    assert loose_reads == []  # the replaced entry and the late ones are served by the new pack
    assert store.gc(min_age_s=0).packs_removed == 1  # the first pack is superseded
    assert_video(fresh, 5)


def test_query_pack(store: FeatureStore, small_pack_chunks: None) -> None:
    texts = [f"caption {i}" for i in range(7)]
    store.write_queries(TFP, texts, [feats(i) for i in range(7)])
    assert store.pack(TFP).entries == 7
    store.write_queries(TFP, ["late"], [feats(20)])
    got = FeatureStore(store.url).read_queries(TFP, ["late", *texts[::-1]])
    for array, i in zip(got, [20, *range(6, -1, -1)], strict=True):
        np.testing.assert_array_equal(array, feats(i))


def test_a_large_bulk_read_packs_first(
    store: FeatureStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(feature_store, "AUTO_PACK_MIN", 4)
    write_videos(store, range(6))
    FeatureStore(store.url, auto_pack=False).read_videos(FP, [sha(i) for i in range(6)])
    assert store._run(_zarr_packs.load_pack(store._store, "videos", FP, {})) is None
    monkeypatch.setattr(FeatureStore, "pack", lambda self, fp: (_ for _ in ()).throw(OSError("read-only")))
    for i, video in enumerate(FeatureStore(store.url).read_videos(FP, [sha(i) for i in range(6)])):
        np.testing.assert_array_equal(video.features, feats(i))  # packing failed: read one by one
    assert "could not pack" in caplog.text
    monkeypatch.undo()
    monkeypatch.setattr(feature_store, "AUTO_PACK_MIN", 4)
    for i, video in enumerate(FeatureStore(store.url).read_videos(FP, [sha(i) for i in range(6)])):
        np.testing.assert_array_equal(video.features, feats(i))
    packed = store._run(_zarr_packs.load_pack(store._store, "videos", FP, {}))
    assert packed is not None and len(packed.keys) == 6  # the read above packed first


def test_gc_spares_what_was_replaced_recently(store: FeatureStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader may still be reading the stage or pack a new commit just replaced, however old it is."""
    write_videos(store, range(2))
    store.pack(FP)
    write_videos(store, range(3))  # replaces entries 0 and 1, and a new pack replaces the first
    store.pack(FP)
    monkeypatch.setattr(_zarr_entries, "stage_age_s", lambda stage: 1e9)  # every stage looks ancient
    assert store.gc(min_age_s=60) == _zarr_packs.GcReport(0, 0)
    assert store.gc(min_age_s=0) == _zarr_packs.GcReport(2, 1)
    for i in range(3):
        assert_video(store, i)


def test_pack_of_an_empty_fingerprint(store: FeatureStore) -> None:
    assert store.pack(FP).entries == 0


# --- crashes and concurrency with real processes ---------------------------------------------------------
def _hang_before_commit(url: str, ready: str) -> None:
    """Child: write one video but stop for good between its arrays and its commit marker."""

    async def hang(*args: object, **kwargs: object) -> None:
        Path(ready).touch()
        time.sleep(600)

    _zarr_entries.commit_entry = hang
    store = FeatureStore(url)
    store.write_video(sha(0), FP, feats(0), times(len(feats(0))), video_id="vid0")


def _write_forever(url: str) -> None:
    """Child: write videos 0, 1, 2, ... until killed."""
    store = FeatureStore(url)
    for i in range(10_000):
        f = feats(i, rows=50)
        store.write_video(sha(i), FP, f, times(len(f)), video_id=f"vid{i}")


def _spawn(target: object, *args: object) -> mp.Process:
    proc = mp.get_context("spawn").Process(target=target, args=args)
    proc.start()
    return proc


def _wait_for(predicate: object, proc: mp.Process, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert proc.is_alive(), f"child exited early with code {proc.exitcode}"
        assert time.monotonic() < deadline, "child made no progress"
        time.sleep(0.05)


def _stage_dirs(root: Path, key: str) -> list[str]:
    entry = root / "videos" / FP / key
    return sorted(p.name for p in entry.iterdir() if p.is_dir()) if entry.exists() else []


def test_killed_write_is_never_trusted_and_can_be_redone(tmp_path: Path) -> None:
    root = tmp_path / "store.zarr"
    store = open_store(root)
    ready = tmp_path / "ready"
    proc = _spawn(_hang_before_commit, str(root), str(ready))
    _wait_for(ready.exists, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()

    assert len(_stage_dirs(root, sha(0))) == 1  # the arrays were fully written...
    assert not store.has_video(sha(0), FP)  # ...but never committed, so nobody trusts them
    assert store.stored_video_attrs(FP, [sha(0)]) == [None]
    with pytest.raises(MissingFeatureError):
        store.read_video(sha(0), FP)
    assert store.resolve_video_ids(FP, ["vid0"]) == {}
    assert store.pack(FP).entries == 0
    assert store.gc().stages_removed == 0  # young orphans may be writes still in flight
    assert store.gc(min_age_s=0).stages_removed == 1
    assert _stage_dirs(root, sha(0)) == []

    write_videos(store, range(1))
    assert_video(store, 0)
    assert store.resolve_video_ids(FP, ["vid0"]) == {"vid0": sha(0)}


def test_kill_at_a_random_moment_leaves_only_complete_entries(tmp_path: Path) -> None:
    root = tmp_path / "store.zarr"
    store = open_store(root)
    proc = _spawn(_write_forever, str(root))
    _wait_for(lambda: store.has_video(sha(5), FP), proc)
    time.sleep(np.random.default_rng().uniform(0, 0.3))
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()

    attempted = [i for i in range(10_000) if _stage_dirs(root, sha(i))]
    done = [i for i in attempted if store.has_video(sha(i), FP)]
    assert len(done) >= 6
    for i in done:
        np.testing.assert_array_equal(store.read_video(sha(i), FP).features, feats(i, rows=50))
    assert store.pack(FP).entries == len(done)
    for i in attempted:  # whatever was cut off can be written again
        store.write_video(sha(i), FP, feats(i, rows=50), times(50), video_id=f"vid{i}")
    assert store.resolve_video_ids(FP, [f"vid{i}" for i in attempted]) == {
        f"vid{i}": sha(i) for i in attempted
    }


def _concurrent_writer(url: str, worker: int, n_own: int, rounds: int) -> None:
    """Child: its own videos, the shared video (filled with its worker number) and its own queries."""
    store = FeatureStore(url)
    store.register_extractor(FP, kind="visual", dim=DIM, config={"backbone": "test", "fps": 1.0})
    for r in range(rounds):
        for i in range(n_own):
            if r == 0:
                key = 100 * worker + i
                f = feats(key)
                store.write_video(sha(key), FP, f, times(len(f)), video_id=f"vid{key}")
            store.write_video(sha(-1), FP, feats(0, rows=40, value=worker), times(40), video_id="shared")
        store.write_queries(TFP, [f"w{worker} r{r}", "shared query"], [feats(r), feats(0, value=worker)])
        if worker == 0:
            store.pack(FP)


def test_concurrent_writer_processes_do_not_corrupt_the_store(tmp_path: Path) -> None:
    root = tmp_path / "store.zarr"
    open_store(root)
    workers, n_own, rounds = 3, 6, 3
    procs = [_spawn(_concurrent_writer, str(root), w, n_own, rounds) for w in range(workers)]
    for proc in procs:
        proc.join(timeout=300)
        assert proc.exitcode == 0

    fresh = FeatureStore(root)
    own = [100 * w + i for w in range(workers) for i in range(n_own)]
    for i, video in zip(own, fresh.read_videos(FP, [sha(i) for i in own]), strict=True):
        np.testing.assert_array_equal(video.features, feats(i))
        assert video.attrs["video_id"] == f"vid{i}"
    shared = fresh.read_video(sha(-1), FP).features
    assert shared.shape == (40, DIM) and len(np.unique(shared)) == 1 and shared[0, 0] in range(workers)
    assert fresh.resolve_video_ids(FP, ["shared", "vid201"]) == {"shared": sha(-1), "vid201": sha(201)}
    query = fresh.read_queries(TFP, ["shared query"])[0]
    assert len(np.unique(query)) == 1 and query[0, 0] in range(workers)
    texts = [f"w{w} r{r}" for w in range(workers) for r in range(rounds)]
    for text, array in zip(texts, fresh.read_queries(TFP, texts), strict=True):
        np.testing.assert_array_equal(array, feats(int(text[-1])))
    assert fresh.pack(FP).entries == len(own) + 1
    assert fresh.extractors()[FP]["dim"] == DIM


def test_s3_store_through_a_loopback_s3_server(
    s3_bucket: tuple[str, dict[str, str]], small_pack_chunks: None
) -> None:
    """The same store on a real S3 API (moto's server on 127.0.0.1): nothing needs a local filesystem."""
    bucket, options = s3_bucket
    store = FeatureStore(f"{bucket}/store", storage_options=options)
    store.register_extractor(FP, kind="visual", dim=DIM, config={})
    write_videos(store, range(4))
    store.pack(FP)
    store.write_video(sha(1), FP, feats(1, value=3.0), times(len(feats(1))))  # replaces a packed entry
    fresh = pickle.loads(pickle.dumps(store))
    got = fresh.read_videos(FP, [sha(3), sha(1), sha(0)])
    np.testing.assert_array_equal(got[0].features, feats(3))
    np.testing.assert_array_equal(got[1].features, feats(1, value=3.0))
    assert fresh.resolve_video_ids(FP, ["vid2"]) == {"vid2": sha(2)}
    assert fresh.gc(min_age_s=0).stages_removed == 1
    assert_video(fresh, 0)
