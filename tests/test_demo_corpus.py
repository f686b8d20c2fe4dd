"""The demo corpus: deterministic, decodable, and its captions say what the pixels show."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import decord
import numpy as np
import pydantic
import pytest

from flows.cli import main as cli_main
from storage.demo_corpus import (
    COLOURS,
    GAP_COLOUR,
    MOTIONS,
    SHAPES,
    DemoCorpus,
    DemoCorpusConfig,
    DemoCorpusError,
    DemoEvent,
    assign_splits,
    generate_demo_corpus,
)

N_VIDEOS = 6


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DemoCorpus]:
    root = tmp_path_factory.mktemp("demo")
    return {
        "a": generate_demo_corpus(root / "a", n_videos=N_VIDEOS, seed=0),
        "a_again": generate_demo_corpus(root / "a_again", n_videos=N_VIDEOS, seed=0),
        "other_seed": generate_demo_corpus(root / "other_seed", n_videos=N_VIDEOS, seed=1),
    }


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _frames(path: str) -> np.ndarray:
    reader = decord.VideoReader(path)
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def _csv_rows(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda name: np.linalg.norm(np.subtract(COLOURS[name], rgb)))


def _event_frames(frames: np.ndarray, event: DemoEvent) -> np.ndarray:
    return frames[event.first_frame : event.first_frame + event.n_frames]


def _shape_pixels(frame: np.ndarray, colour: str) -> np.ndarray:
    """Boolean mask of the pixels within compression error of `colour`."""
    return np.abs(frame.astype(int) - COLOURS[colour]).max(axis=-1) < 40


def test_same_seed_gives_identical_bytes(corpora: dict[str, DemoCorpus]) -> None:
    a, again = corpora["a"], corpora["a_again"]
    assert Path(a.annotations_path).read_bytes() == Path(again.annotations_path).read_bytes()
    assert Path(a.manifest_path).read_bytes() == Path(again.manifest_path).read_bytes()
    assert [_sha(v.path) for v in a.videos] == [_sha(v.path) for v in again.videos]
    np.testing.assert_array_equal(_frames(a.videos[0].path), _frames(again.videos[0].path))


def test_different_seed_gives_a_different_corpus(corpora: dict[str, DemoCorpus]) -> None:
    a, other = corpora["a"], corpora["other_seed"]
    assert Path(a.annotations_path).read_bytes() != Path(other.annotations_path).read_bytes()
    assert all(_sha(x.path) != _sha(y.path) for x, y in zip(a.videos, other.videos, strict=True))


def test_more_videos_extend_a_smaller_corpus(corpora: dict[str, DemoCorpus], tmp_path: Path) -> None:
    """Video i depends only on (seed, i): a bigger corpus keeps the smaller one's files (cache hits)."""
    small = generate_demo_corpus(tmp_path / "small", n_videos=2, seed=0)
    assert [_sha(v.path) for v in small.videos] == [_sha(v.path) for v in corpora["a"].videos[:2]]


def test_videos_decode_with_the_stated_length_and_rate(corpora: dict[str, DemoCorpus]) -> None:
    corpus = corpora["a"]
    cfg = corpus.config
    for video in corpus.videos:
        reader = decord.VideoReader(video.path)
        assert len(reader) == video.n_frames
        assert reader.get_avg_fps() == pytest.approx(cfg.fps)
        assert video.duration == pytest.approx(video.n_frames / cfg.fps)
        assert reader[0].shape == (cfg.height, cfg.width, 3)
        last_start, last_end = reader.get_frame_timestamp(len(reader) - 1)
        assert last_end == pytest.approx(video.duration, abs=1e-6)
        assert Path(video.path).stem == video.video_id


def test_catalog_sees_the_videos_and_a_regeneration_changes_nothing(tmp_path: Path) -> None:
    """Stable bytes mean stable sha256s, so regenerating the corpus never invalidates extracted features."""
    from storage.catalog import scan_videos

    corpus = generate_demo_corpus(tmp_path / "c", n_videos=3, seed=5)
    first = scan_videos(corpus.videos_dir)
    assert sorted(v.video_id for v in first.catalog.readable()) == [v.video_id for v in corpus.videos]
    for video in corpus.videos:
        record = first.catalog.get(video.video_id)
        assert (record.n_frames, record.width, record.height) == (video.n_frames, 160, 160)
        assert record.duration == pytest.approx(video.duration, abs=0.11)
    generate_demo_corpus(tmp_path / "c", n_videos=3, seed=5)
    again = scan_videos(corpus.videos_dir, previous=first.catalog, rehash=True)
    assert sorted(again.unchanged) == [v.video_id for v in corpus.videos]
    assert again.new == again.changed == again.removed == []


def test_annotation_file_matches_the_corpus(corpora: dict[str, DemoCorpus]) -> None:
    corpus = corpora["a"]
    rows = _csv_rows(corpus.annotations_path)
    assert list(rows[0]) == ["video_id", "start", "end", "caption", "split"]
    expected = [(v.video_id, e.start, e.end, e.caption, v.split) for v in corpus.videos for e in v.events]
    got = [(r["video_id"], float(r["start"]), float(r["end"]), r["caption"], r["split"]) for r in rows]
    assert got == expected
    assert len(rows) == corpus.n_queries


def test_annotation_file_reads_with_our_reader(corpora: dict[str, DemoCorpus]) -> None:
    from storage.annotations import read_annotations

    corpus = corpora["a"]
    annotations = read_annotations(corpus.annotations_path)
    assert annotations.skipped == []
    assert annotations.video_ids() == [v.video_id for v in corpus.videos]
    first = corpus.videos[0]
    q = annotations.queries[1]
    assert (q.query_id, q.video_id, q.text) == (
        f"{first.video_id}#enc#1",
        first.video_id,
        first.events[1].caption,
    )
    assert (q.start, q.end, q.split) == (first.events[1].start, first.events[1].end, first.split)
    for split in ("train", "val", "test"):
        ids = {v.video_id for v in corpus.videos if v.split == split}
        assert set(annotations.split(split).video_ids()) == ids


def test_events_lie_inside_their_video_in_order_without_overlap(corpora: dict[str, DemoCorpus]) -> None:
    for video in corpora["a"].videos:
        cfg = corpora["a"].config
        assert cfg.min_events <= len(video.events) <= cfg.max_events
        previous_end = 0.0
        for event in video.events:
            assert previous_end <= event.start < event.end <= video.duration
            assert event.start == pytest.approx(event.first_frame / cfg.fps)
            assert event.end == pytest.approx((event.first_frame + event.n_frames) / cfg.fps)
            previous_end = event.end


def test_captions_name_what_is_drawn_and_differ_within_a_video(corpora: dict[str, DemoCorpus]) -> None:
    for video in corpora["a"].videos:
        for event in video.events:
            words = event.caption.replace(",", "").split()
            assert {event.colour, event.shape, event.background} <= set(words)
            assert event.motion in event.caption
            assert event.colour != event.background
            assert event.shape in SHAPES and event.motion in MOTIONS
        backgrounds = [e.background for e in video.events]
        assert len(set(backgrounds)) == len(backgrounds)
        colours = [e.colour for e in video.events]
        assert all(x != y for x, y in zip(colours, colours[1:], strict=False))


def test_pixels_show_the_captioned_colours(corpora: dict[str, DemoCorpus]) -> None:
    """The learnability check: an event's frames look like its caption and unlike the other events."""
    for video in corpora["a"].videos:
        frames = _frames(video.path)
        means = []
        for event in video.events:
            clip = _event_frames(frames, event)
            assert _nearest_colour(np.median(clip.reshape(-1, 3), axis=0)) == event.background
            shown = [_shape_pixels(f, event.colour).mean() for f in clip]
            assert max(shown) > 0.02  # the shape is really there (blinking shapes only half the time)
            means.append(clip.reshape(-1, 3).mean(axis=0))
        for i in range(len(means)):
            for j in range(i + 1, len(means)):
                assert np.linalg.norm(means[i] - means[j]) > 40
        covered = {f for e in video.events for f in range(e.first_frame, e.first_frame + e.n_frames)}
        for gap in sorted(set(range(video.n_frames)) - covered):
            assert np.abs(frames[gap].reshape(-1, 3).mean(axis=0) - GAP_COLOUR).max() < 10


def test_pixels_show_the_captioned_motion(corpora: dict[str, DemoCorpus]) -> None:
    axis_sign = {"moves left": (1, -1), "moves right": (1, 1), "moves up": (0, -1), "moves down": (0, 1)}
    checked = set()
    for video in corpora["a"].videos:
        frames = _frames(video.path)
        for event in video.events:
            clip = _event_frames(frames, event)
            first, last = _shape_pixels(clip[0], event.colour), _shape_pixels(clip[-1], event.colour)
            if event.motion in axis_sign:
                axis, sign = axis_sign[event.motion]
                moved = np.nonzero(last)[axis].mean() - np.nonzero(first)[axis].mean()
                assert sign * moved > 0.3 * clip.shape[1 + axis]
            elif event.motion in ("grows", "shrinks"):
                change = last.sum() - first.sum()
                assert change > 0 if event.motion == "grows" else change < 0
            checked.add(event.motion)
    assert len(checked) >= 4


def test_splits_are_by_video_and_sized_by_fraction() -> None:
    splits = assign_splits(48, (0.7, 0.15, 0.15), seed=0)
    assert {s: splits.count(s) for s in ("train", "val", "test")} == {"train": 34, "val": 7, "test": 7}
    assert splits == assign_splits(48, (0.7, 0.15, 0.15), seed=0)
    assert splits != assign_splits(48, (0.7, 0.15, 0.15), seed=1)
    assert sorted(assign_splits(3, (0.7, 0.15, 0.15), seed=0)) == ["test", "train", "val"]
    assert assign_splits(2, (0.7, 0.15, 0.15), seed=0) == ["train", "train"]
    assert assign_splits(3, (0.0, 0.5, 0.5), seed=0).count("train") == 0


def test_every_video_has_one_split(corpora: dict[str, DemoCorpus]) -> None:
    split_of: dict[str, set[str]] = {}
    for row in _csv_rows(corpora["a"].annotations_path):
        split_of.setdefault(row["video_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in split_of.values())
    assert {next(iter(s)) for s in split_of.values()} == {"train", "val", "test"}


def test_regenerating_in_place_replaces_the_old_corpus(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    generate_demo_corpus(out, n_videos=4, seed=0)
    smaller = generate_demo_corpus(out, n_videos=2, seed=3)
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["demo0000.mp4", "demo0001.mp4"]
    assert json.loads(Path(smaller.manifest_path).read_text())["config"]["seed"] == 3


def test_a_folder_with_other_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DemoCorpusError, match="not empty"):
        generate_demo_corpus(tmp_path, n_videos=1)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_invalid_sizes_fail_with_the_field_name(tmp_path: Path) -> None:
    with pytest.raises(DemoCorpusError, match="min_events"):
        generate_demo_corpus(tmp_path, n_videos=1, min_events=4, max_events=2)
    with pytest.raises(DemoCorpusError, match="width: Input should be a multiple of 2"):
        generate_demo_corpus(tmp_path, n_videos=1, width=161)
    with pytest.raises(pydantic.ValidationError, match="n_videos"):  # the config class itself stays pydantic
        DemoCorpusConfig(n_videos=0)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_cli_prints_one_json_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert cli_main(["demo-corpus", str(out), "--videos", "3", "--seed", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["videos"] == 3
    assert summary["splits"] == {"train": 1, "val": 1, "test": 1}
    assert summary["queries"] == len(_csv_rows(summary["annotations"]))
    assert sorted(p.name for p in Path(summary["videos_dir"]).iterdir()) == [
        f"demo000{i}.mp4" for i in range(3)
    ]


def _user_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Exit 2 with one line on stderr and no traceback."""
    assert cli_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("demo-corpus: ")
    return captured.err


def test_cli_refuses_a_foreign_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.txt").write_text("x")
    assert "not empty" in _user_error(capsys, ["demo-corpus", str(tmp_path), "--videos", "1"])


def test_cli_refuses_an_existing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    err = _user_error(capsys, ["demo-corpus", str(target), "--videos", "1"])
    assert f"{target}: is a file, not a folder" in err
    assert target.read_text() == "mine"
    under_a_file = target / "corpus"
    assert "cannot write the demo corpus" in _user_error(capsys, ["demo-corpus", str(under_a_file)])


def test_cli_refuses_invalid_sizes_and_foreign_manifests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _user_error(capsys, ["demo-corpus", str(tmp_path / "a"), "--videos", "0"])
    assert "n_videos: Input should be greater than or equal to 1" in err
    for body in ("{not json", json.dumps({"videos": [{"file": "../../etc/passwd"}]}), "[" * 100_000):
        folder = tmp_path / "foreign"
        folder.mkdir(exist_ok=True)
        (folder / "corpus.json").write_text(body)
        assert "not a demo corpus manifest" in _user_error(capsys, ["demo-corpus", str(folder)])
