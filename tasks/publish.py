"""Publishing trained runs: versioned model directories and a champion/challenger `current` pointer.

Layout under a models folder:

    models/<version>/     a copy of the training run (weights, config, features.json, metrics, report, plots),
                          without the resumable checkpoint; plus publish.json (the decision and why)
    models/current        one line: the version serving searches. Replaced atomically, so a reader sees the
                          old or the new version, never half a file.

A challenger becomes current only if its SumR on the evaluation split is at least the champion's on the *same*
split (the champion is re-evaluated on today's split, never compared by the number it got on an older one).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from storage.annotations import read_annotations
from storage.catalog import write_text_atomic
from storage.errors import MamFusionError
from tasks.evaluate import evaluate_saved_run

log = logging.getLogger(__name__)

CURRENT = "current"
PUBLISH_FILE = "publish.json"
_NOT_PUBLISHED = ("checkpoints",)  # optimiser state for resuming; not part of a model


class PublishError(MamFusionError, RuntimeError):
    """The models folder is not in a state we can publish into (e.g. `current` names a missing version)."""


@dataclass(frozen=True)
class Decision:
    """Whether the challenger replaced the champion, with the numbers that decided it."""

    version: str
    model_dir: str
    promoted: bool
    reason: str
    split: str
    challenger_sumr: float
    champion_version: str | None
    champion_sumr: float | None
    current: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_version(run_id: str, now: dt.datetime | None = None) -> str:
    """Sortable, unique per run: UTC time, then the first characters of the run id."""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{run_id.replace('-', '')[:8]}"


def read_current(models_dir: str | Path) -> str | None:
    """The current version, or None before the first publish."""
    pointer = Path(models_dir) / CURRENT
    if not pointer.is_file():
        return None
    version = pointer.read_text().strip()
    if not (Path(models_dir) / version).is_dir():
        raise PublishError(f"{pointer} names version {version!r}, which is not in {models_dir}")
    return version


def set_current(models_dir: str | Path, version: str) -> None:
    if not (Path(models_dir) / version).is_dir():
        raise PublishError(f"cannot make {version!r} current: {Path(models_dir) / version} does not exist")
    write_text_atomic(Path(models_dir) / CURRENT, version + "\n")


def decide(challenger_sumr: float, champion_sumr: float | None, split: str) -> tuple[bool, str]:
    """Promote without a champion, or when the challenger is at least as good (a tie favours the newer)."""
    if champion_sumr is None:
        return True, "no current model yet"
    if challenger_sumr >= champion_sumr:
        return True, f"SumR {challenger_sumr:.2f} >= current model's {champion_sumr:.2f} on split {split!r}"
    return False, f"SumR {challenger_sumr:.2f} < current model's {champion_sumr:.2f} on split {split!r}"


def evaluate_model(
    model_dir: str | Path, store_url: str, annotations: str | Path, split: str, fmt: str | None = None
) -> dict[str, Any]:
    """Metrics of a published model on `split` of an annotation file, with the features it was trained on."""
    ann = read_annotations(annotations, fmt, skip_malformed=True)
    subset = ann.split(split) if split in ann.splits() else ann
    result, _ = evaluate_saved_run(model_dir, subset, name=split, store_url=store_url, details=False)
    return {"split": split, **result.metrics}


def copy_run(run_dir: str | Path, models_dir: str | Path, version: str) -> Path:
    """Copy a training run into models/<version> (via a temp name, so a half copy is never a version)."""
    target = Path(models_dir) / version
    if target.exists():
        raise PublishError(f"{target} already exists; versions are never overwritten")
    tmp = target.with_name(f".{version}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run_dir, tmp, ignore=shutil.ignore_patterns(*_NOT_PUBLISHED))
    tmp.rename(target)
    return target


def publish(
    run_dir: str | Path,
    models_dir: str | Path,
    version: str,
    challenger: dict[str, Any],
    champion: dict[str, Any] | None,
) -> Decision:
    """Publish `run_dir` as `version`; move `current` to it if it wins (see `decide`).

    `challenger` and `champion` are metrics dicts on the same split; `champion` also carries its `version`.
    The decision is written to models/<version>/publish.json and appended to its report.md.
    """
    models = Path(models_dir)
    models.mkdir(parents=True, exist_ok=True)
    target = copy_run(run_dir, models, version)
    champion_sumr = None if champion is None else float(champion["sumr"])
    promoted, reason = decide(float(challenger["sumr"]), champion_sumr, challenger["split"])
    if promoted:
        set_current(models, version)
    decision = Decision(
        version=version,
        model_dir=str(target),
        promoted=promoted,
        reason=reason,
        split=challenger["split"],
        challenger_sumr=float(challenger["sumr"]),
        champion_version=None if champion is None else champion["version"],
        champion_sumr=champion_sumr,
        current=version if promoted else champion["version"],  # type: ignore[index]
    )
    (target / PUBLISH_FILE).write_text(json.dumps(decision.to_dict(), indent=2))
    report = target / "report.md"
    if report.is_file():
        with open(report, "a") as f:
            f.write("\n" + render_decision(decision))
    log.info("published %s: %s (%s)", version, "now current" if promoted else "kept as candidate", reason)
    return decision


def render_decision(decision: Decision) -> str:
    """The report's publishing section: which model serves searches now, and why."""
    outcome = (
        f"**{decision.version} is now the current model**"
        if decision.promoted
        else f"**{decision.version} was kept as a candidate; {decision.current} stays current**"
    )
    return f"## Publishing\n\n{outcome}: {decision.reason}.\n"
