"""Video catalog: real videos, ids, re-scans, unreadable files and a decoder that hangs or crashes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest

from storage.catalog import (
    Catalog,
    CatalogError,
    UnknownVideoError,
    VideoFolderError,
    VideoProbe,
    VideoProber,
    VideoRecord,
    assign_video_ids,
    base_video_id,
    clean_reason,
    frame_times,
    scan_videos,
    sha256_file,
)
from storage.errors import MamFusionError

# README of realdata: (frames, fps, width, height as decoded, sha256 prefix)
REAL = {
    "v_GGSY1Qvo990": (355, 19.62, 320, 240, "e186821a0b8b5b45"),
    "v_ZNVhz7ctTq0": (420, 30.0, 480, 360, "1145ead9fa5be134"),
    "flipping_a_pancake": (310, 30.0, 426, 240, "56279fa0f498d4fe"),
    "eye_makeup_mpeg4": (164, 25.0, 320, 240, "cc3ebb11e80d2900"),
    "big_buck_bunny_vp8": (720, 24.0, 1280, 720, "3f75b7340272df50"),
    "carphone_176x144": (120, 29.97, 176, 144, "1c4add7838b07b4d"),
    "rotated_90": (
        3,
        30.0,
        320,
        568,
        "74bc38162a7b56fa",
    ),  # coded 568x320, flagged 90°: decord shows portrait
}


@pytest.fixture(scope="module")
def real_scan(realdata):
    return scan_videos(realdata / "videos")


def test_real_videos_all_listed_with_stream_facts(real_scan, realdata):
    catalog = real_scan.catalog
    assert {v.video_id for v in catalog.videos} == set(REAL) | {"corrupted"}
    assert catalog.root == str(realdata / "videos")
    for video_id, (frames, fps, width, height, sha_prefix) in REAL.items():
        video = catalog.get(video_id)
        assert video.readable, video.error
        assert (video.n_frames, video.width, video.height) == (frames, width, height), video_id
        assert video.fps == pytest.approx(fps, abs=0.01)
        assert video.duration == pytest.approx(frames / fps, rel=0.02)
        assert video.sha256.startswith(sha_prefix)
        assert video.size == os.path.getsize(video.path)
    assert real_scan.new == [v.video_id for v in catalog.videos]


def test_corrupted_video_is_recorded_with_its_error(real_scan):
    corrupted = real_scan.catalog.get("corrupted")
    assert not corrupted.readable
    assert [v.video_id for v in real_scan.catalog.unreadable()] == ["corrupted"]
    assert "frame 49 of 50 does not decode" in corrupted.error
    assert corrupted.sha256.startswith("1c7705ef2be3e85d")  # still hashed: a changed file is still noticed
    assert corrupted.n_frames == 50


def test_sha256_file_matches_hashlib(tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    assert sha256_file(blob) == hashlib.sha256(blob.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "rel_path, expected",
    [
        ("clip.mp4", "clip"),
        ("a/b/clip.MP4", "a__b__clip"),
        ("my video (1).mkv", "my_video_1_"),
        ("café.webm", "cafe"),
        ("视频.mp4", "_"),
        ("a..b.mp4", "a.b"),
        ("...mp4", "_"),
        (".hidden.mov", "_hidden"),
        ("-rf.avi", "_rf"),
    ],
)
def test_base_video_id_is_a_safe_store_key(rel_path, expected):
    assert base_video_id(rel_path) == expected
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", expected) and ".." not in expected


def test_colliding_ids_are_disambiguated_deterministically():
    rels = ["a b.mp4", "a_b.mp4", "clip.mkv", "clip.mp4", "x/clip.mp4", "y/clip.mp4", "solo.mp4"]
    ids = assign_video_ids(rels)
    assert len(set(ids.values())) == len(rels)
    assert ids["solo.mp4"] == "solo"
    assert (ids["x/clip.mp4"], ids["y/clip.mp4"]) == ("x__clip", "y__clip")
    for rel in ("a b.mp4", "a_b.mp4", "clip.mkv", "clip.mp4"):
        assert re.fullmatch(re.escape(base_video_id(rel)) + r"-[0-9a-f]{8}", ids[rel]), ids[rel]
    assert assign_video_ids(list(reversed(rels))) == ids


def test_hashed_id_never_takes_another_files_name():
    clip_hashed = assign_video_ids(["clip.mp4", "clip.mkv"])["clip.mp4"]
    ids = assign_video_ids(["clip.mp4", "clip.mkv", f"{clip_hashed}.mp4"])
    assert ids[f"{clip_hashed}.mp4"] == clip_hashed
    assert len(set(ids.values())) == 3


@pytest.fixture
def small_folder(tmp_path, realdata):
    """Two small real videos in a nested folder, copied so that tests may change them."""
    root = tmp_path / "videos"
    (root / "sub").mkdir(parents=True)
    shutil.copy2(realdata / "videos" / "rotated_90.mov", root / "rotated_90.mov")
    shutil.copy2(realdata / "videos" / "eye_makeup_mpeg4.avi", root / "sub" / "eye.avi")
    (root / "notes.txt").write_text("not a video")
    return root


def test_same_stem_in_two_folders_and_two_containers(tmp_path, realdata):
    root = tmp_path / "v"
    for rel in ("a/clip.mp4", "b/clip.mp4", "clip.mp4", "clip.mov"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(realdata / "videos" / "rotated_90.mov")
    first = scan_videos(root).catalog
    ids = [v.video_id for v in first.videos]
    assert len(set(ids)) == 4 and {"a__clip", "b__clip"} <= set(ids)
    assert all(v.readable for v in first.videos)
    assert [v.video_id for v in scan_videos(root).catalog.videos] == ids
    with pytest.raises(UnknownVideoError, match="ambiguous"):
        first.resolve("clip")


def test_rescan_keeps_the_id_a_file_already_had(tmp_path, realdata):
    root = tmp_path / "v"
    root.mkdir()
    (root / "clip.mp4").symlink_to(realdata / "videos" / "rotated_90.mov")
    before = scan_videos(root).catalog
    (root / "clip.mkv").symlink_to(realdata / "videos" / "rotated_90.mov")
    after = scan_videos(root, before)
    assert after.catalog.get("clip").rel_path == "clip.mp4"
    assert after.unchanged == ["clip"] and len(after.new) == 1 and after.new[0].startswith("clip-")


def test_ids_survive_their_collision_going_away_and_unsafe_old_ids_are_dropped():
    both = assign_video_ids(["clip.mp4", "clip.mkv"])
    previous = Catalog("/v", [_record(rel, vid) for rel, vid in both.items()])
    assert assign_video_ids(["clip.mp4"], previous) == {"clip.mp4": both["clip.mp4"]}
    # a new file whose plain id an old file already holds gets a hashed one
    previous = Catalog("/v", [_record("a.mp4", "b"), _record("x.mp4", "../x")])
    ids = assign_video_ids(["a.mp4", "b.mp4", "x.mp4"], previous)
    assert ids["a.mp4"] == "b" and ids["b.mp4"].startswith("b-") and ids["x.mp4"] == "x"


def _record(rel_path: str, video_id: str) -> VideoRecord:
    return VideoRecord(
        video_id, f"/v/{rel_path}", rel_path, 1, 1, "0" * 64, None, None, None, None, None, None
    )


def test_rescan_reports_new_changed_removed_unchanged(small_folder, realdata, tmp_path):
    first = scan_videos(small_folder)
    assert first.new == ["rotated_90", "sub__eye"]
    saved = tmp_path / "catalog.json"
    first.catalog.save(saved)
    previous = Catalog.load(saved)
    assert previous == first.catalog

    shutil.copy2(realdata / "videos" / "carphone_176x144.mp4", small_folder / "sub" / "new.MP4")
    shutil.copyfile(realdata / "videos" / "flipping_a_pancake.mkv", small_folder / "rotated_90.mov")
    (small_folder / "sub" / "eye.avi").unlink()
    second = scan_videos(small_folder, previous)
    assert second.new == ["sub__new"]
    assert second.changed == ["rotated_90"]
    assert second.removed == ["sub__eye"]
    assert second.unchanged == []
    assert second.catalog.get("rotated_90").n_frames == 310  # re-probed: it is the pancake clip now

    third = scan_videos(small_folder, second.catalog)
    assert (third.new, third.changed, third.removed) == ([], [], [])
    assert third.unchanged == ["rotated_90", "sub__new"]


class CountingProber:
    """Stands in for the decord worker where a test only needs to know whether probing happened."""

    def __init__(self):
        self.paths: list[str] = []

    def probe(self, path: str) -> VideoProbe:
        self.paths.append(path)
        return VideoProbe(1.0, 10.0, 10, 8, 8)


def test_unchanged_files_are_neither_rehashed_nor_reprobed_unless_asked(small_folder):
    first = scan_videos(small_folder, prober=CountingProber())
    # Same size, same mtime, different bytes: only rehash=True can notice.
    target = small_folder / "rotated_90.mov"
    stat = target.stat()
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    prober = CountingProber()
    lazy = scan_videos(small_folder, first.catalog, prober=prober)
    assert prober.paths == [] and lazy.changed == []
    assert lazy.catalog.get("rotated_90").sha256 == first.catalog.get("rotated_90").sha256

    prober = CountingProber()
    strict = scan_videos(small_folder, first.catalog, rehash=True, prober=prober)
    assert strict.changed == ["rotated_90"] and strict.unchanged == ["sub__eye"]
    assert len(prober.paths) == 2


def test_touched_but_identical_file_is_unchanged_and_not_reprobed(small_folder):
    first = scan_videos(small_folder, prober=CountingProber())
    os.utime(small_folder / "sub" / "eye.avi", ns=(1, 1))
    prober = CountingProber()
    again = scan_videos(small_folder, first.catalog, prober=prober)
    assert again.unchanged == ["rotated_90", "sub__eye"] and prober.paths == []
    assert again.catalog.get("sub__eye").mtime_ns == 1


def test_unreadable_files_are_recorded_never_dropped(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "text.mp4").write_text("this is not a video\n")
    (root / "empty.mkv").write_bytes(b"")
    (root / "dangling.webm").symlink_to(tmp_path / "missing.webm")
    catalog = scan_videos(root).catalog
    assert [v.video_id for v in catalog.videos] == ["dangling", "empty", "text"]
    assert catalog.readable() == []
    assert "cannot stat" in catalog.get("dangling").error
    assert "Invalid data" in catalog.get("text").error  # the decoder's reason, not only decord's bare message
    assert catalog.get("text").sha256 == hashlib.sha256(b"this is not a video\n").hexdigest()
    assert catalog.get("empty").error
    assert all(v.error.isprintable() for v in catalog.videos)  # no NULs from the decoder log


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(NotADirectoryError, match="does not exist"):
        scan_videos(tmp_path / "nope")


FAKE_WORKER = """
import json, os, signal, sys, time
for line in sys.stdin:
    name = os.path.basename(json.loads(line))
    if "hang" in name:
        time.sleep(60)
    if "garbage" in name:
        print("this is not JSON", flush=True)
        continue
    if "crash" in name:
        print("fake decoder: about to crash", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)
    print(json.dumps({"duration": 2.0, "fps": 5.0, "n_frames": 10, "width": 4, "height": 3, "error": None}),
          flush=True)
"""


def test_prober_survives_a_hanging_and_a_crashing_decoder(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(FAKE_WORKER)
    with VideoProber(timeout=1.0, command=[sys.executable, str(script)]) as prober:
        assert prober.probe("/v/ok1.mp4") == VideoProbe(2.0, 5.0, 10, 4, 3)
        hung = prober.probe("/v/hang.mp4")
        assert "timed out after 1 s" in hung.error
        assert prober.probe("/v/ok2.mp4").error is None
        crashed = prober.probe("/v/crash.mp4")
        assert "crashed (SIGSEGV)" in crashed.error and "about to crash" in crashed.error
        assert prober.probe("/v/ok3.mp4").n_frames == 10
        assert "malformed reply" in prober.probe("/v/garbage.mp4").error
        assert prober.probe("/v/ok4.mp4").error is None


def test_scan_records_a_crashing_decoder_and_goes_on(tmp_path, realdata):
    script = tmp_path / "worker.py"
    script.write_text(FAKE_WORKER)
    root = tmp_path / "v"
    root.mkdir()
    for name in ("a.mp4", "crash.mp4", "z.mp4"):
        (root / name).symlink_to(realdata / "videos" / "rotated_90.mov")
    with VideoProber(timeout=5.0, command=[sys.executable, str(script)]) as prober:
        catalog = scan_videos(root, prober=prober).catalog
    assert [v.readable for v in catalog.videos] == [True, False, True]


def test_resolve_exact_id_then_unique_stem(small_folder):
    catalog = scan_videos(small_folder, prober=CountingProber()).catalog
    assert catalog.resolve("sub__eye").rel_path == "sub/eye.avi"
    assert catalog.resolve("eye").video_id == "sub__eye"
    with pytest.raises(UnknownVideoError, match="no video with id or file stem 'nope'"):
        catalog.resolve("nope")
    with pytest.raises(UnknownVideoError, match="no video with id 'eye'"):
        catalog.get("eye")


def test_save_is_atomic_and_load_names_bad_fields(small_folder, tmp_path):
    catalog = scan_videos(small_folder, prober=CountingProber()).catalog
    out = tmp_path / "out" / "catalog.json"
    out.parent.mkdir()
    catalog.save(out)
    catalog.save(out)  # replacing an existing file works too
    assert [p.name for p in out.parent.iterdir()] == ["catalog.json"]
    data = json.loads(out.read_text())
    data["videos"][1]["n_frames"] = "ten"
    out.write_text(json.dumps(data))
    with pytest.raises(CatalogError, match=r"videos\[1\]\.n_frames"):
        Catalog.load(out)
    out.write_text("{not json")
    with pytest.raises(CatalogError, match="not valid JSON"):
        Catalog.load(out)
    out.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CatalogError, match="not a MamFusion catalog"):
        Catalog.load(out)


def test_reported_size_is_the_display_orientation(real_scan, realdata):
    av = pytest.importorskip("av")
    with av.open(str(realdata / "videos" / "rotated_90.mov")) as container:
        frame = next(container.decode(video=0))
        coded, rotation = (frame.width, frame.height), frame.rotation
    assert abs(rotation) == 90 and coded == (568, 320)
    video = real_scan.catalog.get("rotated_90")
    assert (video.width, video.height) == (coded[1], coded[0])


def test_unreadable_files_are_probed_again_on_the_next_scan(small_folder):
    class FailingProber(CountingProber):
        def probe(self, path: str) -> VideoProbe:
            super().probe(path)
            return VideoProbe(error="probing timed out after 1 s (decoder hung)")

    first = scan_videos(small_folder, prober=FailingProber())
    assert first.catalog.readable() == []
    prober = CountingProber()
    second = scan_videos(small_folder, first.catalog, prober=prober)
    assert len(prober.paths) == 2 and len(second.catalog.readable()) == 2
    assert second.unchanged == ["rotated_90", "sub__eye"]  # same bytes: only the probe is new


def write_avi(path, codec: str, n_frames: int = 103, fps: int = 30, b_frames: int = 0) -> None:
    """An AVI as cameras and old tools write them: no presentation timestamps, only frame order."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        if b_frames:
            stream.codec_context.max_b_frames = b_frames
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), (7 * i) % 256, np.uint8), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.mark.parametrize(
    "codec, b_frames, bad_stamps",
    [("libx264", 0, "all"), ("mpeg4", 2, "some")],  # H.264 in AVI: every stamp; MPEG-4 Part 2: B-frame ones
)
def test_avi_without_timestamps_gets_its_nominal_duration(tmp_path, codec, b_frames, bad_stamps):
    import decord

    from tasks.decode import VideoStream

    root = tmp_path / "v"
    root.mkdir()
    write_avi(root / "clip.avi", codec, b_frames=b_frames)
    stamps = decord.VideoReader(str(root / "clip.avi")).get_frame_timestamp(list(range(103)))[:, 0]
    # the premise: decord hands over AV_NOPTS_VALUE / 30 (~ -3e17 s) for frames without a timestamp
    bad = stamps < -1e10
    assert bad.all() if bad_stamps == "all" else 0 < bad.sum() < 103
    video = scan_videos(root).catalog.get("clip")
    assert video.readable and (video.n_frames, video.fps) == (103, 30.0)
    assert video.duration == round(103 / 30, 6)  # was -307445750596370432 s for the H.264 one
    stream = VideoStream(video.path, window_s=0.5, frames_per_window=1)
    assert stream.info.timestamps == "nominal"
    assert round(stream.info.duration, 6) == video.duration  # one definition for catalog and decoder


def test_catalog_durations_are_the_decoders_on_real_files(real_scan):
    from tasks.decode import VideoStream

    for video_id in REAL:
        video = real_scan.catalog.get(video_id)
        stream = VideoStream(video.path, window_s=0.5, frames_per_window=1, short_side=None, crop=None)
        assert video.duration == round(stream.info.duration, 6), video_id
        assert stream.plan.times[-1, 1] == stream.info.duration


def test_frame_times_trusts_only_sane_container_stamps():
    container = frame_times([0.5, 0.54, 0.58], fps=25.0)  # starts at 0.5 s: shifted to 0
    assert container.source == "container"
    np.testing.assert_allclose(container.starts, [0, 0.04, 0.08])
    assert container.duration == pytest.approx(0.12)
    nopts = -9223372036854775808 / 30
    for stamps in (
        [nopts] * 3,
        [nopts, 0.0, 0.04],
        [0.0, 0.08, 0.04],
        [0.0, float("nan"), 0.08],
        [-1.0, 0, 1],
    ):
        times = frame_times(stamps, fps=25.0)
        assert times.source == "nominal", stamps
        np.testing.assert_allclose(times.starts, [0, 0.04, 0.08])
        assert times.duration == pytest.approx(0.12)
    for fps in (0.0, float("nan"), -5.0):
        with pytest.raises(ValueError, match="no usable video stream"):
            frame_times([0.0, 0.04], fps=fps)
    with pytest.raises(ValueError, match="0 frames"):
        frame_times([], fps=25.0)


def test_clean_reason_strips_nul_and_control_characters():
    assert clean_reason("cannot open:\x00\x00\x00 moov\tatom\r\nnot found\x1b[0m") == (
        "cannot open: moov atom not found [0m"
    )
    assert clean_reason("plain reason") == "plain reason"


def test_unreadable_reasons_carry_no_decoder_log_padding(tmp_path, realdata):
    """The probe log was truncated without a seek: every file after the first got a hole of NULs."""
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a_fake.mp4").write_text("not a video")
    (root / "b_zero.mp4").write_bytes(b"")
    head = (realdata / "videos" / "v_GGSY1Qvo990.mp4").read_bytes()[:20000]
    (root / "c_truncated.mp4").write_bytes(head)
    (root / "d_fake.webm").write_bytes(os.urandom(5000))
    catalog = scan_videos(root).catalog
    errors = [v.error for v in catalog.videos]
    assert len(errors) == 4 and all(errors)
    assert all(e.isprintable() and "\x00" not in e for e in errors), errors
    assert "moov atom not found" in catalog.get("b_zero").error  # the log is still read, just clean
    assert all(len(e) < 600 for e in errors)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x00\x00\x18ftypmp42\xff\xfe\x80", "not UTF-8 text"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"format": "mamfusion-catalog", "version": 1, "root": 1' + b"1" * 5000 + b"}", "not valid JSON"),
        (b"{" + b"\n" * 3 + b"oops", "4: not valid JSON"),
    ],
)
def test_load_turns_any_content_into_a_catalog_error(tmp_path, content, message):
    path = tmp_path / "catalog.json"
    path.write_bytes(content)
    with pytest.raises(CatalogError, match=message):
        Catalog.load(path)


def test_load_rejects_numbers_no_scan_writes(small_folder, tmp_path):
    path = tmp_path / "catalog.json"
    scan_videos(small_folder, prober=CountingProber()).catalog.save(path)
    good = json.loads(path.read_text())
    for field, value in (("duration", float("nan")), ("fps", 10**400), ("size", -1)):
        data = json.loads(json.dumps(good))
        data["videos"][0][field] = value
        path.write_text(json.dumps(data))
        with pytest.raises(CatalogError, match=rf"videos\[0\]\.{field} must be a finite, non-negative"):
            Catalog.load(path)
    data = json.loads(json.dumps(good))
    data["videos"][0]["sha256"] = [[[["deep"]]]] * 1000
    path.write_text(json.dumps(data))
    with pytest.raises(CatalogError, match=r"videos\[0\]\.sha256") as err:
        Catalog.load(path)
    assert len(str(err.value)) < 300  # a bounded repr of the offending value


def test_missing_folder_is_a_user_error_that_is_never_retried(tmp_path):
    with pytest.raises(VideoFolderError) as err:
        scan_videos(tmp_path / "nope")
    assert isinstance(err.value, NotADirectoryError) and isinstance(err.value, MamFusionError)
