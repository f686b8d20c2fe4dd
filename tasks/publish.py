"""Publishing trained runs: champion/challenger under one lock, and nothing new for an identical challenger.

`publish` holds the models folder's lock across read-champion, evaluate, compare and swap-`current`, so two
pipelines publishing at once serialise: the second compares against whatever the first left current, and
both publish.json files stay true. Only a strictly better SumR on the same split and gallery replaces the
champion (a tie keeps it: a re-run must not churn versions), and a challenger trained with exactly the
champion's config on exactly its data publishes nothing at all.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

from storage.registry import ModelDir, ModelRegistry, PublishRecord, RetrievalMetrics, RunDir
from tasks.evaluate import evaluate_saved_run
from tasks.metrics import describe_gallery
from tasks.train import TrainRequest, plan_splits

log = logging.getLogger(__name__)

ChampionEvaluator = Callable[[ModelDir], RetrievalMetrics]


class PublishOutcome(BaseModel):
    """What a publish did: a new version or none, whether it became current, and why."""

    model_config = ConfigDict(frozen=True)

    published: bool
    promoted: bool
    version: str | None  # None when nothing was published
    current: str
    reason: str
    record: PublishRecord | None = None


def decide(challenger: RetrievalMetrics, champion: RetrievalMetrics | None) -> tuple[bool, str]:
    """Promote without a champion, or when the challenger's SumR is strictly higher on the same evaluation."""
    if champion is None:
        return True, "no current model yet"
    where = describe_gallery(challenger)
    if (champion.split, champion.n_videos, champion.n_queries) != (
        challenger.split,
        challenger.n_videos,
        challenger.n_queries,
    ):
        where += f" (the champion could only be ranked on {describe_gallery(champion)})"
    if challenger.sumr > champion.sumr:
        return True, f"SumR {challenger.sumr:.2f} > current model's {champion.sumr:.2f} on {where}"
    return False, (
        f"SumR {challenger.sumr:.2f} <= current model's {champion.sumr:.2f} on {where}; only a strictly "
        "better model replaces it"
    )


def publish(
    run: RunDir,
    registry: ModelRegistry,
    version: str,
    challenger: RetrievalMetrics,
    evaluate_champion: ChampionEvaluator,
) -> PublishOutcome:
    """Publish `run` as `version` and make it current if it wins; see the module docstring.

    `evaluate_champion` ranks a model on the challenger's split and gallery; it is called under the lock
    with whichever model is current then.
    """
    with registry.lock():
        champion = registry.current()
        if champion is not None and champion.same_training(run):
            reason = f"identical to the current model {champion.version} (same config, same data)"
            log.info("nothing published: %s", reason)
            return PublishOutcome(
                published=False, promoted=False, version=None, current=champion.version, reason=reason
            )
        champion_metrics = None if champion is None else evaluate_champion(champion)
        promoted, reason = decide(challenger, champion_metrics)
        model = registry.add_version(run, version)
        current = version if promoted else champion.version  # type: ignore[union-attr]
        record = PublishRecord(
            version=version,
            promoted=promoted,
            reason=reason,
            split=challenger.split,
            gallery=describe_gallery(challenger),
            n_videos=challenger.n_videos,
            n_queries=challenger.n_queries,
            challenger_sumr=challenger.sumr,
            champion_version=None if champion is None else champion.version,
            champion_sumr=None if champion_metrics is None else champion_metrics.sumr,
            current=current,
            decided_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        registry.write_publish(model, record)
        if model.report_file.is_file():
            with open(model.report_file, "a") as f:
                f.write("\n" + render_decision(record))
        if promoted:  # last: `current` never names a version without its publish.json
            registry.set_current(version)
    log.info("published %s: %s (%s)", version, "now current" if promoted else "kept as candidate", reason)
    return PublishOutcome(
        published=True, promoted=promoted, version=version, current=current, reason=reason, record=record
    )


def evaluate_on_request(model: ModelDir, request: TrainRequest, split: str) -> RetrievalMetrics:
    """A published model on a training request's evaluated split, with the same gallery the run used."""
    queries, distractors = plan_splits(request).evaluated(split)
    result, _ = evaluate_saved_run(
        model, queries, name=split, store_url=request.store, distractors=distractors, details=False
    )
    return result.metrics


def render_decision(record: PublishRecord) -> str:
    """The report's publishing section: which model serves searches now, and why."""
    outcome = (
        f"**{record.version} is now the current model**"
        if record.promoted
        else f"**{record.version} was kept as a candidate; {record.current} stays current**"
    )
    return f"## Publishing\n\n{outcome}: {record.reason}.\n"
