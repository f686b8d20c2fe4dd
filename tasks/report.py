"""The human side of a run directory: per-query results, PNG plots and a Markdown report.

Everything a reader needs sits beside the weights (config.json/model.pt come from `save_pretrained`), with
plots referenced by relative paths so the directory can be copied or published as a whole.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from models.config import ExperimentConfig  # noqa: E402
from storage.registry import (  # noqa: E402
    MomentMetrics,
    RecallTable,
    RetrievalMetrics,
    RunDir,
    RunMetrics,
    Skipped,
)
from tasks.evaluate import write_per_query  # noqa: E402
from tasks.metrics import RECALL_KS  # noqa: E402

PLOTS = "plots"


def plot_losses(history: Sequence[dict[str, Any]], path: Path) -> Path:
    """Training loss per epoch: the total and each weighted term."""
    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = [h["epoch"] for h in history]
    for name in history[0]["train"]:
        ax.plot(epochs, [h["train"][name] for h in history], label=name, lw=2.5 if name == "total" else 1.2)
    ax.set(xlabel="epoch", ylabel="loss (weighted)", title="Training loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_val_recall(history: Sequence[dict[str, Any]], path: Path) -> Path:
    """Validation R@K per epoch, with the selected (best SumR) epoch marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = [h["epoch"] for h in history]
    for k in RECALL_KS:
        ax.plot(epochs, [h["val"][f"r{k}"] for h in history], marker="o", ms=3, label=f"R@{k}")
    best = [h["epoch"] for h in history if h.get("best")]
    if best:
        ax.axvline(best[-1], color="grey", ls="--", lw=1, label=f"best epoch {best[-1]}")
    ax.set(xlabel="epoch", ylabel="recall (%)", title="Validation R@K")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_ranks(ranks: np.ndarray, n_videos: int, path: Path) -> Path:
    """Histogram of the correct video's rank on log-spaced bins (rank 1 .. gallery size)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.unique(np.geomspace(1, max(n_videos, 2) + 1, num=40).astype(int))
    ax.hist(ranks, bins=bins, color="tab:blue", edgecolor="white")
    ax.set_xscale("log")
    ax.set(
        xlabel="rank of the correct video (log scale)",
        ylabel="queries",
        title=f"Rank distribution ({len(ranks)} queries)",
    )
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def worst_queries(per_query: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The `n` highest-ranked (worst) queries, ties broken by query order."""
    return sorted(per_query, key=lambda r: -r["rank"])[:n]


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def plot_profiles(per_query: Sequence[dict[str, Any]], path: Path, n: int = 4) -> Path | None:
    """Clip-score profile of the correct video vs the annotated moment and the predicted span, n queries."""
    rows = [r for r in per_query if r.get("iou") is not None][:n]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 1, figsize=(7, 1.8 * len(rows)), squeeze=False)
    for ax, r in zip(axes[:, 0], rows, strict=True):
        mids = [(a + b) / 2 for a, b in r["clip_spans"]]
        ax.plot(mids, r["profile"], marker="o", ms=2.5, lw=1.2, label="clip score")
        ax.axvspan(r["gt_start"], r["gt_end"], color="tab:green", alpha=0.25, label="annotated")
        ax.axvspan(
            r["moment"]["start"], r["moment"]["end"], color="tab:orange", alpha=0.25, label="predicted"
        )
        ax.set_title(f"{r['text'][:70]} (IoU {r['iou']:.2f})", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("seconds")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def moments_table(m: MomentMetrics) -> list[str]:
    """Markdown rows of moment IoU: the span rule and the single clip (in the correct and the top video)."""
    rows = [
        ("span rule, correct video", m.span),
        ("single best clip, correct video", m.single_clip),
        ("span rule, top-ranked video", m.span_top1),
        ("single best clip, top-ranked video", m.single_clip_top1),
        ("chance (random span of the mean true length)", m.chance),
    ]
    lines = [
        f"Moments ({m.n_queries} queries with annotated spans, mean true length {m.mean_true_length:.1f} s; "
        f"rule: {m.rule}):",
        "",
        "| | mean IoU | R@1 IoU≥0.3 | R@1 IoU≥0.5 | R@1 IoU≥0.7 |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, t in rows:
        lines.append(f"| {label} | {t.mean_iou:.3f} | {t.r1_iou3:.2f} | {t.r1_iou5:.2f} | {t.r1_iou7:.2f} |")
    return lines


def metrics_table(m: RetrievalMetrics) -> list[str]:
    """Markdown rows: the model, chance on the same gallery, and the tie bound when ties exist."""

    def row(label: str, t: RecallTable, medr: str) -> str:
        cells = [f"{getattr(t, f'r{k}'):.2f}" + ("†" if k in m.trivial_ks else "") for k in RECALL_KS]
        return f"| {label} | " + " | ".join(cells) + f" | {t.sumr:.2f} | {medr} |"

    lines = [
        "| | R@1 | R@5 | R@10 | R@100 | SumR | MedR |",
        "|---|---:|---:|---:|---:|---:|---:|",
        row("model", m.table(), f"{m.medr:.0f}"),
        row("chance (random ranking)", m.chance, f"{m.chance_medr:.0f}"),
    ]
    if m.optimistic is not None:
        lines.append(row("model if every tie were won", m.optimistic, "-"))
    lines.append("")
    if m.trivial_ks:
        lines.append(f"† K ≥ gallery size ({m.n_videos} videos): R@K is 100 for any model.")
    if m.tied_queries:
        lines.append(
            f"{m.tied_queries} of {m.n_queries} queries have their correct video tied with another; "
            "the model row counts those ties against the model."
        )
    return lines


def render_report(
    title: str,
    cfg: ExperimentConfig,
    metrics: RunMetrics,
    plots: dict[str, str],
    worst: Sequence[dict[str, Any]],
    skipped: Sequence[Skipped],
) -> str:
    """Markdown body of report.md; `plots` maps a caption to a path relative to the report."""
    m, t = metrics, metrics.training
    gallery = (
        f"the split's {m.n_videos - m.n_distractors} videos plus {m.n_distractors} distractor videos from "
        "other splits (the split's own gallery is too small to mean much alone)"
        if m.n_distractors
        else f"the split's own {m.n_videos} videos"
    )
    lines = [
        f"# MamFusion: {title}",
        "",
        f"Evaluated on split **{m.split}**: {m.n_queries} queries ranked against a gallery of "
        f"**{m.n_videos} videos** ({gallery}). Epoch {t.best_epoch} of {t.epochs_run} was selected on "
        f"validation ({t.validation_gallery}).",
        "",
        *metrics_table(m),
        "",
    ]
    if m.moments is not None:
        lines += [*moments_table(m.moments), ""]
    if t.warnings:
        lines += ["**Warnings**", "", *[f"- {w}" for w in t.warnings], ""]
    lines += [
        "## Configuration",
        "",
        f"Recipe `{cfg.name}`.",
        "",
        "| key | value |",
        "|---|---|",
    ]
    for section in ("model", "train"):
        for key, value in getattr(cfg, section).model_dump(mode="json").items():
            lines.append(f"| {section}.{key} | {_md_cell(json.dumps(value))} |")
    lines += ["", "## Plots", ""]
    for caption, rel in plots.items():
        lines += [f"![{caption}]({rel})", ""]
    lines += [
        f"## Worst-ranked queries ({len(worst)})",
        "",
        "| rank | query | correct video | top-3 retrieved |",
        "|---:|---|---|---|",
    ]
    for r in worst:
        top3 = ", ".join(r["top_video_ids"][:3])
        lines.append(
            f"| {r['rank']} | {_md_cell(r['text'])} | {_md_cell(r['video_id'])} | {_md_cell(top3)} |"
        )
    lines += ["", f"## Skipped items ({len(skipped)})", ""]
    lines += [f"- {s.kind} `{_md_cell(s.id)}`: {_md_cell(s.reason)}" for s in skipped] or ["None."]
    return "\n".join(lines) + "\n"


def write_report(
    run: RunDir,
    cfg: ExperimentConfig,
    metrics: RunMetrics,
    history: Sequence[dict[str, Any]],
    per_query: Sequence[dict[str, Any]],
    skipped: Sequence[Skipped] = (),
    *,
    title: str,
    n_worst: int = 20,
) -> Path:
    """Write eval/per_query.jsonl, plots/*.png and report.md into the run (metrics.json is the run's)."""
    write_per_query(run.per_query_file, list(per_query))
    plots: dict[str, Path] = {}
    if history:
        plots["Training loss"] = plot_losses(history, run.plots_dir / "train_loss.png")
        plots["Validation R@K"] = plot_val_recall(history, run.plots_dir / "val_recall.png")
    ranks = np.array([r["rank"] for r in per_query])
    plots["Rank distribution"] = plot_ranks(ranks, metrics.n_videos, run.plots_dir / "ranks.png")
    profiles = plot_profiles(per_query, run.plots_dir / "moments.png")
    if profiles is not None:
        plots["Score profile vs annotated moment"] = profiles
    rel = {caption: p.relative_to(run.path).as_posix() for caption, p in plots.items()}
    body = render_report(title, cfg, metrics, rel, worst_queries(per_query, n_worst), skipped)
    run.report_file.write_text(body)
    return run.report_file
