"""`mamfusion catalog` and `mamfusion annotations`: JSON shape, human output, exit codes and messages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main

MAMFUSION = Path(sys.executable).parent / "mamfusion"


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)  # exactly one JSON document on stdout


def test_catalog_json_lists_every_video(capsys, realdata):
    out = run_json(capsys, ["catalog", str(realdata / "videos"), "--json"])
    assert len(out["videos"]) == 8
    assert (out["readable"], out["unreadable"]) == (7, 1)
    corrupted = next(v for v in out["videos"] if v["video_id"] == "corrupted")
    assert corrupted["readable"] is False and "does not decode" in corrupted["error"]
    fields = {
        "video_id",
        "path",
        "rel_path",
        "size",
        "sha256",
        "duration",
        "fps",
        "n_frames",
        "width",
        "height",
    }
    assert all(fields <= v.keys() and "error" in v for v in out["videos"])
    assert "new" not in out  # changes only with --previous


def test_catalog_save_then_previous_reports_changes(capsys, realdata, tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    for name in ("rotated_90.mov", "eye_makeup_mpeg4.avi"):
        shutil.copy2(realdata / "videos" / name, root / name)
    saved = tmp_path / "catalog.json"
    first = run_json(capsys, ["catalog", str(root), "--json", "--save", str(saved)])
    assert saved.is_file() and len(first["videos"]) == 2

    (root / "eye_makeup_mpeg4.avi").unlink()
    (root / "broken.webm").write_text("not a video")
    second = run_json(capsys, ["catalog", str(root), "--json", "--previous", str(saved)])
    assert (second["new"], second["changed"], second["removed"]) == (["broken"], [], ["eye_makeup_mpeg4"])
    assert second["unchanged"] == ["rotated_90"]
    assert (second["readable"], second["unreadable"]) == (1, 1)


def test_catalog_human_output(capsys, realdata):
    assert main(["catalog", str(realdata / "videos")]) == 0
    out = capsys.readouterr().out
    assert "8 videos under" in out and "7 readable, 1 unreadable" in out
    assert "corrupted" in out and "UNREADABLE:" in out
    assert "320x568" in out  # rotated_90, in display orientation


@pytest.mark.parametrize(
    "argv, message",
    [
        (["catalog", "{tmp}/no_such_dir"], "does not exist or is not a folder"),
        (["catalog", "{real}/videos", "--previous", "{tmp}/missing.json"], "No such file"),
        (["catalog", "{real}/videos", "--previous", "{tmp}/bad.json"], "not valid JSON"),
    ],
)
def test_catalog_errors_are_one_line(capsys, realdata, tmp_path, argv, message):
    (tmp_path / "bad.json").write_text("{")
    argv = [a.format(tmp=tmp_path, real=realdata) for a in argv]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("mamfusion catalog: error: ") and message in captured.err
    assert captured.err.count("\n") == 1


def test_catalog_rejects_a_non_positive_probe_timeout(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["catalog", str(tmp_path), "--probe-timeout", "0"])
    assert exc.value.code == 2 and "must be more than 0 seconds" in capsys.readouterr().err


def test_annotations_json_on_a_real_file(capsys, realdata):
    path = realdata / "annotations" / "charades_sta_test.txt"
    out = run_json(capsys, ["annotations", str(path), "--json"])
    assert out == {
        "path": str(path),
        "format": "charades",
        "queries": 3720,
        "videos": 1334,
        "splits": {},
        "skipped": [],
    }


def test_annotations_split_label_and_forced_format(capsys, realdata):
    path = realdata / "annotations" / "tvr_val_release.head60.jsonl"
    out = run_json(capsys, ["annotations", str(path), "--format", "tvr", "--split", "val", "--json"])
    assert (out["format"], out["queries"], out["splits"]) == ("tvr", 60, {"val": 60})


def test_annotations_malformed_line_fails_or_is_skipped(capsys, tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("video_id,start,end,caption,split\nv1,0,1,fine,train\nv1,5,2,backwards,train\n")
    assert main(["annotations", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mamfusion annotations: error: {path}:3: start 5 s is after end 2 s")
    assert err.count("\n") == 1

    out = run_json(capsys, ["annotations", str(path), "--skip-malformed", "--json"])
    assert (out["queries"], out["videos"], out["splits"]) == (1, 1, {"train": 1})
    assert out["skipped"] == [
        {
            "path": str(path),
            "line": 3,
            "reason": "start 5 s is after end 2 s",
            "content": "v1,5,2,backwards,train",
        }
    ]
    assert main(["annotations", str(path), "--skip-malformed"]) == 0
    human = capsys.readouterr().out
    assert "csv, 1 queries over 1 videos" in human and f"{path}:3: start 5 s" in human


def test_annotations_missing_file_and_bad_format_name(capsys, tmp_path):
    assert main(["annotations", str(tmp_path / "nope.txt")]) == 1
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["annotations", str(tmp_path / "nope.txt"), "--format", "srt"])
    assert exc.value.code == 2


def test_installed_console_script(realdata):
    proc = subprocess.run(
        [str(MAMFUSION), "catalog", str(realdata / "videos"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert sorted(v["rel_path"] for v in out["videos"])[:2] == [
        "big_buck_bunny_vp8.webm",
        "carphone_176x144.mp4",
    ]
    assert out["unreadable"] == 1
    assert "catalogued 8 videos" in proc.stderr  # logs go to stderr, never into the JSON
