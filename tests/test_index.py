"""The Zarr index format (storage/index.py): commits, tombstones, streaming blocks, fingerprints, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from storage.index import (
    DamagedIndexError,
    IndexFormatError,
    IndexModelMismatchError,
    IndexNotFoundError,
    VideoIndex,
)
from tasks.scan import scan_topk

DIM, CLIPS = 8, 4


def _rows(rng: np.random.Generator, k: int, start: int = 0):
    vectors = rng.standard_normal((k, CLIPS + 1, DIM)).astype(np.float32)
    spans = np.stack([np.stack([np.arange(CLIPS), np.arange(CLIPS) + 1.0], 1)] * k).astype(np.float32)
    ids = [f"v{start + i}" for i in range(k)]
    return vectors, spans, ids, [f"/videos/{v}.mp4" for v in ids], [f"sha{start + i}" for i in range(k)]


def _new(url: str, dtype: str = "float16", chunk_rows: int = 4) -> VideoIndex:
    return VideoIndex.create(
        url, model_fingerprint="fp-a", dim=DIM, n_clips=CLIPS, dtype=dtype, chunk_rows=chunk_rows
    )


def test_append_round_trip_and_reopen(tmp_path):
    rng = np.random.default_rng(0)
    url = str(tmp_path / "idx.zarr")
    index = _new(url, "float32")
    vectors, spans, ids, paths, shas = _rows(rng, 6)
    index.append(vectors, spans, ids, paths, shas)
    index.set_complete(True)

    again = VideoIndex.open(url)
    assert (again.count, again.dim, again.n_clips, again.dtype, again.complete) == (
        6,
        DIM,
        CLIPS,
        "float32",
        True,
    )
    np.testing.assert_array_equal(again.load_vectors(), vectors)
    np.testing.assert_array_equal(again.read_spans(), spans)
    rows = again.rows()
    assert list(rows.video_ids) == ids and list(rows.paths) == paths and list(rows.sha256) == shas
    assert rows.alive.all()
    assert again.nbytes == 6 * (CLIPS + 1) * DIM * 4


def test_fp16_storage_rounds_once(tmp_path):
    rng = np.random.default_rng(1)
    index = _new(str(tmp_path / "idx.zarr"))
    vectors, *rest = _rows(rng, 3)
    index.append(vectors, *rest)
    stored = index.load_vectors()
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(stored, vectors.astype(np.float16))


def test_uncommitted_rows_are_invisible_and_overwritten(tmp_path):
    """An append killed after writing rows but before raising `count` leaves nothing a reader trusts."""
    rng = np.random.default_rng(2)
    url = str(tmp_path / "idx.zarr")
    index = _new(url)
    index.append(*_rows(rng, 3))
    group = zarr.open_group(url, mode="r+")
    for name in (
        "vectors",
        "spans",
        "video_ids",
        "paths",
        "sha256",
        "alive",
    ):  # simulate the half-done append
        group[name].resize((5, *group[name].shape[1:]))
    assert VideoIndex.open(url).count == 3
    assert len(VideoIndex.open(url).rows().video_ids) == 3

    vectors, spans, ids, paths, shas = _rows(rng, 1, start=3)
    index.append(vectors, spans, ids, paths, shas)
    reopened = VideoIndex.open(url)
    assert reopened.count == 4 and list(reopened.rows().video_ids) == ["v0", "v1", "v2", "v3"]
    np.testing.assert_array_equal(reopened.read_rows(np.array([3]))[0], vectors[0].astype(np.float16))


def test_remove_tombstones_rows(tmp_path):
    rng = np.random.default_rng(3)
    index = _new(str(tmp_path / "idx.zarr"))
    index.append(*_rows(rng, 5))
    index.remove([1, 3])
    assert list(index.rows().alive) == [True, False, True, False, True]
    assert index.count == 5


def test_iter_vectors_streams_every_committed_row_chunk_by_chunk(tmp_path):
    rng = np.random.default_rng(4)
    index = _new(str(tmp_path / "idx.zarr"), "float32", chunk_rows=4)
    vectors, *rest = _rows(rng, 11)
    index.append(vectors, *rest)
    blocks = list(index.iter_vectors(prefetch=2))
    assert [start for start, _ in blocks] == [0, 4, 8]
    assert [len(b) for _, b in blocks] == [4, 4, 3]  # the last chunk's padding is not a row
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), vectors)
    np.testing.assert_array_equal(index.load_vectors(), vectors)
    np.testing.assert_array_equal(index.read_rows(np.array([1, 9])), vectors[[1, 9]])
    assert list(_new(str(tmp_path / "empty.zarr")).iter_vectors()) == []


def test_append_shape_mismatch_is_refused(tmp_path):
    rng = np.random.default_rng(5)
    index = _new(str(tmp_path / "idx.zarr"))
    vectors, spans, ids, paths, shas = _rows(rng, 2)
    with pytest.raises(IndexFormatError, match="append of 2 videos needs vectors"):
        index.append(vectors[:, :CLIPS], spans, ids, paths, shas)
    assert index.count == 0


def test_open_errors(tmp_path):
    with pytest.raises(IndexNotFoundError, match="no search index at .*mamfusion index"):
        VideoIndex.open(str(tmp_path / "missing.zarr"))
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["format"] = "something-else"
    with pytest.raises(IndexFormatError, match="not a mamfusion-index v1 group"):
        VideoIndex.open(str(tmp_path / "other.zarr"))


def test_check_model_names_both_models(tmp_path):
    index = _new(str(tmp_path / "idx.zarr"))
    index.check_model("fp-a")
    with pytest.raises(IndexModelMismatchError, match="built by model fp-a, not by this model .fp-b"):
        index.check_model("fp-b")


def test_memory_url_works():
    rng = np.random.default_rng(6)
    index = _new("memory://test-index-memory.zarr", chunk_rows=2)
    vectors, *rest = _rows(rng, 5)
    index.append(vectors, *rest)
    reopened = VideoIndex.open("memory://test-index-memory.zarr")
    assert reopened.count == 5
    np.testing.assert_array_equal(reopened.read_rows(np.array([4, 1])), vectors[[4, 1]].astype(np.float16))


def test_read_rows_reads_scattered_rows_in_any_order(tmp_path):
    rng = np.random.default_rng(7)
    index = _new(str(tmp_path / "idx.zarr"), "float32", chunk_rows=4)
    vectors, *rest = _rows(rng, 11)
    index.append(vectors, *rest)
    rows = np.array([10, 0, 5, 5, 3, 8])  # unsorted, repeated, across chunk edges, in the short last chunk
    np.testing.assert_array_equal(index.read_rows(rows), vectors[rows])
    assert index.read_rows(np.array([], dtype=np.int64)).shape == (0, CLIPS + 1, vectors.shape[-1])
    with pytest.raises(IndexError, match=r"rows must be in \[0, 11\), got 2..11"):
        index.read_rows(np.array([2, 11]))


def test_index_on_a_loopback_s3_server(s3_bucket):
    """Create, append, tombstone, stream and read scattered rows through a real S3 API (moto on 127.0.0.1)."""
    bucket, options = s3_bucket
    url = f"{bucket}/model-a/index.zarr"
    index = VideoIndex.create(
        url, model_fingerprint="fp-a", dim=DIM, n_clips=CLIPS, chunk_rows=4, storage_options=options
    )
    vectors, *rest = _rows(np.random.default_rng(8), 10)
    index.append(vectors, *rest)
    index.remove([2])
    index.set_complete(True)
    remote = VideoIndex.open(url, storage_options=options)
    stored = vectors.astype(np.float16)
    assert remote.count == 10 and remote.complete and not remote.rows().alive[2]
    np.testing.assert_array_equal(remote.read_rows(np.array([9, 0, 5])), stored[[9, 0, 5]])
    blocks = [(start, torch.from_numpy(block.copy())) for start, block in remote.iter_vectors()]
    np.testing.assert_array_equal(np.concatenate([b.numpy() for _, b in blocks]), stored)
    query = torch.nn.functional.normalize(torch.from_numpy(vectors[4, 1:2]), dim=-1)
    alive = torch.from_numpy(remote.rows().alive)
    top = scan_topk(query, blocks, alive, 3, (0.7, 0.3))
    local = scan_topk(query, [(0, torch.from_numpy(stored))], alive, 3, (0.7, 0.3))
    assert torch.equal(top.rows, local.rows) and 2 not in top.rows[0].tolist()


def test_read_rows_reports_a_truncated_chunk(tmp_path):
    """A cut chunk fails its size and checksum check: every row in it is an error naming rows, videos and the
    chunk (not just the rows past the cut), while the other chunks still read."""
    index = _new(str(tmp_path / "idx.zarr"), "float32", chunk_rows=4)
    vectors, *rest = _rows(np.random.default_rng(9), 8)
    index.append(vectors, *rest)
    chunk = tmp_path / "idx.zarr" / "vectors" / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[: 2 * (CLIPS + 1) * DIM * 4 + 10])  # rows 4, 5 whole; row 6 cut
    np.testing.assert_array_equal(index.read_rows(np.array([1])), vectors[[1]])
    for rows in ([5], [6]):
        with pytest.raises(
            DamagedIndexError,
            match=r"idx.zarr: rows 4..7 \(videos v4, v5, v6, ...\) damaged: "
            r"vectors/c/1/0/0 holds 330 bytes where 644 were expected",
        ):
            index.read_rows(np.array(rows))
    with pytest.raises(IndexFormatError, match="vectors/c/1/0/0"):  # DamagedIndexError is an IndexFormatError
        index.load_vectors()
