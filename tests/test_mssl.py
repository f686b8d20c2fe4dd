"""MS-SL bundle import: a tiny bundle in the exact on-disk format, read back value for value."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

from flows.cli import main as cli
from storage.feature_store import FeatureStore, FeatureStoreError
from storage.mssl import BigFile, MsslFormatError, import_mssl, read_video2frames

COLL, FEAT, DIM, QDIM = "charades", "i3d_rgb_lgi", 5, 4
CAFE = "caf\xe9"  # a non-ASCII video id: both text files are ISO-8859-1
VIDEOS = {"v1": 3, "v2": 2, CAFE: 2}  # video -> rows
TRAIN = [
    "v1#enc#0 a person opens a door.",
    "v1#enc#1 someone   sits down.",  # whitespace is normalised, as read_annotations does
    "v2#enc#0 a person pours water.",
    "not a caption line",
    "v9#enc#0 a video without features.",
    f"{CAFE}#enc#0 a person eats.",
]
TEST = ["v2#enc#1 a person opens a door.", "v1#enc#2 a caption without query features."]


def row_features(video: str) -> np.ndarray:
    seed = int(hashlib.sha256(video.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).standard_normal((VIDEOS[video], DIM)).astype(np.float32)


def query_features(cap_id: str, n_tokens: int = 3) -> np.ndarray:
    seed = int(hashlib.sha256(cap_id.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).standard_normal((n_tokens, QDIM)).astype(np.float32)


def write_bundle(root: Path) -> Path:
    """The MS-SL layout: BigFile + video2frames + caption txt per split + one RoBERTa hdf5."""
    feat_dir = root / COLL / "FeatureData" / FEAT
    text_dir = root / COLL / "TextData"
    feat_dir.mkdir(parents=True)
    text_dir.mkdir(parents=True)
    names, rows, v2f = [], [], {}
    for video in VIDEOS:
        v2f[video] = [f"{video}_{k}" for k in range(VIDEOS[video])]
        names += v2f[video]
        rows.append(row_features(video))
    names.append("v3_0")  # v3 has this row but not its second one
    rows.append(np.ones((1, DIM), np.float32))
    v2f["v3"] = ["v3_0", "missing_row"]
    v2f["v4"] = []
    (feat_dir / "feature.bin").write_bytes(np.concatenate(rows).astype("<f4").tobytes())
    (feat_dir / "id.txt").write_bytes(
        ("\n".join(names[:3]) + " \t" + " ".join(names[3:])).encode("iso-8859-1")
    )
    (feat_dir / "shape.txt").write_text(f"{len(names)} {DIM}\n")
    (feat_dir / "video2frames.txt").write_bytes(repr(v2f).encode("iso-8859-1"))
    (text_dir / f"{COLL}train.caption.txt").write_text("\n".join(TRAIN) + "\n", encoding="utf-8")
    (text_dir / f"{COLL}test.caption.txt").write_text("\n".join(TEST) + "\n", encoding="utf-8")
    with h5py.File(text_dir / f"roberta_{COLL}_query_feat.hdf5", "w") as f:
        for line in TRAIN + TEST:
            cap_id = line.split()[0]
            if "#enc#" in cap_id and cap_id != "v1#enc#2":
                f[cap_id] = query_features(cap_id, n_tokens=2 + len(cap_id) % 3).astype(np.float64)
    return feat_dir


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    write_bundle(tmp_path / "bundle")
    return tmp_path / "bundle"


@pytest.fixture
def store() -> FeatureStore:
    return FeatureStore(f"memory://mssl-{uuid.uuid4().hex}")


def test_import_round_trips_values_exactly(bundle: Path, store: FeatureStore) -> None:
    report = import_mssl(bundle, COLL, FEAT, store, seconds_per_row=1.5)
    fp = f"mssl-{COLL}-{FEAT}-{DIM}"
    assert (report.visual_fingerprint, report.text_fingerprint) == (fp, f"mssl-{COLL}-roberta-{QDIM}")
    assert store.extractor_info(fp) == {
        "kind": "visual",
        "dim": DIM,
        "config": {"source": "mssl", "collection": COLL, "feature": FEAT, "seconds_per_row": 1.5},
    }
    assert store.extractor_info(report.text_fingerprint)["config"]["source"] == "mssl"

    shas = store.resolve_video_ids(fp, [*VIDEOS, "v3", "v4", "v9"])
    assert set(shas) == set(VIDEOS)
    for video, sha in shas.items():
        expected = row_features(video)
        assert sha == hashlib.sha256(expected.astype("<f4").tobytes()).hexdigest()
        got = store.read_video(sha, fp)
        np.testing.assert_array_equal(got.features, expected)
        np.testing.assert_array_equal(got.times[:, 0], np.arange(VIDEOS[video]) * 1.5)
        np.testing.assert_array_equal(got.times[:, 1], np.arange(1, VIDEOS[video] + 1) * 1.5)
        assert got.attrs["video_id"] == video and got.attrs["source"] == "mssl"

    texts = {
        "v1#enc#0": "a person opens a door.",
        "v1#enc#1": "someone sits down.",
        f"{CAFE}#enc#0": "a person eats.",
    }
    got_q = store.read_queries(report.text_fingerprint, list(texts.values()))
    for cap_id, array in zip(texts, got_q, strict=True):
        np.testing.assert_array_equal(array, query_features(cap_id, n_tokens=2 + len(cap_id) % 3))


def test_import_reports_everything_it_left_out(bundle: Path, store: FeatureStore) -> None:
    report = import_mssl(bundle, COLL, FEAT, store)
    assert report.videos_imported == 3
    skipped = {s["video_id"]: s["reason"] for s in report.videos_skipped}
    assert skipped == {"v3": "1 of 2 rows missing from id.txt (first: 'missing_row')", "v4": skipped["v4"]}
    assert "no rows" in skipped["v4"]
    assert [s["query_id"] for s in report.queries_skipped] == ["v1#enc#2"]
    assert "no dataset" in report.queries_skipped[0]["reason"]
    assert report.captions_without_video == [{"query_id": "v9#enc#0", "video_id": "v9"}]
    assert [(c["query_id"], c["kept"]) for c in report.text_conflicts] == [("v2#enc#1", "v1#enc#0")]
    assert [s["line"] for s in report.caption_lines_skipped] == [4]
    assert report.splits == {"train": {"queries": 5, "videos": 4}, "test": {"queries": 2, "videos": 2}}
    assert report.queries_imported == 5  # 6 captions with features, two of them share a text
    assert store.pack(report.visual_fingerprint).entries == 3  # the import packed already: nothing to redo


def test_reimport_writes_nothing_new(bundle: Path, store: FeatureStore) -> None:
    import_mssl(bundle, COLL, FEAT, store)
    again = import_mssl(bundle / COLL, COLL, FEAT, store)  # the collection folder works as ROOT too
    assert (again.videos_imported, again.videos_already_present) == (0, 3)
    assert (again.queries_imported, again.queries_already_present) == (0, 5)


def test_bigfile_reader(bundle: Path) -> None:
    bigfile = BigFile.open(bundle / COLL / "FeatureData" / FEAT)
    assert bigfile.dim == DIM and bigfile.names[-1] == "v3_0" and f"{CAFE}_1" in bigfile.names
    np.testing.assert_array_equal(
        bigfile.read_rows([3, 0]), row_features("v2")[:1].tolist() + row_features("v1")[:1].tolist()
    )


@pytest.mark.parametrize(
    ("file", "content", "blamed", "match"),
    [
        ("shape.txt", b"8\n", "shape.txt", "first line must be 'N D'"),
        ("shape.txt", b"9 5\n", "id.txt", "has 8 names but shape.txt says 9 rows"),
        ("id.txt", b"a b c d e f g a", "id.txt", "'a' appears twice"),
        ("feature.bin", b"\0" * 12, "feature.bin", r"has 12 bytes; shape.txt's 8 x 5 float32 needs 160"),
        ("video2frames.txt", b"{'v1': ['v1_0'],", "video2frames.txt", "not a Python dict literal"),
        ("video2frames.txt", b"['v1_0']", "video2frames.txt", "must hold a dict"),
        ("video2frames.txt", b"{'v1': 'v1_0'}", "video2frames.txt", "entry 'v1' must map"),
    ],
)
def test_malformed_files_are_named(
    bundle: Path, store: FeatureStore, file: str, content: bytes, blamed: str, match: str
) -> None:
    folder = bundle / COLL / "FeatureData" / FEAT
    (folder / file).write_bytes(content)
    with pytest.raises(MsslFormatError, match=match) as err:
        import_mssl(bundle, COLL, FEAT, store)
    assert err.value.path == str(folder / blamed)


def test_video2frames_is_never_evaluated(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "video2frames.txt"
    path.write_text(f"{{'v': __import__('pathlib').Path({str(marker)!r}).touch()}}")
    with pytest.raises(MsslFormatError, match="not a Python dict literal"):
        read_video2frames(path)
    assert not marker.exists()


def test_missing_bundle_parts(bundle: Path, store: FeatureStore) -> None:
    with pytest.raises(MsslFormatError, match=rf"feature folder not found \(found: {FEAT}\)"):
        import_mssl(bundle, COLL, "i3d", store)
    (bundle / COLL / "TextData" / f"roberta_{COLL}_query_feat.hdf5").unlink()
    with pytest.raises(MsslFormatError, match="query feature file not found"):
        import_mssl(bundle, COLL, FEAT, store)
    with pytest.raises(ValueError, match="unknown MS-SL collection"):
        import_mssl(bundle, "msrvtt", FEAT, store)


def test_cli_json(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"memory://mssl-cli-{uuid.uuid4().hex}"
    args = ["import-mssl", str(bundle), "--collection", COLL, "--feature", FEAT, "--store", url]
    assert cli([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["videos_imported"] == 3 and out["visual_fingerprint"] == f"mssl-{COLL}-{FEAT}-{DIM}"
    assert len(out["videos_skipped"]) == 2 and out["store"] == url
    assert cli(args) == 0
    assert "videos: 0 imported, 3 already present, 2 skipped" in capsys.readouterr().out
    assert cli([*args[:5], "i3d", *args[6:]]) == 1
    assert "bad bundle" in capsys.readouterr().err


def test_dimension_clash_with_an_existing_fingerprint(bundle: Path, store: FeatureStore) -> None:
    store.register_extractor(f"mssl-{COLL}-{FEAT}-{DIM}", kind="visual", dim=DIM, config={"source": "other"})
    with pytest.raises(FeatureStoreError, match="already registered with a different config"):
        import_mssl(bundle, COLL, FEAT, store)
