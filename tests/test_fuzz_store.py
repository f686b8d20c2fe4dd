"""Fuzzing the readers: a damaged feature store or index (bytes flipped, files cut, deleted or replaced,
zarr.json rewritten with garbage or odd JSON) may only ever raise the project's own errors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import _zarr_entries, _zarr_packs
from storage.errors import MamFusionError
from storage.feature_store import FeatureStore
from storage.index import VideoIndex, verify_index

DIM, FP, TFP = 4, "vis-fuzz", "txt-fuzz"
SETTINGS = settings(  # bounded: the three fuzz tests together take well under a minute on 2 cores
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def sha(i: int) -> str:
    return hashlib.sha256(f"fuzz-{i}".encode()).hexdigest()


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small store (loose entries, a pack of several chunks, queries, names) and a small index."""
    root = tmp_path_factory.mktemp("fuzz")
    old = _zarr_packs.PACK_CHUNK_BYTES
    _zarr_packs.PACK_CHUNK_BYTES = 3 * DIM * 4
    try:
        store = FeatureStore(root / "store.zarr")
        store.register_extractor(FP, kind="visual", dim=DIM, config={"x": 1})
        store.register_extractor(TFP, kind="text", dim=DIM, config={"y": 2})
        for i in range(4):
            f = np.random.default_rng(i).standard_normal((2 + i, DIM))
            t = np.stack([np.arange(2 + i), np.arange(2 + i) + 1.0], 1)
            store.write_video(sha(i), FP, f, t, video_id=f"vid{i}")
        store.pack(FP)
        store.write_video(sha(9), FP, np.ones((2, DIM)), np.zeros((2, 2)), video_id="late")  # loose
        store.write_queries(TFP, ["a", "b"], [np.ones((2, DIM)), np.zeros((3, DIM))])
    finally:
        _zarr_packs.PACK_CHUNK_BYTES = old
    index = VideoIndex.create(
        str(root / "index.zarr"), model_fingerprint="m", dim=DIM, n_clips=2, chunk_rows=3
    )
    rng = np.random.default_rng(0)
    index.append(
        rng.standard_normal((7, 3, DIM)).astype(np.float32),
        np.zeros((7, 2, 2), np.float32),
        [f"v{i}" for i in range(7)],
        [f"/v{i}.mp4" for i in range(7)],
        [sha(i) for i in range(7)],
    )
    index.remove([2])
    index.set_complete(True)
    return {"store": root / "store.zarr", "index": root / "index.zarr"}


def files_of(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def damage(draw: st.DrawFn, files: list[str]) -> list[tuple]:
    """1-3 mutations, each on one file of the template."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(files))
        kind = draw(st.sampled_from(["flip", "truncate", "delete", "garbage", "json-field", "json-doc"]))
        if kind == "flip":
            arg = (draw(st.lists(st.integers(0, 1 << 20), min_size=1, max_size=8)), draw(st.integers(1, 255)))
        elif kind == "truncate":
            arg = draw(st.floats(0, 1))
        elif kind == "garbage":
            arg = draw(st.binary(max_size=64))
        elif kind == "json-field":
            arg = (draw(st.integers(0, 50)), draw(json_values), draw(st.booleans()))
        elif kind == "json-doc":
            arg = draw(json_values)
        else:
            arg = None
        out.append((path, kind, arg))
    return out


def apply(root: Path, mutations: list[tuple]) -> None:
    for rel, kind, arg in mutations:
        path = root / rel
        if not path.is_file():
            continue
        data = path.read_bytes()
        if kind == "flip":
            positions, xor = arg
            buf = bytearray(data)
            for p in positions:
                if buf:
                    buf[p % len(buf)] ^= xor
            path.write_bytes(bytes(buf))
        elif kind == "truncate":
            path.write_bytes(data[: int(len(data) * arg)])
        elif kind == "delete":
            path.unlink()
        elif kind == "garbage":
            path.write_bytes(arg)
        elif kind == "json-doc":
            path.write_text(json.dumps(arg))
        elif kind == "json-field":  # change one field of a valid document (top level or its attributes)
            pick, value, in_attrs = arg
            try:
                doc = json.loads(data)
            except ValueError:
                continue
            if not isinstance(doc, dict):
                continue
            target = doc.get("attributes") if in_attrs and isinstance(doc.get("attributes"), dict) else doc
            names = sorted(target)
            target[names[pick % len(names)] if names and pick < 40 else f"x{pick}"] = value
            path.write_text(json.dumps(doc))


def only_our_errors(*calls: Callable[[], object]) -> None:
    """Each read either works or raises a MamFusionError subclass; anything else fails the example."""
    for call in calls:
        with contextlib.suppress(MamFusionError):
            call()


def store_reads(url: Path) -> None:
    def open_store() -> FeatureStore:
        return FeatureStore(url, read_only=True)

    only_our_errors(
        lambda: open_store().extractors(),
        lambda: open_store().read_videos(FP, [sha(i) for i in (0, 1, 2, 3, 9)]),
        lambda: open_store().read_video(sha(2), FP),
        lambda: open_store().read_queries(TFP, ["a", "b"]),
        lambda: open_store().resolve_video_ids(FP, ["vid0", "vid3", "late"]),
        lambda: open_store().has_video(sha(1), FP),
        lambda: open_store().has_queries(TFP, ["a"]),
        lambda: open_store().verify(),
    )


def index_reads(url: str) -> None:
    def opened() -> VideoIndex:
        return VideoIndex.open(url)

    def scattered() -> None:
        index = opened()
        if index.count:
            index.read_rows(np.array([index.count - 1, 0]))

    only_our_errors(
        lambda: opened().rows(),
        lambda: opened().load_vectors(),
        lambda: list(opened().iter_vectors(prefetch=2)),
        scattered,
        lambda: opened().read_spans(),
        lambda: opened().check_model("m"),
        lambda: verify_index(url),
    )


def fuzz_store_case(template: Path, mutations: list[tuple], reads: Callable[[Path], None]) -> None:
    _zarr_entries.VERIFIED.clear()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / template.name
        shutil.copytree(template, root)
        apply(root, mutations)
        reads(root)


def test_template_reads_cleanly(templates: dict[str, Path]) -> None:
    """The undamaged templates read without any error (so the fuzz cases start from a valid store)."""
    assert FeatureStore(templates["store"], read_only=True).verify().ok
    assert verify_index(str(templates["index"])).ok
    assert len(files_of(templates["store"])) > 30 and len(files_of(templates["index"])) > 15


@SETTINGS
@given(data=st.data())
def test_store_readers_raise_only_project_errors(templates: dict[str, Path], data: st.DataObject) -> None:
    mutations = data.draw(damage(files_of(templates["store"])))
    fuzz_store_case(templates["store"], mutations, store_reads)


@SETTINGS
@given(data=st.data())
def test_index_readers_raise_only_project_errors(templates: dict[str, Path], data: st.DataObject) -> None:
    mutations = data.draw(damage(files_of(templates["index"])))
    fuzz_store_case(templates["index"], mutations, lambda root: index_reads(str(root)))


@SETTINGS
@given(data=st.data())
def test_any_damage_to_chunk_bytes_is_detected(templates: dict[str, Path], data: st.DataObject) -> None:
    """A flipped, cut or replaced chunk never reads back as data: verify reports it, naming the object."""
    chunks = [f for f in files_of(templates["store"]) if "/c/" in f]
    rel = data.draw(st.sampled_from(chunks))
    kind = data.draw(st.sampled_from(["flip", "truncate", "delete", "garbage"]))
    arg = {
        "flip": (
            data.draw(st.lists(st.integers(0, 1 << 20), min_size=1, max_size=4)),
            1 << data.draw(st.integers(0, 7)),
        ),
        "truncate": data.draw(st.floats(0, 0.99)),
        "garbage": data.draw(st.binary(max_size=64)),
        "delete": None,
    }[kind]
    _zarr_entries.VERIFIED.clear()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store.zarr"
        shutil.copytree(templates["store"], root)
        original = (root / rel).read_bytes()
        apply(root, [(rel, kind, arg)])
        if (root / rel).is_file() and (root / rel).read_bytes() == original:
            return  # garbage that happens to equal the chunk
        report = FeatureStore(root, read_only=True).verify()
        assert not report.ok and any(d.key == rel for d in report.damaged), (rel, kind, report.damaged)
