"""Annotation readers and the MS-SL caption writer, all normalised to one query record.

Every PRVR benchmark ships captions in its own layout; training, evaluation and search only ever see
`QueryRecord`s. Readers do syntax only; one validator checks every entry (times, text, ids, duplicates), so
all formats fail, or skip, the same way with the file, the line and the reason. Whatever the bytes, a reader
raises only `AnnotationError` (or OSError for the file itself): no csv, JSON or recursion error escapes.

Moments: PRVR retrieves with every caption; the moment only localises it, so an impossible moment costs the
moment, not the caption. Start after end, a negative or non-finite time, or a start after the video's end
(where the file gives the duration: ActivityNet, TVR) drops the moment (start = end = None); an end after the
video's end is clipped to it (silently within `MOMENT_ROUNDING_S`, the rounding of ActivityNet's own files,
which has 134 such ends). The official Charades-STA train file has 4 of its 12,408 lines with start > end.
Each read logs ONE warning per file saying how many and which lines, and lists them in
`AnnotationSet.moment_issues`. `strict=True` makes them malformed instead (an error, or skipped with
`skip_malformed`).

Normalisation: caption whitespace is collapsed to single spaces (line breaks inside a caption would break
the line-based formats, and query features are keyed by the exact text). Query ids default to
`<video_id>#enc#<k>` (k = 0.. per video, in file order, counting accepted queries), as MS-SL does; a file's
own ids are kept where the format has them (MS-SL keys, our `query_id` column). TVR's `desc_id` and `type`
are not kept, nor is any file's `duration` (it only checks the moments).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.catalog import short_repr, write_text_atomic
from storage.errors import MamFusionError

logger = logging.getLogger(__name__)

FORMATS = ("activitynet", "charades", "tvr", "mssl", "csv", "jsonl")
OWN_REQUIRED = ("video_id", "start", "end", "caption")
OWN_OPTIONAL = ("split", "query_id")
MSSL_MARK = "#enc#"
_CHARADES_LINE = re.compile(r"^\s*(\S+)\s+(\S+)\s+(\S+?)\s*##(.*)$")
_CHARADES_HEAD = re.compile(r"^\S+\s+[-+0-9.eE]+\s+[-+0-9.eE]+\s*##")
_MSSL_HEAD = re.compile(r"^\S+#enc#\d+\s")
_CONTENT_PREVIEW = 200
MOMENT_ROUNDING_S = 0.05  # an end this far past the video's duration is rounding: clipped without a word
_LISTED_IN_WARNING = 10


class AnnotationError(MamFusionError, ValueError):
    """A malformed annotation entry or file: `path`, 1-based `line`, and `reason`.

    `skippable`: the problem is one entry's, which `skip_malformed` would have skipped (not the whole file's).
    """

    def __init__(
        self, path: str | os.PathLike[str], line: int, reason: str, *, skippable: bool = False
    ) -> None:
        self.path, self.line, self.reason, self.skippable = str(path), line, reason, skippable
        super().__init__(f"{path}:{line}: {reason}")


@dataclass(frozen=True)
class QueryRecord:
    """One text query and the video (and optionally the moment, in seconds) it describes."""

    query_id: str
    video_id: str
    text: str
    start: float | None
    end: float | None
    split: str | None


@dataclass(frozen=True)
class SkippedLine:
    """An entry left out because it was malformed, kept so that run reports can list it."""

    path: str
    line: int
    reason: str
    content: str


@dataclass
class AnnotationSet:
    """The queries of one annotation file, what was skipped, the format, and the moments dropped or clipped.

    `moment_issues` lists accepted queries whose moment was invalid (their reason says what was done).
    """

    queries: list[QueryRecord]
    skipped: list[SkippedLine] = field(default_factory=list)
    format: str = ""
    moment_issues: list[SkippedLine] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.queries)

    def video_ids(self) -> list[str]:
        """Unique video ids in first-seen order (the gallery order evaluation uses)."""
        return list(dict.fromkeys(q.video_id for q in self.queries))

    def splits(self) -> dict[str | None, int]:
        """Query count per split name (None: queries the file gave no split)."""
        counts: dict[str | None, int] = {}
        for q in self.queries:
            counts[q.split] = counts.get(q.split, 0) + 1
        return counts

    def split(self, name: str) -> AnnotationSet:
        """Queries of one split. Skipped lines stay with every subset: their split is unknown."""
        queries = [q for q in self.queries if q.split == name]
        return AnnotationSet(queries, list(self.skipped), self.format, list(self.moment_issues))


@dataclass(frozen=True)
class _Entry:
    """One entry as a reader found it, before validation; values may have any type."""

    line: int
    content: str
    video_id: Any
    text: Any
    start: Any = None
    end: Any = None
    split: Any = None
    query_id: Any = None
    duration: Any = None  # the video's length where the file gives it (ActivityNet, TVR)


@dataclass(frozen=True)
class _Bad:
    """An entry a reader could not even split into fields."""

    line: int
    content: str
    reason: str


_Item = _Entry | _Bad
_MISSING = object()  # a time field that is present but not a [start, end] pair


def clean_text(text: str) -> str:
    """Collapse whitespace runs to single spaces and strip: the form every reader stores."""
    return " ".join(text.split())


def read_annotations(
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    skip_malformed: bool = False,
    split: str | None = None,
    strict: bool = False,
) -> AnnotationSet:
    """Read an annotation file in any of FORMATS (detected when `format` is None).

    A malformed entry raises AnnotationError, or with `skip_malformed` lands in `skipped`. An invalid moment
    keeps its caption without (or with a clipped) moment and one warning per file, unless `strict`, which
    makes it malformed. `split` labels the queries whose file gives no split of its own (every format but
    csv/jsonl with a `split` column).
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown annotation format {format!r}; known: {', '.join(FORMATS)}")
    data = Path(path).read_bytes()
    data = data.removeprefix(b"\xef\xbb\xbf")
    fmt = format or detect_format(path, data)
    line_parser = _LINE_PARSERS.get(fmt)
    items = _per_line(data, line_parser) if line_parser else _FILE_READERS[fmt](path, data)
    result = _collect(path, fmt, items, skip_malformed=skip_malformed, default_split=split, strict=strict)
    if result.moment_issues:
        _warn_moments(path, result)
    return result


def _warn_moments(path: str | os.PathLike[str], result: AnnotationSet) -> None:
    """The one warning per file: how many moments were invalid, which lines, and how to refuse them."""
    issues = result.moment_issues
    listed = "; ".join(f"line {i.line}: {i.reason}" for i in issues[:_LISTED_IN_WARNING])
    more = f"; and {len(issues) - _LISTED_IN_WARNING} more" if len(issues) > _LISTED_IN_WARNING else ""
    logger.warning(
        "%s: %d of %d queries have an invalid moment; their captions are kept (%s%s). "
        "strict=True (--strict) refuses such lines",
        path,
        len(issues),
        len(result.queries),
        listed,
        more,
    )


def detect_format(path: str | os.PathLike[str], data: bytes) -> str:
    """The format from the first non-blank line; the file name decides only what the content cannot."""
    name = Path(path).name.lower()
    line_no, head = next(((i, line) for i, line in enumerate(data.splitlines(), 1) if line.strip()), (1, b""))
    text = head.decode("utf-8", "replace").strip()
    if text.startswith("{"):
        return _detect_json(text, name)
    if _MSSL_HEAD.match(text):
        return "mssl"
    if _CHARADES_HEAD.match(text):
        return "charades"
    try:
        cells = next(csv.reader([text]), [])
    except csv.Error:  # e.g. a first line longer than the csv field limit: not our header
        cells = []
    if text and {"video_id", "caption"} <= {c.strip() for c in cells}:
        return "csv"
    # Empty, or a header with a typo: the suffix picks the reader, whose error then says what is wrong.
    for suffix, fmt in ((".json", "activitynet"), (".jsonl", "jsonl"), (".csv", "csv")):
        if name.endswith(suffix):
            return fmt
    reason = f"cannot tell the annotation format; name one of {', '.join(FORMATS)}"
    raise AnnotationError(path, line_no, reason)


def _detect_json(first_line: str, name: str) -> str:
    """One key is enough, so that a first line missing a field is read, and reported, by the right reader."""
    try:
        obj = json.loads(first_line)
    except (ValueError, RecursionError):  # a document over several lines, a broken or absurd first line
        obj = None
    keys = obj.keys() if isinstance(obj, dict) else set()
    if keys & {"vid_name", "desc"}:
        return "tvr"
    if keys & {"video_id", "caption"}:
        return "jsonl"
    if name.endswith(".jsonl"):
        return "tvr" if "tvr" in name else "jsonl"
    return "activitynet"


# ---- readers: bytes -> entries ----


def _per_line(data: bytes, parse: Callable[[int, str], _Item]) -> Iterator[_Item]:
    """Parse non-blank lines one by one, each decoded alone so that a bad byte costs only its own line."""
    for line_no, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield _Bad(line_no, _preview(raw.decode("utf-8", "replace")), f"not valid UTF-8 ({exc.reason})")
            continue
        if line.strip():
            yield parse(line_no, line)


def _whole_text(path: str | os.PathLike[str], data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise AnnotationError(path, line, f"not valid UTF-8 ({exc.reason})") from exc


def _preview(content: str) -> str:
    content = content.strip()
    return content if len(content) <= _CONTENT_PREVIEW else content[:_CONTENT_PREVIEW] + "..."


def _json_preview(value: Any) -> str:
    """Preview of a parsed JSON value (one nested as deep as the parser allows may not re-encode)."""
    try:
        return _preview(json.dumps(value))
    except (RecursionError, ValueError):
        return "<too deeply nested to show>"


def _json_problem(exc: Exception) -> str:
    """Why `json.loads` refused a text, in one short clause."""
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    if isinstance(exc, RecursionError):
        return "not readable JSON (nested too deeply)"
    return f"not readable JSON ({str(exc).split(':')[0]})"  # ValueError: an integer of over 4300 digits


def _charades_entry(line_no: int, line: str) -> _Item:
    match = _CHARADES_LINE.match(line)
    if match is None:
        return _Bad(line_no, _preview(line), "expected 'VIDEO_ID START END##sentence'")
    video_id, start, end, text = match.groups()
    return _Entry(line_no, _preview(line), video_id, text, _number(start), _number(end))


def _mssl_entry(line_no: int, line: str) -> _Item:
    key, *rest = line.strip().split(None, 1)
    video_id, mark, k = key.rpartition(MSSL_MARK)
    if not mark or not k.isdigit() or not rest:
        return _Bad(line_no, _preview(line), "expected 'VIDEO_ID#enc#K caption'")
    return _Entry(line_no, _preview(line), video_id, rest[0], query_id=key)


def _json_object(line_no: int, line: str) -> dict[str, Any] | _Bad:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        return _Bad(line_no, _preview(line), _json_problem(exc))
    return obj if isinstance(obj, dict) else _Bad(line_no, _preview(line), "expected a JSON object")


def _tvr_entry(line_no: int, line: str) -> _Item:
    obj = _json_object(line_no, line)
    if isinstance(obj, _Bad):
        return obj
    missing = [k for k in ("vid_name", "desc") if k not in obj]
    if missing:
        return _Bad(line_no, _preview(line), f"missing field(s) {', '.join(missing)}")
    start, end = _pair(obj.get("ts"))
    if start is _MISSING:
        return _Bad(line_no, _preview(line), f"ts must be [start, end], got {short_repr(obj['ts'])}")
    return _Entry(
        line_no, _preview(line), obj["vid_name"], obj["desc"], start, end, duration=obj.get("duration")
    )


def _jsonl_entry(line_no: int, line: str) -> _Item:
    obj = _json_object(line_no, line)
    if isinstance(obj, _Bad):
        return obj
    problem = _own_columns_problem(obj.keys(), all_required=False)
    if problem:
        return _Bad(line_no, _preview(line), problem)
    return _Entry(line_no, _preview(line), obj["video_id"], obj["caption"], **_own_extras(obj))


def _csv_rows(path: str | os.PathLike[str], data: bytes) -> Iterator[tuple[int, list[str]]]:
    """(line, row) pairs; a csv error is the file's (an unbalanced quote swallows what follows it)."""
    reader = csv.reader(io.StringIO(_whole_text(path, data), newline=""))
    while True:
        first_line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):
                reason = (
                    f"a CSV field starting on this line is longer than {csv.field_size_limit():,} "
                    "characters (an unbalanced quote?)"
                )
            else:
                reason = f"not valid CSV ({exc})"
            raise AnnotationError(path, first_line, reason) from None
        yield reader.line_num, row


def _read_csv(path: str | os.PathLike[str], data: bytes) -> Iterator[_Item]:
    header: list[str] | None = None
    for line_no, row in _csv_rows(path, data):
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [c.strip() for c in row]
            problem = _own_columns_problem(header, all_required=True)
            if problem:
                raise AnnotationError(path, line_no, f"CSV header: {problem}")
            continue
        content = _preview(",".join(row))
        if len(row) != len(header):
            yield _Bad(line_no, content, f"expected {len(header)} fields, found {len(row)}")
            continue
        obj = {k: (v.strip() or None) for k, v in zip(header, row, strict=True)}
        start, end = _number(obj.pop("start")), _number(obj.pop("end"))
        yield _Entry(line_no, content, obj["video_id"], obj["caption"], start, end, **_own_extras(obj))


def _own_columns_problem(columns: Iterable[str], *, all_required: bool) -> str | None:
    """What is wrong with the column/key names of our own format (None: nothing)."""
    counts = Counter(columns)
    needed = OWN_REQUIRED if all_required else ("video_id", "caption")
    missing = [c for c in needed if c not in counts]
    unknown = [c for c in counts if c not in OWN_REQUIRED + OWN_OPTIONAL]
    duplicated = sorted(c for c, n in counts.items() if n > 1)
    if missing:
        return f"missing column(s) {', '.join(missing)}"
    if unknown:
        return f"unknown column(s) {', '.join(unknown)} (known: {', '.join(OWN_REQUIRED + OWN_OPTIONAL)})"
    if duplicated:
        return f"repeated column(s) {', '.join(duplicated)}"
    return None


def _own_extras(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: obj.get(k) for k in ("start", "end", "split", "query_id") if k in obj}


def _read_activitynet(path: str | os.PathLike[str], data: bytes) -> Iterator[_Item]:
    text = _whole_text(path, data)
    try:
        videos = json.loads(text)
    except (ValueError, RecursionError) as exc:
        line = exc.lineno if isinstance(exc, json.JSONDecodeError) else 1
        raise AnnotationError(path, line, _json_problem(exc)) from None
    if not isinstance(videos, dict):
        raise AnnotationError(path, 1, "expected a JSON object {video_id: {timestamps, sentences}}")
    lines = _key_lines(text)
    for video_id, entry in videos.items():
        line_no = lines.get(video_id, 1)
        where = f"video {video_id!r}"
        if not isinstance(entry, dict):
            yield _Bad(line_no, _json_preview({video_id: entry}), f"{where}: expected an object")
            continue
        stamps, sentences = entry.get("timestamps"), entry.get("sentences")
        if not isinstance(stamps, list) or not isinstance(sentences, list) or len(stamps) != len(sentences):
            reason = f"{where}: 'timestamps' and 'sentences' must be lists of the same length"
            yield _Bad(line_no, _json_preview({video_id: entry}), reason)
            continue
        duration = entry.get("duration")
        for k, (stamp, sentence) in enumerate(zip(stamps, sentences, strict=True)):
            content = _json_preview({video_id: {"timestamps": [stamp], "sentences": [sentence]}})
            start, end = _pair(stamp)
            if start is _MISSING:
                yield _Bad(line_no, content, f"{where}: timestamps[{k}] is not [start, end]")
                continue
            yield _Entry(line_no, content, video_id, sentence, start, end, duration=duration)


def _key_lines(text: str) -> dict[str, int]:
    """Line of the first `"key": {` for every key: where to point a reader at a video entry, in one pass."""
    lines: dict[str, int] = {}
    line, pos = 1, 0
    for match in re.finditer(r'"((?:[^"\\\n]|\\.)*)"\s*:\s*\{', text):
        line += text.count("\n", pos, match.start())
        pos = match.start()
        try:
            key = json.loads(f'"{match.group(1)}"')
        except json.JSONDecodeError:
            continue
        lines.setdefault(key, line)
    return lines


def _pair(value: Any) -> tuple[Any, Any]:
    """(start, end) from a `[start, end]` list; (None, None) when absent; _MISSING when it is not a pair."""
    if value is None:
        return None, None
    if isinstance(value, list | tuple) and len(value) == 2:
        return value[0], value[1]
    return _MISSING, _MISSING


def _number(text: str | None) -> Any:
    """A float from a text field, or the text itself for the validator to reject with its value."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


_LINE_PARSERS: dict[str, Callable[[int, str], _Item]] = {
    "charades": _charades_entry,
    "mssl": _mssl_entry,
    "tvr": _tvr_entry,
    "jsonl": _jsonl_entry,
}
_FILE_READERS: dict[str, Callable[[str | os.PathLike[str], bytes], Iterator[_Item]]] = {
    "activitynet": _read_activitynet,
    "csv": _read_csv,
}


# ---- validation: entries -> queries ----


class _Invalid(Exception):
    pass


def _collect(
    path: str | os.PathLike[str],
    fmt: str,
    items: Iterable[_Item],
    *,
    skip_malformed: bool,
    default_split: str | None,
    strict: bool = False,
) -> AnnotationSet:
    queries: list[QueryRecord] = []
    skipped: list[SkippedLine] = []
    issues: list[SkippedLine] = []
    first_line: dict[str, int] = {}
    per_video: dict[str, int] = {}
    for item in items:
        try:
            if isinstance(item, _Bad):
                raise _Invalid(item.reason)
            query, problem, action = _validate(item, per_video, default_split)
            if problem and strict:
                raise _Invalid(problem)
            if query.query_id in first_line:
                raise _Invalid(
                    f"duplicate query id {short_repr(query.query_id)} "
                    f"(first at line {first_line[query.query_id]})"
                )
        except _Invalid as exc:
            if not skip_malformed:
                raise AnnotationError(path, item.line, str(exc), skippable=True) from None
            skipped.append(SkippedLine(str(path), item.line, str(exc), item.content))
            continue
        if problem:
            issues.append(SkippedLine(str(path), item.line, f"{problem}: {action}", item.content))
        first_line[query.query_id] = item.line
        per_video[query.video_id] = per_video.get(query.video_id, 0) + 1
        queries.append(query)
    return AnnotationSet(queries, skipped, fmt, issues)


def _validate(
    entry: _Entry, per_video: dict[str, int], default_split: str | None
) -> tuple[QueryRecord, str | None, str | None]:
    """The query, and what is wrong with its moment and what was done about it (None, None: nothing)."""
    video_id = _identifier("video id", entry.video_id)
    if not isinstance(entry.text, str) or not clean_text(entry.text):
        raise _Invalid(f"caption must be non-empty text, got {short_repr(entry.text)}")
    _encodable("caption", entry.text)
    start, end = _seconds("start", entry.start), _seconds("end", entry.end)
    if (start is None) != (end is None):
        raise _Invalid("give both start and end, or neither")
    start, end, problem, action = _moment(start, end, _duration(entry.duration))
    split = default_split if entry.split is None else _identifier("split", entry.split)
    if entry.query_id is None:
        query_id = f"{video_id}{MSSL_MARK}{per_video.get(video_id, 0)}"
    else:
        query_id = _identifier("query id", entry.query_id)
    return QueryRecord(query_id, video_id, clean_text(entry.text), start, end, split), problem, action


def _moment(
    start: float | None, end: float | None, duration: float | None
) -> tuple[float | None, float | None, str | None, str | None]:
    """(start, end, problem, action): an impossible moment is dropped; an end past the video is clipped."""
    if start is None or end is None:
        return None, None, None, None
    for what, value in (("start", start), ("end", end)):
        if not math.isfinite(value) or value < 0:
            problem = f"{what} must be a finite, non-negative number of seconds, got {value!r}"
            return None, None, problem, "moment dropped"
    if start > end:
        return None, None, f"start {start:g} s is after end {end:g} s", "moment dropped"
    if duration is None or end <= duration:
        return start, end, None, None
    if start > duration + MOMENT_ROUNDING_S:
        return None, None, f"start {start:g} s is after the video's end ({duration:g} s)", "moment dropped"
    start = min(start, duration)
    if end <= duration + MOMENT_ROUNDING_S:
        return start, duration, None, None
    problem = f"end {end:g} s is after the video's end ({duration:g} s)"
    return start, duration, problem, f"end clipped to {duration:g} s"


def _duration(value: Any) -> float | None:
    """The video length a file states, when it is a usable number; anything else counts as not given."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def _identifier(what: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"{what} must be non-empty text, got {short_repr(value)}")
    if value != value.strip() or len(value.split()) != 1:
        raise _Invalid(f"{what} {short_repr(value)} must not contain whitespace")
    _encodable(what, value)
    return value


def _encodable(what: str, value: str) -> None:
    """JSON allows lone surrogates (\\ud800), which no UTF-8 file, store key or tokenizer can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(f"{what} {short_repr(value)} is not valid Unicode (a lone surrogate)") from None


def _seconds(what: str, value: Any) -> float | None:
    """A time as a float (negative or non-finite ones are `_moment`'s to judge); a non-number is malformed."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"{what} must be a number of seconds, got {short_repr(value)}")
    try:
        return float(value)
    except OverflowError:  # an integer beyond float range
        return math.inf if value > 0 else -math.inf


# ---- writer ----


def write_mssl_captions(
    path: str | os.PathLike[str], queries: Iterable[QueryRecord], *, renumber: bool = False
) -> None:
    """Write `VIDEO_ID#enc#K caption` lines, the caption format MS-SL's loaders read.

    Query ids must already be `<video_id>#enc#<k>` (what our readers give by default), so that reading the
    file back gives the same queries; `renumber=True` assigns k = 0.. per video instead. Times and splits are
    not part of the format. The file is replaced atomically.
    """
    lines = []
    seen: set[str] = set()
    per_video: dict[str, int] = {}
    for i, q in enumerate(queries, 1):
        try:
            video_id = _identifier("video id", q.video_id)
            text = clean_text(q.text)
            if not text:
                raise _Invalid("caption is empty")
            text.encode("utf-8")
        except (_Invalid, UnicodeEncodeError) as exc:
            raise AnnotationError(path, i, f"query {q.query_id!r}: {exc}") from None
        if renumber:
            query_id = f"{video_id}{MSSL_MARK}{per_video.get(video_id, 0)}"
            per_video[video_id] = per_video.get(video_id, 0) + 1
        else:
            query_id = q.query_id
            prefix, mark, k = query_id.rpartition(MSSL_MARK)
            if prefix != video_id or not mark or not k.isdigit():
                reason = (
                    f"query id {query_id!r} is not '{video_id}#enc#<k>' (pass renumber=True to assign ids)"
                )
                raise AnnotationError(path, i, reason)
        if query_id in seen:
            raise AnnotationError(path, i, f"duplicate query id {query_id!r}")
        seen.add(query_id)
        lines.append(f"{query_id} {text}\n")
    write_text_atomic(path, "".join(lines))
