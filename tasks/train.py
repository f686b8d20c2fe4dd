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
import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.config import ConfigError, ExperimentConfig, TrainConfig
from models.losses import MamFusionLoss
from models.mamfusion import MamFusion
from models.optim import BertAdam, param_groups
from storage.annotations import AnnotationSet, read_annotations
from storage.errors import MamFusionError
from storage.feature_store import FeatureStore
from storage.registry import ExtractorSnapshot, FeatureSource, RunDir, RunMetrics, Skipped, TrainingSummary
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
from tasks.evaluate import MIN_SELECTION_GALLERY, evaluate, gallery_distractors
from tasks.report import write_report

log = logging.getLogger(__name__)

# Fields that change how fast a run goes, never what it computes: a resumed run may change them.
RESUME_SAFE_FIELDS = frozenset(
    {"train.num_workers", "train.device", "train.eval_query_bsz", "train.eval_context_bsz"}
)


class TrainingDivergedError(MamFusionError):
    """The loss or the weights became NaN/inf; the message names the epoch and step."""


class ResumeMismatchError(MamFusionError):
    """A run directory was trained with another config or data than the resume asks for."""


@dataclass
class TrainState:
    """What survives a restart besides the weights and optimiser."""

    epoch: int = 0  # epochs completed; epochs are numbered from 1 in history and best_epoch
    best_sumr: float = -math.inf
    best_meanr: float = math.inf  # breaks SumR ties, so a saturated SumR still picks the better-ranking epoch
    best_epoch: int = 0
    es_cnt: int = 0
    stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    data_digest: str = ""  # of the training + validation data; a resume on other data is refused

    def improves(self, sumr: float, meanr: float) -> bool:
        return sumr > self.best_sumr or (sumr == self.best_sumr and meanr < self.best_meanr)


@dataclass
class TrainResult:
    run: RunDir
    best_epoch: int
    best_sumr: float
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]]
    data_digest: str


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
    epoch: int = 0,
) -> dict[str, float]:
    """One pass over the training loader; returns the epoch mean of each weighted loss term and `total`.

    Stops at the first non-finite loss, and checks the weights at the end, so a diverged run fails naming
    where instead of producing a NaN model whose scores would rank arbitrarily.
    """
    model.train()
    sums: dict[str, float] = {}
    n = 0
    for step, batch in enumerate(loader, 1):
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            output = model(batch.videos, batch.queries, batch.labels)
        if amp:  # the losses run in float32 (logsumexp / exp(32x) need the range and precision)
            output = dataclasses.replace(
                output, **{f.name: getattr(output, f.name).float() for f in dataclasses.fields(output)}
            )
        total, parts = loss_fn(output, batch.labels, hard_negative)
        if not torch.isfinite(total):
            raise TrainingDivergedError(
                f"training diverged: the loss is {total.item()} at epoch {epoch + 1}, step {step}; "
                f"lower train.lr (now {optimizer.param_groups[0]['lr']:g}) or check the features"
            )
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{parts['total']:.4f}", refresh=False)
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainingDivergedError(
            f"training diverged: {len(bad)} weight tensors are non-finite after epoch {epoch + 1}, step {n} "
            f"(e.g. {bad[0]}); lower train.lr (now {optimizer.param_groups[0]['lr']:g})"
        )
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


def config_differences(old: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    """`section.field: old -> new` for every field that would change what a resumed run computes."""
    before, after = old.model_dump(mode="json"), new.model_dump(mode="json")
    out = []
    for section in ("model", "train"):
        for key in sorted(set(before[section]) | set(after[section])):
            name = f"{section}.{key}"
            a, b = before[section].get(key), after[section].get(key)
            if a != b and name not in RESUME_SAFE_FIELDS:
                out.append(f"{name}: {a!r} -> {b!r}")
    return out


def check_resume(run: RunDir, cfg: ExperimentConfig, state: TrainState, data_digest: str) -> None:
    """A checkpoint continues only the run it belongs to: same config (but speed settings) and data."""
    differ = config_differences(run.read_experiment(), cfg) if run.experiment_file.is_file() else []
    if state.data_digest and state.data_digest != data_digest:
        differ.append("data: the training/validation videos or captions changed")
    if differ:
        raise ResumeMismatchError(
            f"{run.path} was trained with a different setup ({'; '.join(differ)}); resuming would mix the "
            "two. Start fresh with --no-resume (or another --out directory)"
        )


def train(
    cfg: ExperimentConfig,
    train_data: SplitData,
    val_data: SplitData,
    run: RunDir,
    *,
    resume: bool = True,
    progress: bool = True,
    say: Callable[[str], None] = log.info,
) -> TrainResult:
    """Train with validation-based model selection; the best weights end up in `run` (save_pretrained).

    The selected epoch is the best validation SumR, ties broken by the lower mean rank. `say` gets one line
    per epoch (the Prefect task passes its run logger, so the lines reach the flow run's logs and the UI).
    """
    train_data.check_dims(cfg.model)
    val_data.check_dims(cfg.model)
    run.create()
    device = resolve_device(cfg.train.device, "train.device")
    amp = amp_enabled(cfg.train, device)
    seed_everything(cfg.train.seed)
    data_digest = hashlib.sha256(f"{train_data.digest()}{val_data.digest()}".encode()).hexdigest()

    model, loader, optimizer, loss_fn, generator = build_training(cfg, train_data, device)
    state = TrainState(data_digest=data_digest)
    if resume and run.checkpoint_file.exists():
        state = load_checkpoint(run.checkpoint_file, model, optimizer)
        check_resume(run, cfg, state, data_digest)
        state.data_digest = data_digest
        log.info(
            "resuming from %s at epoch %d (best SumR %.2f)", run.checkpoint_file, state.epoch, state.best_sumr
        )
    run.write_experiment(cfg)

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
                epoch=epoch,
            )
            train_s = time.perf_counter() - t0
            val = evaluate(
                model,
                val_data,
                query_bsz=cfg.train.eval_query_bsz,
                context_bsz=cfg.train.eval_context_bsz,
                details=False,
            ).metrics
            last_sumr = val.sumr
            if state.improves(val.sumr, val.meanr):
                state.best_sumr, state.best_meanr, state.best_epoch, state.es_cnt = (
                    val.sumr,
                    val.meanr,
                    epoch + 1,
                    0,
                )
                model.save_pretrained(run.best_tmp_dir)
                run.install_best()
            else:
                state.es_cnt += 1
                state.stopped = state.es_cnt > cfg.train.max_es_cnt
            state.history.append(
                {
                    "epoch": epoch + 1,
                    "train": losses,
                    "val": val.model_dump(mode="json"),
                    "lr": optimizer.current_lr(),
                    "train_s": round(train_s, 3),
                    "epoch_s": round(time.perf_counter() - t0, 3),
                    "best": state.best_epoch == epoch + 1,
                }
            )
            state.epoch += 1
            save_checkpoint(run.checkpoint_file, model, optimizer, state)
            run.write_history(state.history)
            say(
                f"epoch {epoch + 1}/{n_epoch}: loss {losses.get('total', math.nan):.4f}, val SumR "
                f"{val.sumr:.2f}, mean rank {val.meanr:.1f} (best {state.best_sumr:.2f} @ epoch "
                f"{state.best_epoch}) in {time.perf_counter() - t0:.1f} s"
            )
    if state.stopped:
        say(f"early stop: no validation improvement for {state.es_cnt} epochs")
    return TrainResult(
        run, state.best_epoch, state.best_sumr, state.epoch, state.stopped, state.history, data_digest
    )


def selection_warnings(val_data: SplitData, history: list[dict[str, Any]]) -> list[str]:
    """Why the chosen epoch may mean little: a tiny validation gallery, or a score that never moved."""
    warnings = []
    n_videos, n_queries = len(val_data.video_ids), len(val_data.queries)
    if n_videos < MIN_SELECTION_GALLERY or n_queries < 10:
        warnings.append(
            f"validation has {n_queries} queries over {n_videos} videos (even with distractors): too few to "
            "tell epochs apart; the chosen epoch is close to arbitrary. Add validation videos/captions"
        )
    scores = {(h["val"]["sumr"], h["val"]["meanr"]) for h in history}
    if len(history) > 1 and len(scores) == 1:
        warnings.append(
            f"validation SumR and mean rank were identical in all {len(history)} epochs: selection kept "
            "the first epoch; the validation gallery cannot discriminate"
        )
    return warnings


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


def annotation_skips(ann: AnnotationSet) -> list[Skipped]:
    """Malformed lines (left out), and captions kept without their invalid moment."""
    lines = [Skipped(kind="annotation", id=f"{s.path}:{s.line}", reason=s.reason) for s in ann.skipped]
    kept = [Skipped(kind="moment", id=f"{s.path}:{s.line}", reason=s.reason) for s in ann.moment_issues]
    return lines + kept


class TrainRequest(BaseModel):
    """Everything one training run needs: what `mamfusion train` and the pipeline's train step pass."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: ExperimentConfig
    store: str
    annotations: str
    run_dir: str
    val_annotations: str | None = None
    annotation_format: str | None = None  # applies to both files; detected from content when None
    visual_fingerprint: str | None = None
    text_fingerprint: str | None = None
    extra_gallery: tuple[str, ...] = Field(
        (), description="further video ids (e.g. catalogued videos without captions) usable as distractors"
    )
    resume: bool = True


def _read(path: str, fmt: str | None) -> AnnotationSet:
    ann = read_annotations(path, fmt, skip_malformed=True)
    if not ann.queries:
        first = f"; first: line {ann.skipped[0].line}: {ann.skipped[0].reason}" if ann.skipped else ""
        raise DataError(
            f"{path}: no caption could be read as {ann.format} "
            f"({len(ann.skipped)} malformed lines skipped{first})"
        )
    return ann


@dataclass(frozen=True)
class SplitPlan:
    """The annotation sets of a request and the distractors each evaluated split is ranked with."""

    splits: Splits
    val_distractors: list[str]
    test_distractors: list[str]
    annotation_format: str
    skipped: list[Skipped]

    def evaluated(self, name: str) -> tuple[AnnotationSet, list[str]]:
        """(queries, distractor video ids) of the split the metrics are reported on ('val' or the test)."""
        if name == self.splits.test_name:
            return self.splits.test, self.test_distractors
        if name == "val":
            return self.splits.val, self.val_distractors
        raise DataError(f"no evaluated split {name!r} (have val, {self.splits.test_name})")


def plan_splits(request: TrainRequest) -> SplitPlan:
    """Read the request's annotations and decide every gallery once, the same for challenger and champion."""
    ann = _read(request.annotations, request.annotation_format)
    val_ann = _read(request.val_annotations, request.annotation_format) if request.val_annotations else None
    splits = select_splits(ann, val_ann)
    # validation never sees test videos; the test gallery borrows every non-test video
    non_test = splits.train if splits.test is splits.val else _union(splits.train, splits.val)
    test_ids = set(splits.test.video_ids())
    policy, fmt = request.config.train.eval_gallery, request.annotation_format or ann.format
    extra = list(request.extra_gallery)
    skipped = annotation_skips(ann) + (annotation_skips(val_ann) if val_ann else [])
    return SplitPlan(
        splits,
        gallery_distractors(splits.val, splits.train, policy, fmt, [v for v in extra if v not in test_ids]),
        gallery_distractors(splits.test, non_test, policy, fmt, extra),
        fmt,
        skipped,
    )


def _union(a: AnnotationSet, b: AnnotationSet) -> AnnotationSet:
    return AnnotationSet(a.queries + b.queries, format=a.format)


def train_run(
    request: TrainRequest, *, progress: bool = True, say: Callable[[str], None] = log.info
) -> RunMetrics:
    """The whole `train` command as a function: load, train, evaluate the selected epoch, write the run.

    Validation and test queries are ranked against galleries chosen by `train.eval_gallery` (see
    `tasks.evaluate`); what was used is stated in the metrics and the report.
    """
    cfg, run = request.config, RunDir(request.run_dir)
    store = FeatureStore(request.store, read_only=True)
    plan = plan_splits(request)
    splits = plan.splits
    visual_fp, text_fp = pick_fingerprints(
        store, splits.train, request.visual_fingerprint, request.text_fingerprint
    )
    (_, visual_dim), (_, text_dim) = store_dims(store, visual_fp, text_fp)
    check_feature_dims(cfg.model, (visual_fp, visual_dim), (text_fp, text_dim))

    def split_data(split: AnnotationSet, name: str, distractors: list[str]) -> SplitData:
        return load_split(store, split, None, visual_fp, text_fp, name=name, distractors=distractors)

    train_data = split_data(splits.train, "train", [])
    val_data = split_data(splits.val, "val", plan.val_distractors)
    test_data = (
        val_data
        if splits.test is splits.val
        else split_data(splits.test, splits.test_name, plan.test_distractors)
    )
    say(f"validation: {describe_gallery_of(val_data)}")
    result = train(cfg, train_data, val_data, run, resume=request.resume, progress=progress, say=say)
    run.write_features(
        FeatureSource(
            store=store.url,
            visual=_snapshot(store, visual_fp),
            text=_snapshot(store, text_fp),
            annotations=str(Path(request.annotations).resolve()),
            val_annotations=str(Path(request.val_annotations).resolve()) if request.val_annotations else None,
            annotation_format=plan.annotation_format,
            data_digest=result.data_digest,
        )
    )
    warnings = selection_warnings(val_data, result.history)
    for w in warnings:
        log.warning("model selection: %s", w)
    model = MamFusion.from_pretrained(run.path).to(resolve_device(cfg.train.device, "train.device"))
    evaluated = evaluate(
        model, test_data, query_bsz=cfg.train.eval_query_bsz, context_bsz=cfg.train.eval_context_bsz
    )
    summary = TrainingSummary(
        best_epoch=result.best_epoch,
        best_val_sumr=result.best_sumr,
        epochs_run=result.epochs_run,
        stopped_early=result.stopped_early,
        validation_gallery=describe_gallery_of(val_data),
        warnings=warnings,
    )
    metrics = RunMetrics(**evaluated.metrics.model_dump(), training=summary)
    skipped = plan.skipped + _unique_skips([train_data, val_data, test_data])
    run.write_metrics(metrics)
    write_report(run, cfg, metrics, result.history, evaluated.per_query, skipped, title=_title(request))
    return metrics


def describe_gallery_of(data: SplitData) -> str:
    own = len(data.video_ids) - data.n_distractors
    extra = f" ({own} in the split + {data.n_distractors} distractors)" if data.n_distractors else ""
    return f"{len(data.queries)} queries vs {len(data.video_ids)} videos{extra}"


def _title(request: TrainRequest) -> str:
    """The report names the data (what a reader compares runs by), then the recipe."""
    return f"{Path(request.annotations).name} ({request.config.name} recipe)"


def _snapshot(store: FeatureStore, fingerprint: str) -> ExtractorSnapshot:
    info = store.extractor_info(fingerprint)
    return ExtractorSnapshot(
        fingerprint=fingerprint, kind=info["kind"], dim=info["dim"], config=info["config"]
    )


def _unique_skips(datas: list[SplitData]) -> list[Skipped]:
    seen: dict[tuple[str, str], Skipped] = {}
    for d in datas:
        for s in d.skipped:
            seen.setdefault((s.kind, s.id), s)
    return list(seen.values())
