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


def user_error(capsys, argv: list[str]) -> str:
    """Run a command that must fail as a user error: exit 2, nothing on stdout, one line on stderr."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"{argv[0]}: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    return captured.err


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
        (["catalog", "{real}/videos", "--previous", "{real}/videos/rotated_90.mov"], "not UTF-8 text"),
        (["catalog", "{real}/videos", "--previous", "{tmp}/deep.json"], "nested too deeply"),
        (["catalog", "{tmp}", "--save", "{tmp}/no_such_dir/catalog.json"], "cannot write"),
    ],
)
def test_catalog_errors_are_one_line(capsys, realdata, tmp_path, argv, message):
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "deep.json").write_text("[" * 100_000)
    argv = [a.format(tmp=tmp_path, real=realdata) for a in argv]
    assert message in user_error(capsys, argv)


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
        "moment_issues": [],
    }


def test_annotations_split_label_and_forced_format(capsys, realdata):
    path = realdata / "annotations" / "tvr_val_release.head60.jsonl"
    out = run_json(capsys, ["annotations", str(path), "--format", "tvr", "--split", "val", "--json"])
    assert (out["format"], out["queries"], out["splits"]) == ("tvr", 60, {"val": 60})


def test_annotations_malformed_line_fails_or_is_skipped(capsys, tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("video_id,start,end,caption,split\nv1,0,1,fine,train\nv1,soon,2,no time,train\n")
    err = user_error(capsys, ["annotations", str(path)])
    assert err == (
        f"annotations: {path}:3: start must be a number of seconds, got 'soon' "
        "(use --skip-malformed to skip such lines)\n"
    )
    out = run_json(capsys, ["annotations", str(path), "--skip-malformed", "--json"])
    assert (out["queries"], out["videos"], out["splits"]) == (1, 1, {"train": 1})
    assert out["skipped"] == [
        {
            "path": str(path),
            "line": 3,
            "reason": "start must be a number of seconds, got 'soon'",
            "content": "v1,soon,2,no time,train",
        }
    ]
    assert out["moment_issues"] == []
    assert main(["annotations", str(path), "--skip-malformed"]) == 0
    human = capsys.readouterr().out
    assert "csv, 1 queries over 1 videos" in human and f"{path}:3: start must be" in human


def test_annotations_backwards_moment_keeps_the_caption_unless_strict(capsys, tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("video_id,start,end,caption,split\nv1,0,1,fine,train\nv1,5,2,backwards,train\n")
    out = run_json(capsys, ["annotations", str(path), "--json"])
    assert (out["queries"], out["videos"], out["skipped"]) == (2, 1, [])
    assert out["moment_issues"] == [
        {
            "path": str(path),
            "line": 3,
            "reason": "start 5 s is after end 2 s: moment dropped",
            "content": "v1,5,2,backwards,train",
        }
    ]
    assert main(["annotations", str(path)]) == 0
    human = capsys.readouterr().out
    assert "kept 1 caption(s) whose moment was invalid" in human and f"{path}:3: start 5 s" in human

    err = user_error(capsys, ["annotations", str(path), "--strict"])
    assert f"{path}:3: start 5 s is after end 2 s (use --skip-malformed" in err
    out = run_json(capsys, ["annotations", str(path), "--strict", "--skip-malformed", "--json"])
    assert (out["queries"], len(out["skipped"]), out["moment_issues"]) == (1, 1, [])


def test_annotations_counts_a_charades_sta_train_style_file(capsys, tmp_path, realdata):
    """The official train file's layout, with its kind of backwards lines (the file itself is not here)."""
    sample = (realdata / "annotations" / "charades_sta_test.txt").read_text().splitlines()[:3]
    assert all(" " in line.split("##")[0] and "##" in line for line in sample)  # the layout we copy
    lines = [
        "AO8RW 0.0 6.9##a person is putting a book on a shelf.",
        "AO8RW 5.6 12.1##a person is opening a closet door.",
        "LEOL6 8.0 7.0##person is holding medicine.",
        "LEOL6 0.0 6.2##person sitting on the floor.",
        "Y6R7T 12.4 11.0##person throws a pillow.",
        "Y6R7T 2.1 9.5##the person takes off their shoes.",
        "OWH2K 30.0 36.4##person closing the door.",
    ]
    path = tmp_path / "charades_sta_train.txt"
    path.write_text("\n".join(lines) + "\n")
    out = run_json(capsys, ["annotations", str(path), "--json"])
    assert (out["format"], out["queries"], out["videos"], out["skipped"]) == ("charades", 7, 4, [])
    assert [(m["line"], m["reason"]) for m in out["moment_issues"]] == [
        (3, "start 8 s is after end 7 s: moment dropped"),
        (5, "start 12.4 s is after end 11 s: moment dropped"),
    ]
    err = user_error(capsys, ["annotations", str(path), "--strict"])
    assert (
        err
        == f"annotations: {path}:3: start 8 s is after end 7 s (use --skip-malformed to skip such lines)\n"
    )
    strict = run_json(capsys, ["annotations", str(path), "--strict", "--skip-malformed", "--json"])
    assert (strict["queries"], strict["videos"], [s["line"] for s in strict["skipped"]]) == (5, 4, [3, 5])


def test_csv_field_over_the_limit_is_one_line(capsys, tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text('video_id,start,end,caption\nv1,0,1,"' + "x" * 131_073 + '"\n')
    for extra in ([], ["--skip-malformed"]):
        err = user_error(capsys, ["annotations", str(path), *extra])
        assert f"{path}:2: a CSV field starting on this line is longer than 131,072 characters" in err


OWN_LINE = '{"video_id": "v1", "caption": "fine"}'
TVR_LINE = '{"vid_name": "v1", "ts": [0, 1], "desc": "fine"}'


@pytest.mark.parametrize(
    "fmt, name, first",
    [("jsonl", "a.jsonl", OWN_LINE), ("tvr", "b.jsonl", TVR_LINE), (None, "c.jsonl", OWN_LINE)],
)
def test_deeply_nested_json_lines_are_one_line_or_skipped(capsys, tmp_path, fmt, name, first):
    path = tmp_path / name
    path.write_text(first + "\n" + "[" * 100_000 + "\n")
    argv = ["annotations", str(path), *(["--format", fmt] if fmt else [])]
    assert f"{path}:2: not readable JSON (nested too deeply)" in user_error(capsys, argv)
    out = run_json(capsys, [*argv, "--skip-malformed", "--json"])
    assert [s["line"] for s in out["skipped"]] == [2] and out["queries"] == 1


def test_deeply_nested_json_document_is_one_line_even_when_skipping(capsys, tmp_path):
    path = tmp_path / "val.json"
    path.write_text('{"v_a": ' + "[" * 100_000)
    err = user_error(capsys, ["annotations", str(path), "--skip-malformed"])
    assert f"{path}:1: not readable JSON (nested too deeply)" in err and "--skip-malformed" not in err


def test_unreadable_video_reasons_are_clean_in_json_and_logs(tmp_path, realdata):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a_fake.mp4").write_text("not a video")
    (root / "b_zero.mp4").write_bytes(b"")
    (root / "c_truncated.mp4").write_bytes((realdata / "videos" / "v_ZNVhz7ctTq0.mp4").read_bytes()[:30000])
    (root / "d_zero.mkv").write_bytes(b"")
    proc = subprocess.run(
        [str(MAMFUSION), "catalog", str(root), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\x00" not in proc.stdout and "\\u0000" not in proc.stdout  # the JSON escapes NUL as \u0000
    errors = [v["error"] for v in json.loads(proc.stdout)["videos"]]
    assert len(errors) == 4 and all(e and e.isprintable() for e in errors)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 4 and "\x00" not in proc.stderr


def test_annotations_missing_file_and_bad_format_name(capsys, tmp_path):
    assert "cannot read" in user_error(capsys, ["annotations", str(tmp_path / "nope.txt")])
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
