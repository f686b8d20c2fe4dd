"""The model registry: training-run and published-model directories, their records, and `current`.

Every file name and JSON layout of a run or a model lives here and nowhere else; each record has a
`schema_version` and is validated when read, so a damaged or foreign file is a clear error, not a KeyError
three modules later. Layout:

    <run>/                       RunDir: what `mamfusion train` writes (resumable)
        config.json, model.pt    the selected epoch's weights (MamFusion.save_pretrained)
        experiment.json          the ExperimentConfig that was actually run
        features.json            FeatureSource: store, both extractors' fingerprints and configs, data digest
        metrics.json             RunMetrics: test metrics with gallery, chance, ties; training summary
        history.jsonl            one line per epoch (losses, validation metrics)
        report.md, plots/, eval/per_query.jsonl
        checkpoints/last.pt      everything needed to resume (never published)
    <models>/                    ModelRegistry
        <version>/               ModelDir: a run's copy without checkpoints, plus publish.json, index.zarr
        current                  one line: a version name that must exist in <models>
        .publish.lock            held across read-compare-swap of `current`

Search and evaluation need nothing but a ModelDir: it names the text extractor's full config, so queries are
encoded without opening the feature store.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.config import ExperimentConfig
from storage.catalog import write_text_atomic
from storage.errors import MamFusionError

SCHEMA_VERSION = 1
# Written by MamFusion.save_pretrained / read by from_pretrained (tests check the two agree).
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"
_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PUBLISH_LOCK_TIMEOUT_S = 3600.0  # a publish that evaluates a large champion can take minutes
M = TypeVar("M", bound=BaseModel)


class RegistryError(MamFusionError):
    """A run/model directory or the models folder is missing, damaged, or not what was asked for."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------- records
class Skipped(_Record):
    """One item left out of a run and why: the one shape every step reports skipped items in."""

    kind: str = Field(description="video, query, caption or annotation")
    id: str = Field(description="video id or path, query id, caption text or file:line")
    reason: str


class ExtractorSnapshot(_Record):
    """What a feature fingerprint means: enough to rebuild the extractor (text: encode queries at search)."""

    fingerprint: str
    kind: Literal["visual", "text"]
    dim: int = Field(gt=0)
    config: dict[str, Any]


class FeatureSource(_Record):
    """features.json: where a model's features came from, and what data it was trained on."""

    schema_version: Literal[1] = SCHEMA_VERSION
    store: str
    visual: ExtractorSnapshot
    text: ExtractorSnapshot
    annotations: str | None = None
    val_annotations: str | None = None
    annotation_format: str | None = None
    data_digest: str = Field(description="sha256 of the training/validation data actually read")


class RecallTable(_Record):
    """R@1/5/10/100 and their sum, in percent."""

    r1: float
    r5: float
    r10: float
    r100: float
    sumr: float


class MomentTable(_Record):
    """Temporal IoU of predicted spans with the annotated moments: mean, and R@1 at IoU >= 0.3/0.5/0.7."""

    mean_iou: float
    r1_iou3: float
    r1_iou5: float
    r1_iou7: float


class MomentMetrics(_Record):
    """Moment quality on queries whose annotation carries a span (see tasks.moments)."""

    n_queries: int
    rule: str
    mean_true_length: float
    span: MomentTable = Field(description="the span rule, in the correct video")
    single_clip: MomentTable = Field(description="the best clip alone (baseline), in the correct video")
    span_top1: MomentTable = Field(description="the span rule in the top-ranked video (0 when it is wrong)")
    single_clip_top1: MomentTable
    chance: MomentTable = Field(description="a random span of the mean true length")


class RetrievalMetrics(_Record):
    """R@K of a split's queries against a gallery, with what the numbers mean (size, chance, ties)."""

    split: str
    gallery: Literal["split", "extended"] = Field(
        description="split: the split's own videos; extended: plus distractor videos from other splits"
    )
    n_videos: int = Field(ge=1, description="gallery size the queries were ranked against")
    n_distractors: int = Field(0, ge=0, description="gallery videos that are not in the split")
    n_queries: int = Field(ge=1)
    r1: float
    r5: float
    r10: float
    r100: float
    sumr: float
    medr: float
    meanr: float
    chance: RecallTable = Field(description="expected R@K of a random ranking of the same gallery")
    chance_medr: float
    trivial_ks: list[int] = Field(description="K >= gallery size: R@K is 100 for any model")
    tied_queries: int = Field(0, ge=0, description="queries whose best positive ties with a negative")
    optimistic: RecallTable | None = Field(
        None, description="R@K if every tie were won (reported only when ties exist; r* are pessimistic)"
    )
    moments: MomentMetrics | None = Field(None, description="when the queries' annotations carry spans")

    def table(self) -> RecallTable:
        return RecallTable(r1=self.r1, r5=self.r5, r10=self.r10, r100=self.r100, sumr=self.sumr)


class TrainingSummary(_Record):
    best_epoch: int
    best_val_sumr: float
    epochs_run: int
    stopped_early: bool
    validation_gallery: str
    warnings: list[str] = Field(default_factory=list)


class RunMetrics(RetrievalMetrics):
    """metrics.json of a run: the selected epoch's test metrics plus how the epoch was chosen."""

    schema_version: Literal[1] = SCHEMA_VERSION
    training: TrainingSummary


class PublishRecord(_Record):
    """publish.json: what happened to a version when it was published, and on which evaluation."""

    schema_version: Literal[1] = SCHEMA_VERSION
    version: str
    promoted: bool
    reason: str
    split: str
    gallery: str
    n_videos: int
    n_queries: int
    challenger_sumr: float
    champion_version: str | None
    champion_sumr: float | None
    current: str
    decided_at: str


def _read(path: Path, model: type[M], what: str) -> M:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RegistryError(f"{path}: missing; {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: unreadable ({exc})") from None
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "file"
        raise RegistryError(
            f"{path}: not a valid {model.__name__} record (schema {SCHEMA_VERSION}): {field}: {first['msg']}"
        ) from None


def _write(path: Path, record: BaseModel) -> None:
    write_text_atomic(path, record.model_dump_json(indent=2))


# ------------------------------------------------------------------------------------------ directories
class _ModelFiles:
    """Files a run and a published model both have."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.path == self.path  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.path))

    config_file = property(lambda self: self.path / CONFIG_FILE)
    weights_file = property(lambda self: self.path / WEIGHTS_FILE)
    experiment_file = property(lambda self: self.path / "experiment.json")
    features_file = property(lambda self: self.path / "features.json")
    metrics_file = property(lambda self: self.path / "metrics.json")
    history_file = property(lambda self: self.path / "history.jsonl")
    report_file = property(lambda self: self.path / "report.md")
    per_query_file = property(lambda self: self.path / "eval" / "per_query.jsonl")
    plots_dir = property(lambda self: self.path / "plots")

    def has_weights(self) -> bool:
        return self.config_file.is_file() and self.weights_file.is_file()

    def read_experiment(self) -> ExperimentConfig:
        return _read(self.experiment_file, ExperimentConfig, "it holds the config the model was trained with")

    def read_features(self) -> FeatureSource:
        return _read(self.features_file, FeatureSource, "it names the features the model was trained on")

    def read_metrics(self) -> RunMetrics:
        return _read(self.metrics_file, RunMetrics, "it is written when training finishes")

    def read_history(self) -> list[dict[str, Any]]:
        if not self.history_file.is_file():
            return []
        return [json.loads(line) for line in self.history_file.read_text().splitlines() if line.strip()]

    def fingerprint(self) -> str:
        """sha256 over the files that define the model (weights, config, features), from their bytes."""
        digest = hashlib.sha256()
        for path in (self.config_file, self.weights_file, self.features_file):
            if not path.is_file():
                raise RegistryError(
                    f"{path}: missing; a model directory has {CONFIG_FILE}, {WEIGHTS_FILE} and features.json"
                )
            digest.update(f"{path.name}\0{_sha256_file(path)}\n".encode())
        return digest.hexdigest()

    def same_training(self, other: _ModelFiles) -> bool:
        """Trained with the same config on the same data: retraining would give the same model."""
        try:
            mine, theirs = self.read_features(), other.read_features()
            same_data = mine.data_digest == theirs.data_digest
            return same_data and self.read_experiment() == other.read_experiment()
        except RegistryError:
            return False


class RunDir(_ModelFiles):
    """A training run's directory (created by `mamfusion train` or the pipeline's train step)."""

    checkpoint_file = property(lambda self: self.path / "checkpoints" / "last.pt")
    best_tmp_dir = property(lambda self: self.path / ".best.tmp")

    def create(self) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def write_experiment(self, cfg: ExperimentConfig) -> None:
        write_text_atomic(self.experiment_file, cfg.model_dump_json(indent=2))

    def write_features(self, source: FeatureSource) -> None:
        _write(self.features_file, source)

    def write_metrics(self, metrics: RunMetrics) -> None:
        _write(self.metrics_file, metrics)

    def write_history(self, history: list[dict[str, Any]]) -> None:
        write_text_atomic(self.history_file, "".join(json.dumps(h) + "\n" for h in history))

    def install_best(self) -> None:
        """Move the weights saved into `best_tmp_dir` into place, file by file (no half-written model.pt)."""
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            os.replace(self.best_tmp_dir / name, self.path / name)
        self.best_tmp_dir.rmdir()


class ModelDir(_ModelFiles):
    """A published, never-modified model version (`models/<version>`), self-contained for serving."""

    publish_file = property(lambda self: self.path / "publish.json")
    index_dir = property(lambda self: self.path / "index.zarr")

    @property
    def version(self) -> str:
        return self.path.name

    def read_publish(self) -> PublishRecord | None:
        if not self.publish_file.is_file():
            return None
        return _read(self.publish_file, PublishRecord, "")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------- registry
_NOT_PUBLISHED = ("checkpoints", ".best.tmp", "eval")


def new_version(run_id: str, now: dt.datetime | None = None) -> str:
    """Sortable, unique per run: UTC time, then the first characters of the run id."""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{re.sub(r'[^A-Za-z0-9]', '', run_id)[:8]}"


def check_version_name(name: str, where: str) -> str:
    """A version is a plain folder name inside the models folder: no path separators, no `.`/`..`."""
    if not isinstance(name, str) or not _VERSION_NAME.match(name) or name in {".", ".."}:
        raise RegistryError(
            f"{where}: {name!r} is not a version name (1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit)"
        )
    return name


class ModelRegistry:
    """A models folder: versions, the `current` pointer, and the lock that makes publishing race-free."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        text = os.fspath(path)
        if "://" in text:
            raise RegistryError(
                f"models folder {text!r}: publishing needs a local folder (its lock and atomic `current` "
                "swap use the file system); keep the feature store on object storage instead"
            )
        self.path = Path(text)

    current_file = property(lambda self: self.path / "current")
    lock_file = property(lambda self: self.path / ".publish.lock")

    def versions(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.is_dir() and _VERSION_NAME.match(p.name))

    def model(self, version: str) -> ModelDir:
        """The version's directory; refuses names that are not plain versions present in this folder."""
        check_version_name(version, str(self.path))
        model = ModelDir(self.path / version)
        if not model.path.is_dir() or model.path.is_symlink():
            raise RegistryError(f"{self.path}: no version {version!r} (have: {', '.join(self.versions())})")
        return model

    def current_version(self) -> str | None:
        """The version `current` names, validated; None before the first publish."""
        if not self.current_file.is_file():
            return None
        try:
            name = self.current_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{self.current_file}: unreadable ({exc})") from None
        self.model(check_version_name(name, str(self.current_file)))
        return name

    def current(self) -> ModelDir | None:
        version = self.current_version()
        return None if version is None else self.model(version)

    def set_current(self, version: str) -> None:
        self.model(version)
        write_text_atomic(self.current_file, version + "\n")

    def add_version(self, run: RunDir, version: str) -> ModelDir:
        """Copy a run into `<models>/<version>` (via a temp name, so a half copy is never a version)."""
        check_version_name(version, str(self.path))
        target = self.path / version
        if target.exists():
            raise RegistryError(f"{target} already exists; versions are never overwritten")
        if not run.has_weights():
            raise RegistryError(f"{run.path}: no trained weights to publish")
        tmp = self.path / f".{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(run.path, tmp, ignore=shutil.ignore_patterns(*_NOT_PUBLISHED))
        tmp.rename(target)
        return ModelDir(target)

    def write_publish(self, model: ModelDir, record: PublishRecord) -> None:
        _write(model.publish_file, record)

    @contextmanager
    def lock(self, timeout_s: float = PUBLISH_LOCK_TIMEOUT_S) -> Iterator[None]:
        """Held across read-champion / compare / swap-current, so concurrent publishes serialise."""
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(self.lock_file, timeout=timeout_s):
                yield
        except Timeout:
            raise RegistryError(
                f"{self.lock_file}: another publish has held the lock for over {timeout_s:.0f} s"
            ) from None


def resolve_model_dir(path: str | os.PathLike[str]) -> ModelDir:
    """A model from a version or run folder, a models folder (its `current`) or a pipeline output folder.

    Users hand us whichever folder they see; each is recognised by its contents, never by its name.
    """
    p = Path(path)
    if not p.is_dir():
        raise RegistryError(f"{p}: no such model folder")
    if (p / CONFIG_FILE).is_file():
        return ModelDir(p)
    for models in (p, p / "models"):
        registry = ModelRegistry(models)
        if registry.current_file.is_file():
            current = registry.current()
            assert current is not None
            return current
    raise RegistryError(
        f"{p}: not a model: expected a version folder ({CONFIG_FILE}, {WEIGHTS_FILE}), a models folder "
        "with `current`, or a pipeline output folder with models/current"
    )
