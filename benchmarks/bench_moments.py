"""Moment localisation on the demo corpus: the span rule vs the single best clip vs chance.

    .venv/bin/python benchmarks/bench_moments.py [--videos 80] [--margins 0 0.1 ... 1]

Generates the seeded demo corpus, extracts `lite` features from the real files, trains the `demo` preset,
then reads moments off the trained model's clip-score profiles. The margin of the `grow` rule is chosen on the
validation split (best mean IoU) and the chosen rule is reported on the test split beside the single-clip
baseline and chance (a random span of the mean true length). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from models.config import load_preset
from models.mamfusion import MamFusion
from storage.annotations import read_annotations
from storage.catalog import scan_videos
from storage.demo_corpus import generate_demo_corpus
from storage.feature_store import FeatureStore
from storage.registry import MomentTable
from tasks.data import load_split
from tasks.evaluate import evaluate
from tasks.extract import extract_queries, extract_videos
from tasks.moments import SpanRule
from tasks.profiles import feature_profile
from tasks.train import TrainRequest, train_run


def row(label: str, t: MomentTable) -> str:
    return f"| {label} | {t.mean_iou:.3f} | {t.r1_iou3:.1f} | {t.r1_iou5:.1f} | {t.r1_iou7:.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=80)
    parser.add_argument("--margins", type=float, nargs="+", default=[i / 10 for i in range(11)])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-moments-"))
    corpus = generate_demo_corpus(
        root / "corpus", n_videos=args.videos, seed=0, split_fractions=(0.5, 0.1, 0.4)
    )
    profile = feature_profile("lite", visual={"device": "cpu"}, text={"device": "cpu"})
    store = FeatureStore(root / "features.zarr")
    extract_videos(scan_videos(corpus.videos_dir).catalog.videos, profile, store)
    annotations = read_annotations(corpus.annotations_path)
    text = extract_queries([q.text for q in annotations.queries], profile, store)
    config = load_preset("demo", {"device": "cpu"})
    request = TrainRequest(
        config=config, store=store.url, annotations=corpus.annotations_path, run_dir=str(root / "run")
    )
    train_run(request, progress=False)
    model = MamFusion.from_pretrained(root / "run")
    visual_fp = next(fp for fp, i in store.extractors().items() if i["kind"] == "visual")
    fps = (visual_fp, text.fingerprint)
    val = load_split(store, annotations, "val", *fps)
    test = load_split(store, annotations, "test", *fps)

    print(
        f"demo corpus: {args.videos} videos; val {len(val.queries)} queries, "
        f"test {len(test.queries)} queries\n"
    )
    print("Validation (choosing the margin):\n")
    print("| grow margin | mean IoU | R@1 IoU≥0.3 | R@1 IoU≥0.5 | R@1 IoU≥0.7 |")
    print("|---:|---:|---:|---:|---:|")
    scores = {}
    for margin in args.margins:
        m = evaluate(model, val, details=False, span_rule=SpanRule("grow", margin)).metrics.moments
        assert m is not None
        scores[margin] = m.span.mean_iou
        print(row(f"{margin:g}", m.span).replace("| ", "| ", 1))
    best = max(scores, key=lambda k: (scores[k], -k))
    m = evaluate(model, test, details=False, span_rule=SpanRule("grow", best)).metrics.moments
    assert m is not None
    print(
        f"\nTest split ({m.n_queries} queries, mean true length {m.mean_true_length:.1f} s), "
        f"margin {best:g}:\n"
    )
    print("| rule | mean IoU | R@1 IoU≥0.3 | R@1 IoU≥0.5 | R@1 IoU≥0.7 |")
    print("|---|---:|---:|---:|---:|")
    print(row(f"span rule (grow, margin {best:g}), correct video", m.span))
    print(row("single best clip, correct video", m.single_clip))
    print(row(f"span rule (grow, margin {best:g}), top-ranked video", m.span_top1))
    print(row("single best clip, top-ranked video", m.single_clip_top1))
    print(row("chance: random span of the mean true length", m.chance))


if __name__ == "__main__":
    main()
