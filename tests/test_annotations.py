"""Annotation formats: the real benchmark files, malformed lines, detection, and the MS-SL round trip."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.annotations import (
    FORMATS,
    AnnotationError,
    AnnotationSet,
    QueryRecord,
    clean_text,
    detect_format,
    read_annotations,
    write_mssl_captions,
)

REAL_FILES = {  # file: (format, queries, videos)
    "charades_sta_test.txt": ("charades", 3720, 1334),
    "activitynet_captions_val_1.json": ("activitynet", 17505, 4917),
    "tvr_val_release.head60.jsonl": ("tvr", 60, 60),
}


@pytest.fixture(scope="module")
def real_sets(realdata) -> dict[str, AnnotationSet]:
    return {name: read_annotations(realdata / "annotations" / name) for name in REAL_FILES}


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_files_give_the_published_counts(real_sets, name):
    fmt, n_queries, n_videos = REAL_FILES[name]
    annotations = real_sets[name]
    assert annotations.format == fmt
    assert (len(annotations.queries), len(annotations.video_ids())) == (n_queries, n_videos)
    assert annotations.skipped == []
    assert len({q.query_id for q in annotations.queries}) == n_queries


def test_real_records_are_normalised(real_sets):
    charades = real_sets["charades_sta_test.txt"].queries
    assert charades[0] == QueryRecord("3MSZA#enc#0", "3MSZA", "person turn a light on.", 24.3, 30.4, None)
    assert charades[1].query_id == "3MSZA#enc#1"
    anet = real_sets["activitynet_captions_val_1.json"]
    first = anet.queries[:2]
    assert [q.query_id for q in first] == ["v_uqiMw7tQ1Cc#enc#0", "v_uqiMw7tQ1Cc#enc#1"]
    # the file has "  The coach helps ..." with leading spaces: stored stripped
    assert first[1].text.startswith("The coach helps the guy in red")
    assert (first[0].start, first[0].end) == (0.28, 55.15)
    assert anet.video_ids()[:2] == ["v_uqiMw7tQ1Cc", "v_bXdq2zI1Ms0"]
    tvr = real_sets["tvr_val_release.head60.jsonl"].queries[0]
    assert (tvr.video_id, tvr.text, tvr.start, tvr.end) == (
        "friends_s01e03_seg02_clip_19",
        "Phoebe puts one of her ponytails in her mouth.",
        16.48,
        33.87,
    )


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_mssl_round_trip_of_real_files_is_lossless(real_sets, name, tmp_path):
    original = real_sets[name]
    out = tmp_path / "captions.txt"
    write_mssl_captions(out, original.queries)
    back = read_annotations(out)
    assert back.format == "mssl"
    want = [(q.query_id, q.video_id, q.text) for q in original.queries]
    assert [(q.query_id, q.video_id, q.text) for q in back.queries] == want
    assert all(q.start is None and q.end is None for q in back.queries)
    again = tmp_path / "again.txt"
    write_mssl_captions(again, back.queries)
    assert again.read_bytes() == out.read_bytes()


_VIDEO_IDS = st.text(
    st.characters(exclude_categories=("Cs", "Zs", "Zl", "Zp", "Cc")), min_size=1, max_size=12
)
_TEXTS = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40).filter(
    lambda t: t.split()
)


@settings(max_examples=150, deadline=None, database=None)  # no .hypothesis/ folder in the repo
@given(st.lists(st.tuples(_VIDEO_IDS.filter(lambda v: not any(c.isspace() for c in v)), _TEXTS), max_size=20))
def test_mssl_round_trip_property(tmp_path_factory, pairs):
    counts: dict[str, int] = {}
    queries = []
    for video_id, text in pairs:
        k = counts[video_id] = counts.get(video_id, -1) + 1
        queries.append(QueryRecord(f"{video_id}#enc#{k}", video_id, clean_text(text), None, None, None))
    out = tmp_path_factory.mktemp("prop") / "c.txt"
    write_mssl_captions(out, queries)
    assert read_annotations(out, "mssl").queries == queries


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


CHARADES_BAD = (
    "AAA 1.0 2.0##fine one\n"
    "AAA 24.3##no end time\n"  # line 2
    "AAA 30 20##start after end\n"  # line 3
    "AAA -1 2##negative\n"  # line 4
    "AAA 1 2##   \n"  # line 5: empty caption
    "AAA one 2##not a number\n"  # line 6
    "\n"
    "BBB 0 5##  spaced   out  \n"  # line 8
)


def test_charades_malformed_line_names_file_line_and_reason(tmp_path):
    path = _write(tmp_path, "charades.txt", CHARADES_BAD)
    with pytest.raises(AnnotationError) as err:
        read_annotations(path)
    assert (err.value.path, err.value.line) == (str(path), 2)
    assert "VIDEO_ID START END##sentence" in err.value.reason
    assert str(err.value).startswith(f"{path}:2: ")


def test_charades_skip_malformed_reports_every_bad_line(tmp_path):
    path = _write(tmp_path, "charades.txt", CHARADES_BAD)
    result = read_annotations(path, skip_malformed=True)
    assert [(q.query_id, q.text, q.start, q.end) for q in result.queries] == [
        ("AAA#enc#0", "fine one", 1.0, 2.0),
        ("AAA#enc#1", "start after end", None, None),  # invalid moment: caption kept, moment dropped
        ("AAA#enc#2", "negative", None, None),
        ("BBB#enc#0", "spaced out", 0.0, 5.0),
    ]
    reasons = {s.line: s.reason for s in result.skipped}
    assert sorted(reasons) == [2, 5, 6]
    assert "caption" in reasons[5]
    assert "'one'" in reasons[6]
    assert result.skipped[0].content == "AAA 24.3##no end time"
    assert all(s.path == str(path) for s in result.skipped)
    issues = {s.line: s.reason for s in result.moment_issues}
    assert issues == {
        3: "start 30 s is after end 20 s: moment dropped",
        4: "start must be a finite, non-negative number of seconds, got -1.0: moment dropped",
    }


def test_charades_strict_makes_invalid_moments_malformed(tmp_path):
    path = _write(tmp_path, "charades.txt", CHARADES_BAD)
    result = read_annotations(path, skip_malformed=True, strict=True)
    assert [q.query_id for q in result.queries] == ["AAA#enc#0", "BBB#enc#0"]
    reasons = {s.line: s.reason for s in result.skipped}
    assert sorted(reasons) == [2, 3, 4, 5, 6] and result.moment_issues == []
    assert reasons[3] == "start 30 s is after end 20 s"
    assert "non-negative" in reasons[4]
    path = _write(tmp_path, "only_moments.txt", "AAA 1 2##fine\nLEOL6 8.0 7.0##person is holding medicine.\n")
    with pytest.raises(AnnotationError) as err:
        read_annotations(path, strict=True)
    assert (err.value.line, err.value.reason, err.value.skippable) == (2, "start 8 s is after end 7 s", True)


def test_charades_train_style_file_keeps_every_caption_with_one_warning(tmp_path, caplog):
    lines = [f"V{i // 3:04d} {i % 7}.0 {i % 7 + 5}.5##person number {i} opens a door." for i in range(40)]
    lines[5] = "LEOL6 8.0 7.0##person is holding medicine."
    lines[17] = "KPBUE 19.3 11.1##person puts the book down."
    lines[30] = "ZZZZZ nan 3##person laughs."
    path = _write(tmp_path, "charades_sta_train.txt", "\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="storage.annotations"):
        result = read_annotations(path)
    assert (len(result), len(result.video_ids()), result.skipped) == (40, 14 + 3, [])
    medicine = next(q for q in result.queries if q.video_id == "LEOL6")
    assert (medicine.text, medicine.start, medicine.end) == ("person is holding medicine.", None, None)
    assert [s.line for s in result.moment_issues] == [6, 18, 31]
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert message.startswith(f"{path}: 3 of 40 queries have an invalid moment; their captions are kept")
    assert "line 6: start 8 s is after end 7 s: moment dropped" in message
    assert "line 18: start 19.3 s is after end 11.1 s" in message and "line 31:" in message
    assert "--strict" in message


def test_warning_lists_ten_lines_and_counts_the_rest(tmp_path, caplog):
    text = "".join(f"V{i} 9 {i % 5}##caption {i}\n" for i in range(25))
    path = _write(tmp_path, "many.txt", text)
    with caplog.at_level(logging.WARNING, logger="storage.annotations"):
        result = read_annotations(path)
    assert len(result.moment_issues) == 25 and len(result) == 25
    [warning] = caplog.records
    assert warning.getMessage().count("line ") == 10 and "and 15 more" in warning.getMessage()
    assert len(result.split("x").moment_issues) == 25  # subsets keep the list, like `skipped`


def test_moments_past_the_stated_duration_are_clipped_or_dropped(tmp_path, caplog):
    data = {
        "v_a": {
            "duration": 100.0,
            "timestamps": [[10, 100.01], [10, 130], [120, 125], [99, 99.5]],
            "sentences": ["rounded end", "far end", "after the video", "inside"],
        },
        "v_b": {"duration": "unknown", "timestamps": [[5, 500]], "sentences": ["no usable duration"]},
    }
    path = _write(tmp_path, "val.json", json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="storage.annotations"):
        result = read_annotations(path)
    moments = {q.text: (q.start, q.end) for q in result.queries}
    assert moments == {
        "rounded end": (10.0, 100.0),  # within MOMENT_ROUNDING_S: clipped silently
        "far end": (10.0, 100.0),
        "after the video": (None, None),
        "inside": (99.0, 99.5),
        "no usable duration": (5.0, 500.0),
    }
    assert [s.reason for s in result.moment_issues] == [
        "end 130 s is after the video's end (100 s): end clipped to 100 s",
        "start 120 s is after the video's end (100 s): moment dropped",
    ]
    assert len(caplog.records) == 1
    strict = read_annotations(path, strict=True, skip_malformed=True)
    assert len(strict) == 3 and len(strict.skipped) == 2 and strict.moment_issues == []

    tvr = {"vid_name": "clip", "duration": 60.0, "ts": [50, 75], "desc": "Ross leaves."}
    tvr_path = _write(tmp_path, "tvr.jsonl", json.dumps(tvr) + "\n")
    [query] = read_annotations(tvr_path).queries
    assert (query.start, query.end) == (50.0, 60.0)


def test_real_activitynet_ends_past_the_duration_are_rounding(real_sets, realdata):
    """134 ends of val_1 lie 0.01 s past their video's duration: clipped, without a warning."""
    data = json.loads((realdata / "annotations" / "activitynet_captions_val_1.json").read_text())
    over = [
        (v, k) for v, e in data.items() for k, (_, end) in enumerate(e["timestamps"]) if end > e["duration"]
    ]
    assert len(over) == 134
    anet = real_sets["activitynet_captions_val_1.json"]
    assert anet.moment_issues == []
    ends = {(q.video_id, int(q.query_id.rpartition("#")[2])): q.end for q in anet.queries}
    assert all(ends[key] == data[key[0]]["duration"] for key in over)


def test_absurd_numbers_and_text_never_escape_as_other_errors(tmp_path):
    lines = [
        {"video_id": "v1", "start": 0, "end": 10**400, "caption": "huge end"},  # beyond float range
        {"video_id": "v1", "caption": "\ud800 lone surrogate"},
        {"video_id": "v1", "caption": "x" * 5000, "query_id": ["deep"] * 1000},
        {"video_id": "v1", "start": 0, "end": 1, "caption": "fine"},
    ]
    text = (
        "\n".join(json.dumps(x) for x in lines) + "\n" + "[" * 50_000 + "\n" + '{"a": 1' + "1" * 5000 + "}\n"
    )
    path = _write(tmp_path, "mine.jsonl", text)
    result = read_annotations(path, skip_malformed=True)
    assert [(q.text[:8], q.start, q.end) for q in result.queries] == [
        ("huge end", None, None),
        ("fine", 0.0, 1.0),
    ]
    reasons = {s.line: s.reason for s in result.skipped}
    assert "not valid Unicode" in reasons[2]
    assert reasons[3].startswith("query id must be non-empty text") and len(reasons[3]) < 200
    assert reasons[5] == "not readable JSON (nested too deeply)"
    assert "4300 digits" in reasons[6]
    with pytest.raises(AnnotationError, match="nested too deeply") as err:
        read_annotations(_write(tmp_path, "deep.json", "[" * 50_000), "activitynet", skip_malformed=True)
    assert not err.value.skippable


def test_csv_field_over_the_csv_limit_is_an_error_at_its_line(tmp_path):
    text = 'video_id,start,end,caption\nv1,0,1,fine\nv1,0,1,"unbalanced\n' + "x" * 140_000 + "\nv2,0,1,more\n"
    path = _write(tmp_path, "mine.csv", text)
    for skip in (False, True):
        with pytest.raises(AnnotationError, match="longer than 131,072 characters") as err:
            read_annotations(path, skip_malformed=skip)
        assert err.value.line == 3 and not err.value.skippable


def test_detection_survives_absurd_first_lines(tmp_path):
    deep = _write(tmp_path, "deep.jsonl", "{" + '"a":[' * 50_000 + "\n")
    assert detect_format(deep, deep.read_bytes()) == "jsonl"
    wide = _write(tmp_path, "wide.txt", '"' + "x" * 200_000 + "\n")
    with pytest.raises(AnnotationError, match="cannot tell the annotation format"):
        read_annotations(wide)


def test_activitynet_errors_point_at_the_video_entry(tmp_path):
    data = {
        "v_good": {"duration": 10, "timestamps": [[0, 5], [5, 10]], "sentences": ["a", "b"]},
        "v_mismatch": {"duration": 10, "timestamps": [[0, 5]], "sentences": ["a", "b"]},
        "v_badstamp": {"duration": 10, "timestamps": [[0, 5], [3]], "sentences": ["ok", "broken"]},
    }
    text = json.dumps(data, indent=2)
    path = _write(tmp_path, "val.json", text)
    with pytest.raises(AnnotationError, match="v_mismatch.*same length") as err:
        read_annotations(path)
    assert err.value.line == text.splitlines().index('  "v_mismatch": {') + 1 > 1
    result = read_annotations(path, skip_malformed=True)
    assert [q.query_id for q in result.queries] == ["v_good#enc#0", "v_good#enc#1", "v_badstamp#enc#0"]
    assert [s.reason for s in result.skipped][1] == "video 'v_badstamp': timestamps[1] is not [start, end]"


def test_activitynet_broken_json_is_never_skippable(tmp_path):
    path = _write(tmp_path, "val.json", '{"v_a": {"timestamps": [[0, 1]],\n "sentences": ["x"]\n')
    with pytest.raises(AnnotationError, match="not valid JSON") as err:
        read_annotations(path, skip_malformed=True)
    assert err.value.line == 3


def test_tvr_lines(tmp_path):
    lines = [
        {"vid_name": "s01_clip", "duration": 60, "ts": [1.5, 3], "desc": "Ross waves.", "desc_id": 7},
        {"vid_name": "s01_clip", "desc": "No timestamps in the test release."},
        {"vid_name": "s02_clip", "ts": [1, 2]},
        {"vid_name": "s02_clip", "ts": [1], "desc": "bad ts"},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\n{broken\n"
    path = _write(tmp_path, "tvr_val.jsonl", text)
    result = read_annotations(path, skip_malformed=True)
    assert result.format == "tvr"
    assert [(q.query_id, q.start, q.end) for q in result.queries] == [
        ("s01_clip#enc#0", 1.5, 3.0),
        ("s01_clip#enc#1", None, None),
    ]
    assert [(s.line, s.reason.split(" ")[0]) for s in result.skipped] == [
        (3, "missing"),
        (4, "ts"),
        (5, "not"),
    ]


def test_own_csv_with_optional_columns_and_quoted_captions(tmp_path):
    text = (
        "video_id,start,end,caption,split,query_id\n"
        'v1,0,2.5,"a red ball, bouncing",train,q1\n'
        'v1,3,4,"two\nlines",train,\n'
        "v2,,,whole video,val,q3\n"
    )
    path = _write(tmp_path, "mine.csv", text)
    result = read_annotations(path, split="test")
    assert result.format == "csv"
    assert result.queries == [
        QueryRecord("q1", "v1", "a red ball, bouncing", 0.0, 2.5, "train"),
        QueryRecord("v1#enc#1", "v1", "two lines", 3.0, 4.0, "train"),
        QueryRecord("q3", "v2", "whole video", None, None, "val"),
    ]
    assert result.splits() == {"train": 2, "val": 1}
    assert [q.query_id for q in result.split("val").queries] == ["q3"]


def test_own_csv_bad_rows_and_header(tmp_path):
    text = "video_id,start,end,caption\nv1,0,1,ok\nv1,0,1\nv1,,1,half a span\nv1,0,1,again\n"
    result = read_annotations(_write(tmp_path, "a.csv", text), skip_malformed=True, split="train")
    assert [q.split for q in result.queries] == ["train", "train"]
    assert [(s.line, s.reason) for s in result.skipped] == [
        (3, "expected 4 fields, found 3"),
        (4, "give both start and end, or neither"),
    ]
    typo = _write(tmp_path, "b.csv", "\nvideo_id,start,end,captoin\nv1,0,1,x\n")
    with pytest.raises(AnnotationError, match="missing column.*caption") as err:
        read_annotations(typo, skip_malformed=True)  # detected from the suffix, so the error is precise
    assert err.value.line == 2


def test_own_jsonl_and_duplicate_ids(tmp_path):
    lines = [
        {"video_id": "v1", "start": 0, "end": 1, "caption": "one", "query_id": "a"},
        {"video_id": "v1", "start": None, "end": None, "caption": "two"},
        {"video_id": "v2", "start": "0", "end": 1, "caption": "string time"},
        {"video_id": "v2", "caption": "typo", "splitt": "train"},
        {"video_id": "v3", "caption": "dup", "query_id": "a"},
        {"video_id": "v 4", "caption": "space in id"},
    ]
    path = _write(tmp_path, "mine.jsonl", "\n".join(json.dumps(x) for x in lines))
    result = read_annotations(path, skip_malformed=True)
    assert result.format == "jsonl"
    assert [q.query_id for q in result.queries] == ["a", "v1#enc#1"]
    reasons = [(s.line, s.reason) for s in result.skipped]
    assert reasons[0] == (3, "start must be a number of seconds, got '0'")
    assert reasons[1][0] == 4 and "unknown column(s) splitt" in reasons[1][1]
    assert reasons[2] == (5, "duplicate query id 'a' (first at line 1)")
    assert reasons[3] == (6, "video id 'v 4' must not contain whitespace")


def test_mssl_reader_rejects_lines_without_a_key(tmp_path):
    path = _write(tmp_path, "c.txt", "vid#enc#0 fine\nvid#enc#x bad k\nvid#enc#1\n")
    result = read_annotations(path, "mssl", skip_malformed=True)
    assert [q.query_id for q in result.queries] == ["vid#enc#0"]
    assert [s.line for s in result.skipped] == [2, 3]


def test_invalid_utf8_costs_only_its_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"AAA 0 1##caf\xe9\nAAA 1 2##fine\n")
    result = read_annotations(path, "charades", skip_malformed=True)
    assert [q.text for q in result.queries] == ["fine"]
    assert result.skipped[0].line == 1 and "UTF-8" in result.skipped[0].reason


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("x.txt", "3MSZA 24.3 30.4##person turn a light on.\n", "charades"),
        ("x.txt", "\n\nvid_1#enc#0 a caption\n", "mssl"),
        ("x.data", "video_id,start,end,caption\n", "csv"),
        ("x.jsonl", '{"vid_name": "a", "desc": "b", "ts": [0, 1]}\n', "tvr"),
        ("x.jsonl", '{"video_id": "a", "caption": "b"}\n', "jsonl"),
        ("x.json", '{\n "v_a": {"timestamps": [], "sentences": []}\n}\n', "activitynet"),
        ("x.json", '{"v_a": {"timestamps": [], "sentences": []}}', "activitynet"),
        ("tvr_broken.jsonl", "{oops\n", "tvr"),
        ("x.jsonl", '{"vid_name": "a", "ts": [0, 1]}\n', "tvr"),
        ("x.json", '{"caption": "b"}\n{"video_id": "a"}\n', "jsonl"),
        ("empty.csv", "", "csv"),
    ],
)
def test_detect_format(tmp_path, name, content, expected):
    path = _write(tmp_path, name, content)
    assert detect_format(path, path.read_bytes()) == expected


def test_undetectable_or_unknown_format_is_a_clear_error(tmp_path):
    path = _write(tmp_path, "notes.txt", "\nhello world\n")
    with pytest.raises(AnnotationError, match="cannot tell the annotation format") as err:
        read_annotations(path)
    assert err.value.line == 2
    with pytest.raises(ValueError, match="unknown annotation format 'srt'"):
        read_annotations(path, "srt")
    with pytest.raises(FileNotFoundError):
        read_annotations(tmp_path / "missing.txt")
    assert set(FORMATS) == {"activitynet", "charades", "tvr", "mssl", "csv", "jsonl"}


def test_writer_refuses_ids_it_cannot_round_trip(tmp_path):
    queries = [
        QueryRecord("q1", "v1", "a", 0.0, 1.0, "train"),
        QueryRecord("q2", "v1", "b", None, None, None),
        QueryRecord("q3", "v2", "c", None, None, None),
    ]
    out = tmp_path / "c.txt"
    with pytest.raises(AnnotationError, match="'q1' is not 'v1#enc#<k>'") as err:
        write_mssl_captions(out, queries)
    assert err.value.line == 1 and not out.exists()
    write_mssl_captions(out, queries, renumber=True)
    assert out.read_text() == "v1#enc#0 a\nv1#enc#1 b\nv2#enc#0 c\n"
    dup = [QueryRecord("v#enc#0", "v", "a", None, None, None)] * 2
    with pytest.raises(AnnotationError, match="duplicate query id"):
        write_mssl_captions(out, dup)
    with pytest.raises(AnnotationError, match="caption is empty"):
        write_mssl_captions(out, [QueryRecord("v#enc#0", "v", " \n ", None, None, None)])
