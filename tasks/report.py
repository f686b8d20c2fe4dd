"""A self-contained run directory: metrics.json, per-query results, PNG plots and a Markdown report.

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


def render_report(
    cfg: ExperimentConfig,
    metrics: dict[str, Any],
    plots: dict[str, str],
    worst: Sequence[dict[str, Any]],
    skipped: Sequence[dict[str, str]],
) -> str:
    """Markdown body of report.md; `plots` maps a caption to a path relative to the report."""
    m = metrics
    lines = [
        f"# MamFusion run: {cfg.name}",
        "",
        f"Evaluated on split **{m.get('split', '?')}**: {m.get('n_queries', '?')} queries over "
        f"{m.get('n_videos', '?')} videos; best validation epoch {m.get('best_epoch', '?')}.",
        "",
        "| R@1 | R@5 | R@10 | R@100 | SumR | MedR |",
        "|---:|---:|---:|---:|---:|---:|",
        "| "
        + " | ".join(f"{m[k]:.2f}" for k in ("r1", "r5", "r10", "r100", "sumr"))
        + f" | {m['medr']:.0f} |",
        "",
        "## Configuration",
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
    lines += [f"- {s['kind']} `{s['id']}`: {s['reason']}" for s in skipped] or ["None."]
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: str | Path,
    cfg: ExperimentConfig,
    metrics: dict[str, Any],
    history: Sequence[dict[str, Any]],
    per_query: Sequence[dict[str, Any]],
    skipped: Sequence[dict[str, str]] = (),
    *,
    n_worst: int = 20,
) -> Path:
    """Write metrics.json, eval/per_query.jsonl, plots/*.png and report.md into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_per_query(out / "eval" / "per_query.jsonl", list(per_query))
    plots: dict[str, Path] = {}
    if history:
        plots["Training loss"] = plot_losses(history, out / PLOTS / "train_loss.png")
        plots["Validation R@K"] = plot_val_recall(history, out / PLOTS / "val_recall.png")
    ranks = np.array([r["rank"] for r in per_query])
    plots["Rank distribution"] = plot_ranks(
        ranks, int(metrics.get("n_videos", ranks.max())), out / PLOTS / "ranks.png"
    )
    rel = {caption: p.relative_to(out).as_posix() for caption, p in plots.items()}
    report = out / "report.md"
    report.write_text(render_report(cfg, metrics, rel, worst_queries(per_query, n_worst), skipped))
    return report
