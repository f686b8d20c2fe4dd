"""`mamfusion evaluate`: R@1/5/10/100 and SumR of a trained model on a split or on a caption file.

Every result names its gallery (how many videos the queries were ranked against) and chance level. Nothing
is written unless `--out` is given: a published model folder is never modified.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from storage.annotations import AnnotationSet, read_annotations
from storage.registry import ModelDir, RetrievalMetrics, resolve_model_dir
from tasks.data import DataError
from tasks.evaluate import evaluate_saved_run, gallery_distractors, write_per_query
from tasks.metrics import format_metrics

HELP = (
    "evaluate a trained model (R@1/5/10/100, SumR, with gallery size and chance) on a split or caption file"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="run or version folder, a models folder, or a pipeline output folder"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--split", default="test", help="split of the model's annotations (default test)")
    which.add_argument(
        "--captions", help="annotation/caption file to evaluate on (e.g. an MS-SL test captions)"
    )
    parser.add_argument(
        "--gallery",
        choices=("auto", "split", "extended"),
        help="rank against the split's videos, or plus every other annotated video as distractors "
        "(default: the model's train.eval_gallery; auto extends galleries under 100 videos)",
    )
    parser.add_argument("--store", help="feature store (default: the one the model was trained from)")
    parser.add_argument("--out", help="folder for metrics.json and per_query.jsonl (default: write nothing)")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


def _annotations(model: ModelDir, split: str) -> tuple[AnnotationSet, AnnotationSet]:
    """(the split's queries, the distractor pool: queries of other splits except test); 'val' may be the
    val file."""
    source = model.read_features()
    if source.annotations is None:
        raise DataError(f"{model.features_file} names no annotation file; use --captions FILE")
    fmt = source.annotation_format
    ann = read_annotations(source.annotations, fmt, skip_malformed=True)
    everything = ann
    if source.val_annotations:
        val = read_annotations(source.val_annotations, fmt, skip_malformed=True)
        everything = AnnotationSet(ann.queries + val.queries, format=ann.format)
        if split == "val":
            return val, AnnotationSet([q for q in ann.queries if q.split != "test"], format=ann.format)
    if split not in {q.split for q in ann.queries}:
        raise DataError(f"{source.annotations} has no split {split!r}; use --captions FILE")
    pool = [q for q in everything.queries if q.split not in {split, "test"}]
    return ann.split(split), AnnotationSet(pool, format=ann.format)


def evaluate_model(
    model_dir: str | Path,
    *,
    split: str = "test",
    captions: str | Path | None = None,
    gallery: str | None = None,
    store_url: str | None = None,
    out: str | Path | None = None,
) -> RetrievalMetrics:
    """Evaluate a model's weights; with `out`, write metrics.json and per_query.jsonl there."""
    model = resolve_model_dir(model_dir)
    if captions:
        queries = everything = read_annotations(captions, skip_malformed=True)
        name = Path(captions).stem
    else:
        queries, everything = _annotations(model, split)
        name = split
    policy = gallery or model.read_experiment().train.eval_gallery
    fmt = model.read_features().annotation_format
    distractors = gallery_distractors(queries, everything, policy, fmt)  # type: ignore[arg-type]
    result, _ = evaluate_saved_run(
        model, queries, name=name, store_url=store_url, distractors=distractors, details=out is not None
    )
    if out is not None:
        target = Path(out)
        write_per_query(target / "per_query.jsonl", result.per_query)
        (target / "metrics.json").write_text(result.metrics.model_dump_json(indent=2))
    return result.metrics


def run(args: argparse.Namespace) -> int:
    metrics = evaluate_model(
        args.model,
        split=args.split,
        captions=args.captions,
        gallery=args.gallery,
        store_url=args.store,
        out=args.out,
    )
    print(metrics.model_dump_json() if args.json else format_metrics(metrics))
    return 0
