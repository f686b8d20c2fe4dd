"""The official training recipe (MODEL_SPEC §6-§8) with exact resume.

BertAdam with warmup-linear over len(loader) * n_epoch steps, hard negatives from
`hard_negative_start_epoch`, validation SumR every epoch, early stopping after `max_es_cnt` epochs without
improvement, and the best epoch's weights kept via `MamFusion.save_pretrained`. After every epoch
`checkpoints/last.pt` holds everything needed to continue bit-for-bit on CPU: weights, optimiser state (its
per-tensor step counters drive the schedule), epoch, RNG states, best score, early-stopping counter, history.
The shuffle generator is reseeded from (seed, epoch) at each epoch start, so the data order never depends on
how a run was interrupted. `train_run` is the whole `mamfusion train` command as one function: pick the splits
and extractors, load them, train, evaluate the best epoch, write the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.config import ConfigError, ExperimentConfig, TrainConfig
from models.losses import MamFusionLoss
from models.mamfusion import CONFIG_FILE, WEIGHTS_FILE, MamFusion
from models.optim import BertAdam, param_groups
from storage.annotations import AnnotationSet, read_annotations
from storage.feature_store import FeatureStore
from tasks.data import (
    DataError,
    SplitData,
    check_feature_dims,
    load_split,
    pick_fingerprints,
    store_dims,
    train_loader,
)
from tasks.device import resolve_device
from tasks.evaluate import EXPERIMENT, evaluate
from tasks.report import write_report

log = logging.getLogger(__name__)

CHECKPOINT = Path("checkpoints") / "last.pt"
HISTORY = "history.jsonl"
FEATURES_FILE = "features.json"


@dataclass
class TrainState:
    """What survives a restart besides the weights and optimiser."""

    epoch: int = 0  # epochs completed; epochs are numbered from 1 in history and best_epoch
    best_sumr: float = -math.inf
    best_epoch: int = 0
    es_cnt: int = 0
    stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainResult:
    out_dir: Path
    best_epoch: int
    best_sumr: float
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]]


def amp_enabled(train: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast on CUDA by default (no loss scaler needed; the QDL's exp(32x) overflows fp16)."""
    if train.amp == "on" and device.type != "cuda":
        raise ConfigError("train.amp=on needs CUDA (use amp=auto or off)")
    return device.type == "cuda" and train.amp != "off"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors/lists so the checkpoint loads with weights_only=True."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    """Temp file, fsync, rename: a kill leaves the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_best(model: MamFusion, out: Path) -> None:
    """save_pretrained into a temp folder, then rename each file into place (no half-written model.pt)."""
    tmp = out / ".best.tmp"
    model.save_pretrained(tmp)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        os.replace(tmp / name, out / name)
    tmp.rmdir()


def _write_history(out: Path, history: list[dict[str, Any]]) -> None:
    tmp = out / (HISTORY + ".tmp")
    tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
    os.replace(tmp, out / HISTORY)


def save_checkpoint(
    path: Path, model: MamFusion, optimizer: torch.optim.Optimizer, state: TrainState
) -> None:
    _atomic_save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": _rng_state(),
            "state": {k: getattr(state, k) for k in TrainState.__dataclass_fields__},
        },
        path,
    )


def load_checkpoint(path: Path, model: MamFusion, optimizer: torch.optim.Optimizer) -> TrainState:
    """Restore weights, optimiser and RNGs in place; returns the loop state to continue from."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    _set_rng_state(ckpt["rng"])
    return TrainState(**ckpt["state"])


def run_epoch(
    model: MamFusion,
    loss_fn: MamFusionLoss,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    hard_negative: bool,
    device: torch.device,
    amp: bool = False,
    bar: tqdm | None = None,
) -> dict[str, float]:
    """One pass over the training loader; returns the epoch mean of each weighted loss term and `total`."""
    model.train()
    sums: dict[str, float] = {}
    n = 0
    for batch in loader:
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            output = model(batch.videos, batch.queries, batch.labels)
        if amp:  # the losses run in float32 (logsumexp / exp(32x) need the range and precision)
            output = dataclasses.replace(
                output, **{f.name: getattr(output, f.name).float() for f in dataclasses.fields(output)}
            )
        total, parts = loss_fn(output, batch.labels, hard_negative)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{parts['total']:.4f}", refresh=False)
    return {k: v / max(n, 1) for k, v in sums.items()}


def build_training(
    cfg: ExperimentConfig, train_data: SplitData, device: torch.device
) -> tuple[MamFusion, DataLoader, BertAdam, MamFusionLoss, torch.Generator]:
    """Fresh model, shuffled loader (+ its sampler generator), BertAdam over the whole schedule, loss."""
    model = MamFusion(cfg.model).to(device)
    generator = torch.Generator()
    loader = train_loader(train_data, cfg, generator, device)
    optimizer = BertAdam(
        param_groups(model, cfg.train.weight_decay),
        lr=cfg.train.lr,
        warmup=cfg.train.warmup_proportion,
        t_total=len(loader) * cfg.train.n_epoch,
        max_grad_norm=cfg.train.grad_clip,
    )
    return model, loader, optimizer, MamFusionLoss(cfg.model), generator


def train(
    cfg: ExperimentConfig,
    train_data: SplitData,
    val_data: SplitData,
    out_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train with validation-based model selection; the best weights end up in `out_dir` (save_pretrained)."""
    train_data.check_dims(cfg.model)
    val_data.check_dims(cfg.model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / EXPERIMENT).write_text(cfg.model_dump_json(indent=2))
    device = resolve_device(cfg.train.device, "train.device")
    amp = amp_enabled(cfg.train, device)
    seed_everything(cfg.train.seed)

    model, loader, optimizer, loss_fn, generator = build_training(cfg, train_data, device)
    ckpt_path = out / CHECKPOINT
    state = TrainState()
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, model, optimizer)
        log.info("resuming from %s at epoch %d (best SumR %.2f)", ckpt_path, state.epoch, state.best_sumr)

    last_sumr = state.history[-1]["val"]["sumr"] if state.history else float("nan")
    n_epoch = cfg.train.n_epoch
    with tqdm(total=len(loader) * n_epoch, initial=len(loader) * state.epoch, disable=not progress) as bar:
        while state.epoch < n_epoch and not state.stopped:
            epoch = state.epoch
            generator.manual_seed(cfg.train.seed + epoch)
            bar.set_description(f"epoch {epoch + 1}/{n_epoch} (val SumR {last_sumr:.1f})")
            t0 = time.perf_counter()
            losses = run_epoch(
                model,
                loss_fn,
                optimizer,
                loader,
                hard_negative=epoch >= cfg.train.hard_negative_start_epoch,
                device=device,
                amp=amp,
                bar=bar,
            )
            train_s = time.perf_counter() - t0
            val = evaluate(
                model,
                val_data,
                query_bsz=cfg.train.eval_query_bsz,
                context_bsz=cfg.train.eval_context_bsz,
                details=False,
            ).metrics
            last_sumr = val["sumr"]
            if last_sumr > state.best_sumr:
                state.best_sumr, state.best_epoch, state.es_cnt = last_sumr, epoch + 1, 0
                _save_best(model, out)
            else:
                state.es_cnt += 1
                state.stopped = state.es_cnt > cfg.train.max_es_cnt
            state.history.append(
                {
                    "epoch": epoch + 1,
                    "train": losses,
                    "val": val,
                    "lr": optimizer.current_lr(),
                    "train_s": round(train_s, 3),
                    "epoch_s": round(time.perf_counter() - t0, 3),
                    "best": state.best_epoch == epoch + 1,
                }
            )
            state.epoch += 1
            save_checkpoint(ckpt_path, model, optimizer, state)
            _write_history(out, state.history)
            log.info(
                "epoch %d: loss %.4f val SumR %.2f (best %.2f @ %d)",
                epoch + 1,
                losses.get("total", math.nan),
                last_sumr,
                state.best_sumr,
                state.best_epoch,
            )
    if state.stopped:
        log.info("early stop: no val SumR improvement for %d epochs", state.es_cnt)
    return TrainResult(out, state.best_epoch, state.best_sumr, state.epoch, state.stopped, state.history)


# ------------------------------------------------------------------ the `train` command as one function
@dataclass
class Splits:
    """Annotation sets for training, model selection and the final report, with their names."""

    train: AnnotationSet
    val: AnnotationSet
    test: AnnotationSet
    test_name: str


def select_splits(annotations: AnnotationSet, val_annotations: AnnotationSet | None) -> Splits:
    """train/val from split fields (or a separate val file); test = the 'test' split if present, else val.

    A file without any split field is all training data (MS-SL's train caption file); a file with split fields
    must name a 'train' split, so validation or test queries can never leak into training.
    """
    present = {q.split for q in annotations.queries}
    needed = {"train"} if val_annotations is not None else {"train", "val"}
    unlabelled = present == {None}
    if (not unlabelled and needed - present) or (val_annotations is None and "val" not in present):
        raise DataError(
            f"annotations have splits {sorted(map(str, present))}, need {sorted(needed)}; "
            "pass --val-annotations for a separate validation file"
        )
    train_set = annotations if unlabelled else annotations.split("train")
    val = val_annotations if val_annotations is not None else annotations.split("val")
    if "test" in present:
        return Splits(train_set, val, annotations.split("test"), "test")
    return Splits(train_set, val, val, "val")


def _skipped_lines(ann: AnnotationSet) -> list[dict[str, str]]:
    return [{"kind": "annotation", "id": f"{s.path}:{s.line}", "reason": s.reason} for s in ann.skipped]


def train_run(
    cfg: ExperimentConfig,
    store_url: str,
    annotations: str | Path,
    out_dir: str | Path,
    *,
    val_annotations: str | Path | None = None,
    annotation_format: str | None = None,
    visual_fp: str | None = None,
    text_fp: str | None = None,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole `train` command as a function: returns the test metrics written to metrics.json.

    `annotation_format` applies to both annotation files (detected from each file's content when None).
    """
    out = Path(out_dir)
    store = FeatureStore(store_url)
    ann = read_annotations(annotations, annotation_format, skip_malformed=True)
    val_ann = (
        read_annotations(val_annotations, annotation_format, skip_malformed=True) if val_annotations else None
    )
    for path, read in ((annotations, ann), (val_annotations, val_ann)):
        if read is not None and not read.queries:
            first = f"; first: line {read.skipped[0].line}: {read.skipped[0].reason}" if read.skipped else ""
            raise DataError(
                f"{path}: no caption could be read as {read.format} "
                f"({len(read.skipped)} malformed lines skipped{first})"
            )
    splits = select_splits(ann, val_ann)
    visual_fp, text_fp = pick_fingerprints(store, ann, visual_fp, text_fp)
    check_feature_dims(cfg.model, *store_dims(store, visual_fp, text_fp))
    train_data = load_split(store, splits.train, None, visual_fp, text_fp, name="train")
    val_data = load_split(store, splits.val, None, visual_fp, text_fp, name="val")
    test_data = (
        val_data
        if splits.test is splits.val
        else load_split(store, splits.test, None, visual_fp, text_fp, name="test")
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / FEATURES_FILE).write_text(
        json.dumps(
            {
                "store": store.url,
                "visual_fingerprint": visual_fp,
                "text_fingerprint": text_fp,
                "annotations": str(Path(annotations).resolve()),
                "val_annotations": str(Path(val_annotations).resolve()) if val_annotations else None,
            },
            indent=2,
        )
    )
    result = train(cfg, train_data, val_data, out, resume=resume, progress=progress)
    model = MamFusion.from_pretrained(out).to(resolve_device(cfg.train.device, "train.device"))
    evaluated = evaluate(
        model, test_data, query_bsz=cfg.train.eval_query_bsz, context_bsz=cfg.train.eval_context_bsz
    )
    metrics = {"split": splits.test_name, **evaluated.metrics, "best_epoch": result.best_epoch,
               "best_val_sumr": result.best_sumr, "epochs_run": result.epochs_run,
               "stopped_early": result.stopped_early}  # fmt: skip
    skipped = _skipped_lines(ann) + (_skipped_lines(val_ann) if val_ann else [])
    skipped += _unique_skips([train_data, val_data, test_data])
    write_report(out, cfg, metrics, result.history, evaluated.per_query, skipped)
    return metrics


def _unique_skips(datas: list[SplitData]) -> list[dict[str, str]]:
    seen: dict[tuple[str, str], dict[str, str]] = {}
    for d in datas:
        for s in d.skipped:
            seen.setdefault((s["kind"], s["id"]), s)
    return list(seen.values())
