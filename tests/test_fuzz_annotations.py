"""Fuzzing: annotation readers and `Catalog.load` raise only the project's own errors, whatever the bytes.

Every reader format (and detection) gets random bytes, random text and mutated valid files, with and without
`skip_malformed` and `strict`. Mutations splice in what has broken parsers before: deep nesting
(RecursionError), a CSV field over the csv module's limit, integers over 4300 digits or beyond float range,
NaN/Infinity, lone surrogates, NULs, invalid UTF-8, and the formats' own separators. What is accepted must
also be sane: non-empty captions, unique ids, finite moments with 0 <= start <= end. Bounded: `max_examples`
is modest and the whole module runs in well under a minute.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from storage.annotations import FORMATS, AnnotationSet, read_annotations
from storage.catalog import Catalog, VideoRecord
from storage.errors import MamFusionError

FUZZ = settings(
    max_examples=40,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the repo
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

VALID: dict[str, bytes] = {
    "charades": b"3MSZA 24.3 30.4##person turn a light on.\nLEOL6 8.0 7.0##person is holding medicine.\n",
    "mssl": b"v_a#enc#0 a man is talking.\nv_a#enc#1 he sits down.\nv_b#enc#0 a dog runs.\n",
    "tvr": (
        json.dumps(
            {"vid_name": "friends_s01", "duration": 61.46, "ts": [16.48, 33.87], "desc": "Phoebe waves."}
        )
        + "\n"
        + json.dumps({"vid_name": "castle_s06", "duration": 91.19, "ts": [0.46, 95.0], "desc": "Cross sits."})
        + "\n"
    ).encode(),
    "jsonl": (
        json.dumps({"video_id": "v1", "start": 0, "end": 1.5, "caption": "one", "split": "train"})
        + "\n"
        + json.dumps({"video_id": "v2", "caption": "two", "query_id": "q2"})
        + "\n"
    ).encode(),
    "csv": b'video_id,start,end,caption,split\nv1,0,2.5,"a red ball, bouncing",train\nv2,,,whole video,val\n',
    "activitynet": json.dumps(
        {
            "v_uqiMw7tQ1Cc": {
                "duration": 55.15,
                "timestamps": [[0.28, 55.15], [13.79, 54.32]],
                "sentences": ["A weight lifting tutorial is given.", "  The coach helps the guy in red."],
            },
            "v_b": {"duration": 10, "timestamps": [[3, 2]], "sentences": ["backwards"]},
        },
        indent=1,
    ).encode(),
}
assert set(VALID) == set(FORMATS)

TOKENS = [
    b"[" * 3000,  # deeper than the recursion limit
    b"{" + b'"a":{' * 3000,
    b',"' + b"x" * 140_000,  # a field opening a quote, past csv.field_size_limit()
    b'\n"' + b"x" * 140_000,
    b"1" * 4400,  # an integer JSON refuses to read (over 4300 digits)
    b"1" + b"0" * 400,  # an integer beyond float range
    b"1e999",
    b"-1",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b'"\\ud800"',  # a lone surrogate, as JSON writes it
    b"\x00",
    b"\xff\xfe",
    b"\xef\xbb\xbf",
    b"\r",
    b"\n",
    b"\r\n",
    b"\t",
    b" ",
    b"##",
    b"#enc#",
    b"#enc#x",
    b",",
    b'"',
    b"\\",
    b":",
    b"null",
    b"true",
    b"[]",
    b"{}",
    b"[1]",
    b"[1, 2, 3]",
    b'"ts": [1]',
    b'"duration": -5',
    b'"query_id": "v1"',
    b"video_id,start,end,caption\n",
    "caf\u00e9 \u2028 \u0085".encode(),
]

_mutation = st.tuples(
    st.sampled_from(["insert", "delete", "replace", "duplicate_line", "drop_line"]),
    st.integers(0, 1 << 20),
    st.integers(0, 1 << 20),
    st.one_of(st.sampled_from(TOKENS), st.binary(min_size=1, max_size=8)),
)


def mutate(data: bytes, ops: list[tuple[str, int, int, bytes]]) -> bytes:
    """Apply splice operations; positions wrap around the current length so every draw means something."""
    for op, a, b, payload in ops:
        i = a % (len(data) + 1)
        if op == "insert":
            data = data[:i] + payload + data[i:]
        elif op == "delete":
            data = data[:i] + data[i + 1 + b % 32 :]
        elif op == "replace":
            data = data[:i] + payload + data[i + len(payload) :]
        else:
            lines = data.splitlines(keepends=True)
            if lines:
                k = a % len(lines)
                lines[k : k + 1] = [lines[k], lines[k]] if op == "duplicate_line" else []
                data = b"".join(lines)
    return data


def _file(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    return tmp_path_factory.mktemp("fuzz") / name


def check_read(path: Path, data: bytes, fmt: str | None, skip: bool, strict: bool) -> AnnotationSet | None:
    """Read `data` as `fmt`: only MamFusionError may escape, and what is accepted must be sane."""
    path.write_bytes(data)
    try:
        result = read_annotations(path, fmt, skip_malformed=skip, strict=strict)
    except MamFusionError as exc:
        assert str(exc)  # a message for the one line the CLI prints
        return None
    ids = [q.query_id for q in result.queries]
    assert len(set(ids)) == len(ids)
    for q in result.queries:
        assert isinstance(q.text, str) and q.text == " ".join(q.text.split()) and q.text
        assert q.video_id and not any(c.isspace() for c in q.video_id)
        assert (q.start is None) == (q.end is None)
        if q.start is not None:
            assert math.isfinite(q.start) and math.isfinite(q.end) and 0 <= q.start <= q.end
    if not skip:
        assert result.skipped == []
    if strict:
        assert result.moment_issues == []
    assert result.format in FORMATS and (fmt is None or result.format == fmt)
    return result


FORMAT_CHOICES = [*FORMATS, None]
_NAMES = {"activitynet": "val.json", "csv": "a.csv", "tvr": "tvr_val.jsonl", "jsonl": "a.jsonl"}


@pytest.mark.parametrize("fmt", FORMAT_CHOICES)
@FUZZ
@given(data=st.binary(max_size=600), skip=st.booleans(), strict=st.booleans())
def test_random_bytes(tmp_path_factory, fmt, data, skip, strict):
    check_read(_file(tmp_path_factory, _NAMES.get(fmt or "", "a.txt")), data, fmt, skip, strict)


@pytest.mark.parametrize("fmt", FORMAT_CHOICES)
@FUZZ
@given(text=st.text(max_size=300), skip=st.booleans(), strict=st.booleans())
def test_random_text(tmp_path_factory, fmt, text, skip, strict):
    data = text.encode("utf-8", "surrogatepass")  # lone surrogates become invalid UTF-8 bytes
    check_read(_file(tmp_path_factory, _NAMES.get(fmt or "", "a.txt")), data, fmt, skip, strict)


@pytest.mark.parametrize("fmt", FORMAT_CHOICES)
@settings(FUZZ, max_examples=60)
# the crashers this suite was written for, always tried (the search may not meet them in 60 draws)
@example(source="csv", ops=[("insert", 60, 0, b',"' + b"x" * 140_000)], skip=True, strict=False)
@example(source="jsonl", ops=[("insert", 0, 0, b"[" * 3000)], skip=True, strict=False)
@example(source="activitynet", ops=[("insert", 0, 0, b"[" * 3000)], skip=True, strict=True)
@example(source="tvr", ops=[("replace", 60, 0, b"1" + b"0" * 400)], skip=False, strict=False)
@given(
    source=st.sampled_from(sorted(VALID)),
    ops=st.lists(_mutation, min_size=1, max_size=4),
    skip=st.booleans(),
    strict=st.booleans(),
)
def test_mutated_valid_files(tmp_path_factory, fmt, source, ops, skip, strict):
    source = fmt or source  # a named format mutates its own sample; detection mutates any
    check_read(
        _file(tmp_path_factory, _NAMES.get(source, "a.txt")), mutate(VALID[source], ops), fmt, skip, strict
    )


@pytest.mark.parametrize("fmt", sorted(VALID))
def test_unmutated_samples_read(tmp_path, fmt):
    """The seeds are valid, so mutations start from files the readers accept (else the fuzzing is shallow)."""
    result = check_read(tmp_path / _NAMES.get(fmt, "a.txt"), VALID[fmt], None, False, False)
    assert result is not None and result.format == fmt and len(result) >= 2


VALID_CATALOG = json.dumps(
    Catalog(
        "/videos",
        [
            VideoRecord(
                "clip", "/videos/clip.mp4", "clip.mp4", 10, 1, "ab" * 32, 3.4, 30.0, 103, 64, 48, None
            ),
            VideoRecord(
                "bad", "/videos/bad.mp4", "bad.mp4", 0, 2, None, None, None, None, None, None, "no frames"
            ),
        ],
    ).to_dict(),
    indent=1,
).encode()


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=600), st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass"))
    )
)
def test_catalog_load_random_bytes(tmp_path_factory, data):
    path = _file(tmp_path_factory, "catalog.json")
    path.write_bytes(data)
    try:
        Catalog.load(path)
    except MamFusionError as exc:
        assert str(exc).startswith(str(path))


@settings(FUZZ, max_examples=80)
@given(ops=st.lists(_mutation, min_size=1, max_size=4))
def test_catalog_load_mutated(tmp_path_factory, ops):
    path = _file(tmp_path_factory, "catalog.json")
    path.write_bytes(mutate(VALID_CATALOG, ops))
    try:
        catalog = Catalog.load(path)
    except MamFusionError as exc:
        assert str(exc).startswith(str(path))
        return
    for video in catalog.videos:
        assert all(
            v is None or (isinstance(v, int | float) and math.isfinite(v) and v >= 0)
            for v in (video.duration, video.fps, video.n_frames, video.size)
        )


def test_catalog_seed_loads(tmp_path):
    path = tmp_path / "catalog.json"
    path.write_bytes(VALID_CATALOG)
    assert [v.video_id for v in Catalog.load(path).videos] == ["clip", "bad"]
