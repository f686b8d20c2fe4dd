"""Integrity of the feature store and the search index: checksums, damage errors, verify/repair, read-only
opening, refusing foreign folders, clear S3 errors and locked index appends (real processes)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from flows import cli
from storage import _zarr_entries, _zarr_packs, feature_store
from storage import index as index_mod
from storage.errors import MamFusionError
from storage.feature_store import (
    DamagedStoreError,
    FeatureStore,
    FeatureStoreNotFoundError,
    NotAFeatureStoreError,
    ReadOnlyStoreError,
    StoreAccessError,
)
from storage.index import (
    DamagedIndexError,
    IndexConflictError,
    IndexFormatError,
    IndexLockError,
    VideoIndex,
    verify_index,
)

DIM, FP, TFP = 6, "vis-int", "txt-int"
CLIPS, IDIM = 4, 8
PROTO = default_buffer_prototype()


def sha(i: int) -> str:
    return hashlib.sha256(f"video-{i}".encode()).hexdigest()


def feats(i: int, rows: int | None = None) -> np.ndarray:
    rows = rows if rows is not None else 3 + i % 4
    return np.random.default_rng(i).standard_normal((rows, DIM)).astype(np.float32)


def times(rows: int) -> np.ndarray:
    start = np.arange(rows) * 0.5
    return np.stack([start, start + 0.5], axis=1)


def new_store(url: str | Path, n: int = 6) -> FeatureStore:
    store = FeatureStore(url)
    store.register_extractor(FP, kind="visual", dim=DIM, config={"t": 1})
    store.register_extractor(TFP, kind="text", dim=DIM, config={"t": 2})
    for i in range(n):
        f = feats(i)
        store.write_video(sha(i), FP, f, times(len(f)), video_id=f"vid{i}")
    return store


@pytest.fixture(params=["local", "memory"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return (
        str(tmp_path / "store.zarr") if request.param == "local" else f"memory://integrity-{uuid.uuid4().hex}"
    )


@pytest.fixture(autouse=True)
def fresh_memo() -> None:
    """Every test starts with nothing remembered as checked."""
    _zarr_entries.VERIFIED.clear()


@pytest.fixture
def small_pack_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_zarr_packs, "PACK_CHUNK_BYTES", 3 * DIM * 4)


def get(store: FeatureStore | VideoIndex, key: str) -> bytes | None:
    raw = sync(_zstore(store).get(key, PROTO))
    return None if raw is None else raw.to_bytes()


def put(store: FeatureStore | VideoIndex, key: str, data: bytes) -> None:
    sync(_zstore(store).set(key, PROTO.buffer.from_bytes(data)))


def delete(store: FeatureStore | VideoIndex, key: str) -> None:
    sync(_zstore(store).delete(key))


def _zstore(store: FeatureStore | VideoIndex):  # noqa: ANN202 - a zarr Store
    return store._store if isinstance(store, FeatureStore) else store._group.store


def entry_chunk(store: FeatureStore, i: int, name: str = "features") -> str:
    marker = store._run(_zarr_entries.read_marker(store._store, "videos", FP, sha(i)))
    return f"videos/{FP}/{sha(i)}/{marker['commit']}/{name}/c/0/0"


def flip(data: bytes, at: int, n: int = 40) -> bytes:
    out = bytearray(data)
    for j in range(at, min(at + n, len(out))):
        out[j] ^= 0x5A
    return bytes(out)


def nan_patch(data: bytes, at: int = 0) -> bytes:
    return data[:at] + np.full(2, np.nan, np.float32).tobytes() + data[at + 8 :]


# --- checksums on every array -----------------------------------------------------------------------------
def codecs_of(store: FeatureStore | VideoIndex, array_path: str) -> list[str]:
    return [c["name"] for c in json.loads(get(store, f"{array_path}/zarr.json"))["codecs"]]


def test_every_array_carries_a_crc32c(url: str, tmp_path: Path) -> None:
    store = new_store(url, 2)
    store.write_queries(TFP, ["a query"], [feats(9)])
    store.pack(FP)
    entry = entry_chunk(store, 0).rsplit("/features/", 1)[0]
    pack = store._run(_zarr_packs.load_pack(store._store, "videos", FP, {}))
    assert pack is not None and pack.checksum
    for array in [f"{entry}/features", f"{entry}/times", f"packs/videos/{FP}/{pack.stage}/features"]:
        assert codecs_of(store, array) == ["bytes", "crc32c"], array
    index = VideoIndex.create(str(tmp_path / "i.zarr"), model_fingerprint="m", dim=IDIM, n_clips=CLIPS)
    for name in ("vectors", "spans", "alive"):
        assert codecs_of(index, name) == ["bytes", "crc32c"]
    for name in ("video_ids", "paths", "sha256"):
        assert codecs_of(index, name) == ["vlen-utf8", "zstd", "crc32c"]


def test_all_zero_features_are_stored_and_read_back(url: str) -> None:
    """Every chunk is written (even one equal to the fill value), so 'missing' can only mean damage."""
    store = new_store(url, 0)
    store.write_video(sha(0), FP, np.zeros((4, DIM)), times(4))
    assert get(store, entry_chunk(store, 0)) is not None
    np.testing.assert_array_equal(FeatureStore(url).read_video(sha(0), FP).features, np.zeros((4, DIM)))


# --- damaged entries --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "damage",
    [
        ("flip", lambda b: flip(b, 8)),
        ("nan", lambda b: nan_patch(b, 4)),
        ("truncate", lambda b: b[: len(b) // 2]),
        ("extend", lambda b: b + b"\0" * 8),
        ("delete", None),
    ],
    ids=lambda d: d[0],
)
def test_a_damaged_entry_chunk_is_an_error_naming_store_entry_and_chunk(url: str, damage) -> None:
    store = new_store(url, 3)
    key = entry_chunk(store, 1)
    name, mutate = damage
    if mutate is None:
        delete(store, key)
    else:
        put(store, key, mutate(get(store, key)))
    fresh = FeatureStore(url, read_only=True)
    with pytest.raises(DamagedStoreError) as err:
        fresh.read_videos(FP, [sha(0), sha(1), sha(2)])
    text = str(err.value)
    assert fresh.url in text and sha(1) in text and "'vid1'" in text and FP in text and key in text
    expected = {"flip": "crc32c", "nan": "crc32c", "truncate": "bytes where", "extend": "bytes where"}
    assert expected.get(name, "missing") in text
    assert (err.value.entry, err.value.fingerprint, err.value.key) == (sha(1), FP, key)
    np.testing.assert_array_equal(fresh.read_video(sha(2), FP).features, feats(2))  # the rest still reads


def test_a_damaged_times_chunk_and_query_chunk_are_errors_too(url: str) -> None:
    store = new_store(url, 1)
    put(store, entry_chunk(store, 0, "times"), flip(get(store, entry_chunk(store, 0, "times")), 0, 3))
    with pytest.raises(DamagedStoreError, match="times/c/0/0"):
        store.read_video(sha(0), FP)
    store.write_queries(TFP, ["q"], [feats(3)])
    qkey = feature_store.text_key("q")
    marker = store._run(_zarr_entries.read_marker(store._store, "queries", TFP, qkey))
    chunk = f"queries/{TFP}/{qkey}/{marker['commit']}/features/c/0/0"
    put(store, chunk, nan_patch(get(store, chunk)))
    with pytest.raises(DamagedStoreError, match=rf"query {qkey} of extractor {TFP}"):
        store.read_queries(TFP, ["q"])


def test_a_garbage_commit_marker_is_damage_not_a_crash(url: str) -> None:
    store = new_store(url, 2)
    put(store, f"videos/{FP}/{sha(1)}/zarr.json", b"{not json")
    with pytest.raises(DamagedStoreError, match=rf"video {sha(1)}.*not valid JSON"):
        FeatureStore(url).read_video(sha(1), FP)
    put(
        store,
        f"videos/{FP}/{sha(1)}/zarr.json",
        json.dumps(
            {"node_type": "group", "attributes": {"commit": "0" * 16 + "-" + "0" * 12, "n_rows": "three"}}
        ).encode(),
    )
    with pytest.raises(DamagedStoreError, match="n_rows 'three'"):
        FeatureStore(url).has_video(sha(1), FP)
    # the pipeline's up-front check counts it as not stored (its extraction then reports the damage), and
    # the intact video as stored
    found = FeatureStore(url).stored_video_attrs(FP, [sha(0), sha(1)])
    assert [attrs is not None for attrs in found] == [True, False]


def test_odd_but_valid_json_in_a_registration_is_damage(url: str) -> None:
    """Found by the fuzz suite: kind = [] made `kind in dict` raise TypeError."""
    store = new_store(url, 1)
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {"kind": [], "dim": DIM, "config": {}}}
    put(store, f"extractors/{FP}/zarr.json", json.dumps(doc).encode())
    with pytest.raises(DamagedStoreError, match=rf"extractor registration '{FP}' is damaged: kind \[\]"):
        FeatureStore(url, read_only=True).read_video(sha(0), FP)
    report = FeatureStore(url, read_only=True).verify()
    assert [(d.kind, d.fingerprint) for d in report.damaged] == [("extractor", FP)]


# --- packs ------------------------------------------------------------------------------------------------
def pack_chunk(store: FeatureStore, chunk: int, name: str = "features") -> str:
    pack = store._run(_zarr_packs.load_pack(store._store, "videos", FP, {}))
    return f"packs/videos/{FP}/{pack.stage}/{name}/c/{chunk}/0"


@pytest.mark.parametrize("how", ["flip", "nan", "delete", "truncate"])
def test_a_damaged_pack_chunk_names_the_entry_it_holds(url: str, small_pack_chunks: None, how: str) -> None:
    store = new_store(url, 6)
    store.pack(FP)
    key = pack_chunk(store, 2)  # rows 6..8: video 1 (rows 4..8)
    raw = get(store, key)
    if how == "delete":
        delete(store, key)
    else:
        put(store, key, {"flip": flip(raw, 0), "nan": nan_patch(raw), "truncate": raw[:10]}[how])
    fresh = FeatureStore(url, read_only=True)
    with pytest.raises(DamagedStoreError) as err:
        fresh.read_videos(FP, [sha(i) for i in range(6)])
    assert sha(1) in str(err.value) and "'vid1'" in str(err.value) and key in str(err.value)
    assert "served by pack" in str(err.value)
    for i, video in zip([0, 3, 5], fresh.read_videos(FP, [sha(0), sha(3), sha(5)]), strict=True):
        np.testing.assert_array_equal(video.features, feats(i))  # chunks without damage still read


def test_partial_pack_reads_check_a_chunk_once_and_notice_a_rewrite(
    tmp_path: Path, small_pack_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Part of a chunk is read by byte range only after the whole unchanged file was checked."""
    url = tmp_path / "store.zarr"
    store = new_store(url, 6)
    store.pack(FP)
    whole_reads = []
    payload = _zarr_entries.StoredArray.payload

    def counting(self: _zarr_entries.StoredArray, i: int, *args: object) -> np.ndarray:
        whole_reads.append((self.path.rsplit("/", 1)[-1], i))
        return payload(self, i, *args)

    monkeypatch.setattr(_zarr_entries.StoredArray, "payload", counting)
    fresh = FeatureStore(url, read_only=True)
    got = fresh.read_video(sha(1), FP)  # rows 3..8: chunks 1 (part), 2 (part)
    np.testing.assert_array_equal(got.features, feats(1))
    first = len(whole_reads)
    assert first >= 2
    fresh.read_video(sha(1), FP)
    assert len(whole_reads) == first  # checked already: byte ranges only
    key = pack_chunk(store, 2)  # read only in part above, and checked then
    put(store, key, flip(get(store, key), 0, 4))  # a rewrite: new inode and mtime
    with pytest.raises(DamagedStoreError, match=key):
        fresh.read_video(sha(1), FP)


# --- pre-checksum stores ------------------------------------------------------------------------------------
def test_a_store_written_before_checksums_still_reads_and_repacks_with_them(
    url: str, small_pack_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_zarr_entries, "CHECKSUM", False)
    store = new_store(url, 4)
    store.write_video(sha(9), FP, np.zeros((3, DIM)), times(3))  # old layout: this chunk is not stored...
    delete(store, entry_chunk(store, 9))  # ...(zarr skipped fill-valued chunks), as in real old stores
    store.pack(FP)
    assert codecs_of(store, entry_chunk(store, 0).rsplit("/c/", 1)[0]) == ["bytes"]
    monkeypatch.setattr(_zarr_entries, "CHECKSUM", True)

    fresh = FeatureStore(url)
    for i in range(4):
        np.testing.assert_array_equal(fresh.read_video(sha(i), FP).features, feats(i))
    report = fresh.verify()
    assert report.ok and report.entries == 5 and report.entries_without_checksum == 5
    assert report.packs == 1 and report.packs_without_checksum == 1
    assert fresh.pack(FP).entries == 5  # unchanged entries, but the pack is rewritten with checksums
    pack = fresh._run(_zarr_packs.load_pack(fresh._store, "videos", FP, {}))
    assert pack.checksum and codecs_of(fresh, f"packs/videos/{FP}/{pack.stage}/features") == [
        "bytes",
        "crc32c",
    ]
    np.testing.assert_array_equal(FeatureStore(url).read_video(sha(9), FP).features, np.zeros((3, DIM)))
    assert FeatureStore(url).verify().packs_without_checksum == 0


# --- verify and repair ------------------------------------------------------------------------------------
def test_verify_lists_damage_and_repair_drops_it_so_extraction_redoes_it(
    url: str, small_pack_chunks: None, capsys: pytest.CaptureFixture[str]
) -> None:
    store = new_store(url, 6)
    store.pack(FP)
    put(store, entry_chunk(store, 2), flip(get(store, entry_chunk(store, 2)), 0))  # entry's own copy
    put(store, pack_chunk(store, 0), nan_patch(get(store, pack_chunk(store, 0))))  # pack rows of video 0
    put(store, f"names/{FP}/{feature_store._name_key('vid4')}/zarr.json", b"[1, 2")

    assert cli.main(["store", "verify", url]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and f"entry videos/{FP} {sha(2)} ('vid2')" in out and "crc32c" in out
    assert "damaged pack" in out and "damaged name" in out and "--repair" in out
    assert cli.main(["store", "verify", url, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["entries"] == 6 and doc["kind"] == "feature-store"
    kinds = sorted((d["kind"], d["entry"] if d["kind"] == "entry" else None) for d in doc["damaged"])
    assert kinds == [("entry", sha(2)), ("name", None), ("pack", None)]
    pack_damage = next(d for d in doc["damaged"] if d["kind"] == "pack")
    assert pack_damage["affected"] == [sha(0)]

    assert cli.main(["store", "verify", url, "--repair"]) == 0
    out = capsys.readouterr().out
    assert "REPAIRED" in out and f"dropped videos/{FP}/{sha(2)}" in out and "rebuilt the pack" in out
    fresh = FeatureStore(url)
    assert not fresh.has_video(sha(2), FP) and fresh.resolve_video_ids(FP, ["vid2"]) == {}
    for i in (0, 1, 3, 5):  # video 0 now comes from its own intact entry (the new pack)
        np.testing.assert_array_equal(fresh.read_video(sha(i), FP).features, feats(i))
    assert cli.main(["store", "verify", url]) == 0
    assert "OK" in capsys.readouterr().out
    f = feats(2)
    fresh.write_video(sha(2), FP, f, times(len(f)), video_id="vid2")  # the next extraction writes it again
    np.testing.assert_array_equal(FeatureStore(url).read_video(sha(2), FP).features, f)


def test_verify_of_a_missing_store_is_a_user_error_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.zarr"
    assert cli.main(["store", "verify", str(missing), "--repair"]) == 2
    assert f"no feature store at {missing}" in capsys.readouterr().err
    assert not missing.exists()
    assert cli.main(["store", "verify", "--index", str(missing)]) == 2
    assert "no search index" in capsys.readouterr().err


def test_verify_on_a_read_only_store_never_writes_and_repair_is_refused(tmp_path: Path) -> None:
    url = tmp_path / "store.zarr"
    store = new_store(url, 2)
    put(store, entry_chunk(store, 0), b"x")
    before = snapshot(url)
    ro = FeatureStore(url, read_only=True)
    assert not ro.verify().ok
    with pytest.raises(ReadOnlyStoreError, match="read-only"):
        ro.verify(repair=True)
    assert snapshot(url) == before


# --- read-only opening ------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_read_only_never_creates_a_store(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "store.zarr"
    with pytest.raises(FeatureStoreNotFoundError, match=str(missing)):
        FeatureStore(missing, read_only=True)
    assert not missing.exists() and not missing.parent.exists()
    mem = f"memory://ro-{uuid.uuid4().hex}"
    with pytest.raises(FeatureStoreNotFoundError, match=mem.removeprefix("memory://")):
        FeatureStore(mem, read_only=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FeatureStoreNotFoundError, match="no zarr.json"):
        FeatureStore(empty, read_only=True)
    assert list(empty.iterdir()) == []


def test_read_only_reads_without_writing_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feature_store, "AUTO_PACK_MIN", 2)
    url = tmp_path / "store.zarr"
    new_store(url, 5)
    before = snapshot(url)
    ro = FeatureStore(url, read_only=True)
    assert ro.read_only and not ro.auto_pack and "read_only=True" in repr(ro)
    for i, video in enumerate(ro.read_videos(FP, [sha(i) for i in range(5)])):  # would auto-pack if writable
        np.testing.assert_array_equal(video.features, feats(i))
    assert ro.resolve_video_ids(FP, ["vid3"]) == {"vid3": sha(3)}
    ro.register_extractor(FP, kind="visual", dim=DIM, config={"t": 1})  # identical: fine, nothing written
    for action in (
        lambda: ro.write_video(sha(9), FP, feats(9), times(len(feats(9)))),
        lambda: ro.write_queries(TFP, ["x"], [feats(1)]),
        lambda: ro.pack(FP),
        lambda: ro.gc(),
        lambda: ro.register_extractor("new", kind="visual", dim=3, config={}),
    ):
        with pytest.raises(ReadOnlyStoreError, match=f"{url}.*read-only"):
            action()
    assert snapshot(url) == before
    import pickle

    assert pickle.loads(pickle.dumps(ro)).read_only


def test_writing_refuses_to_adopt_a_folder_that_is_not_a_store(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"not really a video")
    with pytest.raises(
        NotAFeatureStoreError, match=rf"{videos} is not empty and not a feature store.*'a.mp4'"
    ):
        FeatureStore(videos)
    assert sorted(p.name for p in videos.iterdir()) == ["a.mp4"]  # nothing written there
    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(NotAFeatureStoreError, match="is a file"):
        FeatureStore(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert FeatureStore(empty).url == str(empty)  # an empty folder becomes a store
    assert (empty / "zarr.json").is_file()
    mem = f"memory://foreign-{uuid.uuid4().hex}"
    import fsspec

    fsspec.filesystem("memory").pipe(f"{mem.removeprefix('memory://')}/data.csv", b"1,2")
    with pytest.raises(NotAFeatureStoreError, match="data.csv"):
        FeatureStore(mem)


_READ_ONLY_CHILD = """
import subprocess, sys
import numpy as np
url, fp, key, remount = sys.argv[1:5]
if remount == "1":  # inside `unshare -Urm`: make the store a read-only file system for this process only
    subprocess.run(["mount", "--bind", "-o", "ro", url, url], check=True)
from storage.feature_store import FeatureStore, ReadOnlyStoreError
store = FeatureStore(url)
assert store.read_only, "an unwritable store must open read-only"
got = store.read_videos(fp, [key])[0].features
np.save(sys.stdout.buffer, got)
try:
    store.write_video(key, fp, got, np.zeros((len(got), 2)))
except ReadOnlyStoreError as exc:
    sys.stderr.write(str(exc))
else:
    raise SystemExit("write succeeded")
"""


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


def test_a_store_without_write_permission_opens_read_only_and_reads(tmp_path: Path) -> None:
    """chmod -w (enough for a normal user); root may write anyway, so as root the store is also made a
    read-only file system, by a bind mount inside a private user+mount namespace (`unshare -Urm`)."""
    url = tmp_path / "store.zarr"
    new_store(url, 2)
    for path in [url, *url.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        command = [sys.executable, "-c", _READ_ONLY_CHILD, str(url), FP, sha(1)]
        if os.geteuid() == 0:
            if not _unshare_works():
                pytest.skip("running as root without user namespaces: cannot make a store unwritable")
            command = ["unshare", "-Urm", *command, "1"]
        else:
            command.append("0")
        repo = Path(__file__).resolve().parents[1]
        before = snapshot(url)
        proc = subprocess.run(
            command, cwd=repo, capture_output=True, timeout=120, env={**os.environ, "PYTHONPATH": str(repo)}
        )
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        import io

        np.testing.assert_array_equal(np.load(io.BytesIO(proc.stdout)), feats(1))
        assert "read-only" in proc.stderr.decode()
        assert snapshot(url) == before
    finally:
        for path in [url, *url.rglob("*")]:
            path.chmod(0o755)


# --- clear errors for unreachable object storage -----------------------------------------------------------
@pytest.fixture
def no_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never probe the instance metadata address
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))


def test_s3_without_credentials_is_one_clear_error(
    s3_bucket: tuple[str, dict[str, str]], no_aws_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket, options = s3_bucket
    anonymous = {"endpoint_url": options["endpoint_url"]}
    with pytest.raises(StoreAccessError, match=rf"{bucket}/x.*no credentials.*AWS_ACCESS_KEY_ID"):
        FeatureStore(f"{bucket}/x", storage_options=anonymous)
    args = ["store", "verify", f"{bucket}/x", "--storage-options", json.dumps(anonymous)]
    assert cli.main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("store:")]
    assert len(lines) == 1 and "no credentials" in lines[0]
    with pytest.raises(index_mod.IndexAccessError, match="no credentials"):
        VideoIndex.create(
            f"{bucket}/idx.zarr", model_fingerprint="m", dim=IDIM, n_clips=CLIPS, storage_options=anonymous
        )


def test_s3_endpoint_that_refuses_connections_is_one_clear_error_quickly(no_aws_env: None) -> None:
    with socket.socket() as s:  # a port nothing listens on (bound, then closed)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "k",
        "secret": "s",
        "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}},
    }
    started = time.monotonic()
    with pytest.raises(StoreAccessError, match=rf"s3://bucket/x.*cannot connect.*127.0.0.1:{port}"):
        FeatureStore("s3://bucket/x", storage_options=options)
    with pytest.raises(index_mod.IndexAccessError, match="cannot connect"):
        VideoIndex.open("s3://bucket/idx.zarr", storage_options=options)
    assert time.monotonic() - started < 30


def test_s3_missing_bucket_is_a_clear_error(s3_bucket: tuple[str, dict[str, str]]) -> None:
    _, options = s3_bucket
    with pytest.raises(StoreAccessError, match="bucket"):
        FeatureStore(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x", storage_options=options)


def test_read_only_store_on_s3(s3_bucket: tuple[str, dict[str, str]]) -> None:
    bucket, options = s3_bucket
    with pytest.raises(FeatureStoreNotFoundError):
        FeatureStore(f"{bucket}/none", storage_options=options, read_only=True)
    new = FeatureStore(f"{bucket}/s", storage_options=options)
    new.register_extractor(FP, kind="visual", dim=DIM, config={})
    new.write_video(sha(0), FP, feats(0), times(len(feats(0))))
    ro = FeatureStore(f"{bucket}/s", storage_options=options, read_only=True)
    np.testing.assert_array_equal(ro.read_video(sha(0), FP).features, feats(0))
    with pytest.raises(ReadOnlyStoreError):
        ro.pack(FP)


# --- index: damage, verify, repair --------------------------------------------------------------------------
def index_rows(k: int, start: int = 0, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((k, CLIPS + 1, IDIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    spans = np.tile(np.stack([np.arange(CLIPS), np.arange(CLIPS) + 1.0], 1), (k, 1, 1)).astype(np.float32)
    ids = [f"v{start + i}" for i in range(k)]
    return vectors, spans, ids, [f"/videos/{v}.mp4" for v in ids], [f"sha{start + i}" for i in range(k)]


@pytest.fixture(params=["local", "memory"])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "idx.zarr") if request.param == "local" else f"memory://idx-{uuid.uuid4().hex}.zarr"


def built_index(url: str, n: int = 10) -> tuple[VideoIndex, np.ndarray]:
    index = VideoIndex.create(url, model_fingerprint="m", dim=IDIM, n_clips=CLIPS, chunk_rows=4)
    vectors, *rest = index_rows(n)
    index.append(vectors, *rest)
    index.set_complete(True)
    return index, vectors.astype(np.float16)


@pytest.mark.parametrize("how", ["flip", "nan", "truncate", "delete"])
def test_a_damaged_vector_chunk_fails_every_read_path(index_url: str, how: str) -> None:
    index, stored = built_index(index_url)
    key = "vectors/c/1/0/0"
    raw = get(index, key)
    if how == "delete":
        delete(index, key)
    else:
        put(index, key, {"flip": flip(raw, 16), "nan": nan_patch(raw, 8), "truncate": raw[:-7]}[how])
    fresh = VideoIndex.open(index_url)
    pattern = rf"{index_url}: rows 4..7 \(videos v4, v5, v6, ...\) damaged: {key}"
    with pytest.raises(DamagedIndexError, match=pattern):
        fresh.load_vectors()
    with pytest.raises(DamagedIndexError, match=pattern):
        list(fresh.iter_vectors())
    with pytest.raises(DamagedIndexError, match=pattern):
        fresh.read_rows(np.array([5]))
    np.testing.assert_array_equal(fresh.read_rows(np.array([9, 0])), stored[[9, 0]])  # other chunks read


def test_a_missing_alive_or_ids_chunk_is_an_error_not_false_or_empty(index_url: str) -> None:
    index, _ = built_index(index_url)
    delete(index, "alive/c/0")
    with pytest.raises(
        DamagedIndexError, match=r"rows 0..3 \(videos v0, v1, v2, \.\.\.\) damaged: alive/c/0 missing"
    ):
        VideoIndex.open(index_url).rows()
    put(index, "video_ids/c/2", flip(get(index, "video_ids/c/2"), 0, 2))
    with pytest.raises(DamagedIndexError, match="video_ids/c/2 fails its crc32c"):
        VideoIndex.open(index_url).rows()


def test_index_read_rows_checks_each_chunk_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = str(tmp_path / "idx.zarr")
    writer, stored = built_index(url, 12)
    index = VideoIndex.open(url)
    whole = []
    payload = _zarr_entries.StoredArray.payload
    monkeypatch.setattr(
        _zarr_entries.StoredArray, "payload", lambda self, i, *a: whole.append(i) or payload(self, i, *a)
    )
    np.testing.assert_array_equal(index.read_rows(np.array([1, 2, 9])), stored[[1, 2, 9]])
    assert sorted(whole) == [0, 2]  # one whole read per chunk touched
    np.testing.assert_array_equal(index.read_rows(np.array([3, 8, 10])), stored[[3, 8, 10]])
    assert sorted(whole) == [0, 2]  # checked already: byte ranges only
    put(writer, "vectors/c/0/0/0", flip(get(index, "vectors/c/0/0/0"), 0, 2))  # rewritten: checked again
    with pytest.raises(DamagedIndexError, match="vectors/c/0/0/0"):
        index.read_rows(np.array([3]))


def test_index_verify_and_repair_through_the_cli(index_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    index, stored = built_index(index_url)
    put(index, "vectors/c/1/0/0", flip(get(index, "vectors/c/1/0/0"), 0))
    delete(index, "paths/c/2")
    target = (
        ["store", "verify", "--index", index_url] if "memory" in index_url else ["store", "verify", index_url]
    )
    assert cli.main(target) == 1  # a local index is found at the path without --index
    out = capsys.readouterr().out
    assert (
        "DAMAGED" in out and "vectors rows 4..7 (videos v4, v5, v6, v7)" in out and "paths rows 8..9" in out
    )
    assert cli.main([*target, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "index" and [d["key"] for d in doc["damaged"]] == ["vectors/c/1/0/0", "paths/c/2"]
    assert cli.main([*target, "--repair"]) == 0
    assert "REPAIRED" in capsys.readouterr().out
    fresh = VideoIndex.open(index_url)
    assert list(fresh.rows().alive) == [True] * 4 + [False] * 6
    np.testing.assert_array_equal(fresh.load_vectors()[:4], stored[:4])  # readable again; bad rows blank
    assert verify_index(index_url).ok
    vectors, *rest = index_rows(2, start=4, seed=5)  # the next `mamfusion index` re-adds videos
    VideoIndex.open(index_url, mode="r+").append(vectors, *rest)
    assert VideoIndex.open(index_url).count == 12


def test_an_index_whose_metadata_is_garbage_says_rebuild(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = str(tmp_path / "idx.zarr")
    built_index(url)
    (tmp_path / "idx.zarr" / "vectors" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "arr')
    report = verify_index(url)
    assert not report.ok and report.rebuild and "vectors/zarr.json" in report.rebuild
    assert cli.main(["store", "verify", "--index", url, "--repair"]) == 1
    assert "rebuild" in capsys.readouterr().out
    (tmp_path / "idx.zarr" / "zarr.json").write_text("{")
    with pytest.raises(DamagedIndexError, match="zarr.json"):
        VideoIndex.open(url)
    assert not verify_index(url).ok


def test_an_index_built_before_checksums_reads_and_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_zarr_entries, "CHECKSUM", False)
    url = str(tmp_path / "old.zarr")
    _, stored = built_index(url)
    monkeypatch.setattr(_zarr_entries, "CHECKSUM", True)
    index = VideoIndex.open(url)
    assert not index.checksummed
    np.testing.assert_array_equal(index.load_vectors(), stored)
    np.testing.assert_array_equal(index.read_rows(np.array([7, 2])), stored[[7, 2]])
    assert list(index.rows().video_ids) == [f"v{i}" for i in range(10)]
    report = index.verify()
    assert report.ok and sorted(report.arrays_without_checksum) == sorted(
        ["vectors", "spans", "video_ids", "paths", "sha256", "alive"]
    )
    assert cli.main(["store", "verify", url]) == 0
    assert "no checksum" in capsys.readouterr().out


# --- index: files, foreign folders -------------------------------------------------------------------------
def test_index_on_an_existing_file_or_foreign_folder_is_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for call in (
        lambda: VideoIndex.create(str(a_file), model_fingerprint="m", dim=IDIM, n_clips=CLIPS),
        lambda: VideoIndex.open(str(a_file)),
    ):
        with pytest.raises(IndexFormatError, match=rf"{a_file} is a file, not an index folder"):
            call()
    assert a_file.read_text() == "keep me"
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(b"v")
    with pytest.raises(IndexFormatError, match=r"exists and is not a search index \(it holds 'a.mp4'\)"):
        VideoIndex.create(str(folder), model_fingerprint="m", dim=IDIM, n_clips=CLIPS)
    with pytest.raises(IndexFormatError, match="is not a search index"):
        VideoIndex.open(str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["a.mp4"]
    group = tmp_path / "group.zarr"
    zarr.open_group(group, mode="w").attrs["x"] = 1
    with pytest.raises(IndexFormatError, match="not a search index"):
        VideoIndex.create(str(group), model_fingerprint="m", dim=IDIM, n_clips=CLIPS)
    built_index(str(tmp_path / "idx.zarr"))  # an existing index is replaced, as before
    again = VideoIndex.create(str(tmp_path / "idx.zarr"), model_fingerprint="m2", dim=IDIM, n_clips=CLIPS)
    assert again.count == 0 and VideoIndex.open(str(tmp_path / "idx.zarr")).model_fingerprint == "m2"


# --- index: concurrent appends ----------------------------------------------------------------------------
def _appender(url: str, worker: int, n_batches: int, done: str, options: dict | None) -> None:
    """Child: append its own videos batch by batch, recording each batch only after append() returned."""
    index = VideoIndex.open(url, mode="r+", storage_options=options)
    for b in range(n_batches):
        vectors, spans, ids, paths, shas = index_rows(3, start=1000 * worker + 10 * b, seed=worker * 100 + b)
        index.append(vectors, spans, ids, paths, shas)
        with open(done, "a") as f:
            f.write("\n".join(ids) + "\n")


def _run_appenders(url: str, tmp_path: Path, options: dict | None, n_batches: int) -> None:
    VideoIndex.create(
        url, model_fingerprint="m", dim=IDIM, n_clips=CLIPS, chunk_rows=4, storage_options=options
    )
    ctx = mp.get_context("spawn")
    done = [str(tmp_path / f"done-{w}.txt") for w in range(2)]
    procs = [ctx.Process(target=_appender, args=(url, w, n_batches, done[w], options)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0, f"appender exited with {p.exitcode}"
    reported = [line for d in done for line in Path(d).read_text().split()]
    assert len(reported) == 2 * n_batches * 3
    index = VideoIndex.open(url, storage_options=options)
    ids = [str(v) for v in index.rows().video_ids]
    assert sorted(ids) == sorted(reported) and index.count == len(reported)  # nothing lost, nothing doubled
    vectors = index.load_vectors()
    for w in range(2):  # and every row holds its own video's vectors
        for b in range(n_batches):
            expected = index_rows(3, start=1000 * w + 10 * b, seed=w * 100 + b)[0].astype(np.float16)
            row = ids.index(f"v{1000 * w + 10 * b}")
            np.testing.assert_array_equal(vectors[row : row + 3], expected)


def test_two_processes_appending_to_one_local_index_lose_nothing(tmp_path: Path) -> None:
    _run_appenders(str(tmp_path / "idx.zarr"), tmp_path, None, n_batches=8)


def test_two_processes_appending_to_one_s3_index_lose_nothing(
    tmp_path: Path, s3_bucket: tuple[str, dict[str, str]]
) -> None:
    bucket, options = s3_bucket
    _run_appenders(f"{bucket}/idx.zarr", tmp_path, options, n_batches=4)


def test_a_held_lock_times_out_and_a_stale_one_is_taken_over(
    s3_bucket: tuple[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, options = s3_bucket
    url = f"{bucket}/idx.zarr"
    index = VideoIndex.create(url, model_fingerprint="m", dim=IDIM, n_clips=CLIPS, storage_options=options)
    fs = index._group.store.fs
    lock = f"{index._group.store.path}.lock"
    sync(fs._pipe_file(lock, json.dumps({"token": "other", "acquired_s": time.time(), "pid": 1}).encode()))
    monkeypatch.setattr(index_mod, "LOCK_TIMEOUT_S", 0.5)
    with pytest.raises(IndexLockError, match=r"another writer holds the index lock .*idx.zarr.lock \(pid 1"):
        index.append(*index_rows(1))
    assert VideoIndex.open(url, storage_options=options).count == 0
    old = {"token": "dead", "acquired_s": time.time() - 2 * index_mod.STALE_LOCK_S}
    sync(fs._pipe_file(lock, json.dumps(old).encode()))
    index.append(*index_rows(2))
    assert VideoIndex.open(url, storage_options=options).count == 2
    assert not sync(fs._exists(lock))  # released


def test_a_lock_taken_over_mid_append_is_a_conflict_not_a_success(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"memory://conflict-{uuid.uuid4().hex}.zarr"
    index, _ = built_index(url, 2)
    writable = VideoIndex._writable

    def steal(self: VideoIndex, name: str) -> zarr.Array:
        if name == "alive":  # another writer decided our lock was stale and took it
            store = self._group.store
            body = json.dumps({"token": "thief", "acquired_s": time.time()}).encode()
            sync(store.fs._pipe_file(f"{store.path}.lock", body))
        return writable(self, name)

    monkeypatch.setattr(VideoIndex, "_writable", steal)
    with pytest.raises(IndexConflictError, match="was taken over"):
        index.append(*index_rows(1, start=5))
    assert VideoIndex.open(url).count == 2  # never committed


def test_a_read_only_index_refuses_updates(tmp_path: Path) -> None:
    url = str(tmp_path / "idx.zarr")
    built_index(url, 2)
    before = snapshot(tmp_path)
    with pytest.raises(IndexFormatError, match="opened read-only"):
        VideoIndex.open(url).append(*index_rows(1))
    assert snapshot(tmp_path) == before
    assert isinstance(DamagedIndexError("u", "k", "r"), MamFusionError)
