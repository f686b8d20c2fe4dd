"""The measuring steps of scripts/gpu_check.sh, one subcommand each; each ends by printing one line
`RESULT <status> <text>` (status ok, fail or skip) that the shell script puts into its table.

    python scripts/gpu_check.py compare|amp|epoch|extract [--dry-run]

On a CUDA machine they run at MamFusion's real sizes (TVR preset). `--dry-run` runs the same code on CPU at
tiny sizes, to check the logic where there is no GPU (CUDA-only parts then report `skip`).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, whatever the install

from models.selective_scan import compiled_path, compiled_paths, selective_scan, sequential_selective_scan  # noqa: E402
from tests.test_mamba import scan_inputs  # noqa: E402  (the tests' Mamba-like inputs, so both check the same)

TVR_TRAIN_VIDEOS = 17435  # TVR's training split (MS-SL), for the projected full epoch
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def result(status: str, text: str) -> None:
    """The one line the shell script reads."""
    print(f"RESULT {status} {text}", flush=True)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def cuda_ok(dry_run: bool) -> bool:
    return torch.cuda.is_available() and not dry_run


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best wall seconds of `repeats` calls after one warm-up (CUDA synchronised)."""
    fn()
    sync()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


# ------------------------------------------------------------------------------------------------ compare


def reference_inputs(b: int, d: int, n: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """The tests' Mamba-like scan inputs in float64, as plain tensors (run_scan casts and attaches grads)."""
    return {k: v.detach() for k, v in scan_inputs(b, d, n, length, torch.float64, seed=seed).items()}


def run_scan(
    fn: Callable[..., torch.Tensor],
    base: dict[str, torch.Tensor],
    gy: torch.Tensor,
    device: str,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and every input's gradient for the loss sum(y * gy)."""
    inputs = {k: v.to(device, dtype).requires_grad_() for k, v in base.items()}
    y = fn(**inputs, delta_softplus=True)
    grads = torch.autograd.grad(y, list(inputs.values()), gy.to(device, dtype))
    return y.detach(), dict(zip(inputs, grads, strict=True))


def worst(y, g, y_ref, g_ref) -> tuple[float, str]:
    errs = {"y": rel_err(y, y_ref)} | {k: rel_err(g[k], g_ref[k]) for k in NAMES}
    name = max(errs, key=errs.__getitem__)
    return errs[name], name


def mamba_ssm_scan() -> tuple[Callable[..., torch.Tensor] | None, str]:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # not importable without CUDA builds, in ways that are not all ImportError
        return None, f"mamba_ssm not importable ({type(exc).__name__})"
    return selective_scan_fn, "mamba_ssm"


def compare(args: argparse.Namespace) -> None:
    """mamba_ssm's fused kernel vs our chunked scan (CUDA) and compiled scan (CPU), each against a float64
    sequential reference, outputs and all gradients; plus fwd+bwd times at the benchmark's size."""
    cuda = cuda_ok(args.dry_run)
    b, d, n, lengths = (2, 768, 16, (32, 512)) if cuda else (2, 40, 16, (7, 64))
    fused, why = mamba_ssm_scan() if cuda else (None, "dry run")
    ref_device = "cuda" if cuda else "cpu"
    scans: dict[str, tuple[Callable[..., torch.Tensor], str]] = {}
    if fused is not None:
        scans["mamba_ssm"] = (fused, "cuda")
    scans["chunked"] = (lambda **kw: selective_scan(**kw, impl="torch"), "cuda" if cuda else "cpu")
    if compiled_paths():
        scans[f"compiled-{compiled_path()}"] = (lambda **kw: selective_scan(**kw, impl="compiled"), "cpu")
    cells, ok = [], True
    for length in lengths:
        base = reference_inputs(b, d, n, length, seed=length)
        gy = torch.randn(b, d, length, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        y_ref, g_ref = run_scan(sequential_selective_scan, base, gy, ref_device, torch.float64)
        outs = {name: run_scan(fn, base, gy, dev, torch.float32) for name, (fn, dev) in scans.items()}
        for name, (y, g) in outs.items():
            err, which = worst(y, g, y_ref, g_ref)
            ok &= err < 1e-4
            cells.append(f"L={length} {name} vs fp64 ref {err:.1e} ({which})")
        if "mamba_ssm" in outs:
            for name in (k for k in outs if k != "mamba_ssm"):
                err, which = worst(*outs[name], *outs["mamba_ssm"])
                ok &= err < 1e-3
                cells.append(f"L={length} {name} vs mamba_ssm {err:.1e} ({which})")
    cells.append(timings(cuda, fused))
    if fused is None:
        cells.append(f"mamba_ssm: {why}")
    # on CUDA the check is the comparison with mamba_ssm: without it the step fails (the rest still shows)
    result("ok" if ok and (fused is not None or not cuda) else "fail", "; ".join(cells))


def timings(cuda: bool, fused: Callable[..., torch.Tensor] | None) -> str:
    """fwd+bwd at the benchmark's size (B=16, d_inner 768, d_state 16, L=512): CUDA scans, and the compiled
    scan on 1 thread and on all of them (its thread split's scaling)."""
    b, d, n, length = (16, 768, 16, 512) if cuda else (2, 64, 16, 64)
    base = reference_inputs(b, d, n, length, seed=0)
    gy = torch.randn(b, d, length, dtype=torch.float64)
    parts = []
    candidates: list[tuple[str, Callable[..., torch.Tensor], str]] = []
    if fused is not None:
        candidates.append(("mamba_ssm cuda", fused, "cuda"))
    if cuda:
        candidates.append(("chunked cuda", lambda **kw: selective_scan(**kw, impl="torch"), "cuda"))
    if compiled_paths():
        candidates.append(("compiled cpu", lambda **kw: selective_scan(**kw, impl="compiled"), "cpu"))
    threads = torch.get_num_threads()
    for name, fn, device in candidates:
        inputs = {k: v.to(device, torch.float32) for k, v in base.items()}
        for t in (1, threads) if device == "cpu" else (threads,):
            torch.set_num_threads(t)
            seconds = timed(
                lambda fn=fn, inputs=inputs, device=device: run_scan(fn, inputs, gy, device, torch.float32)
            )
            label = f"{name} {t} thr" if device == "cpu" else name
            parts.append(f"{label} {seconds * 1e3:.1f} ms")
    torch.set_num_threads(threads)
    return f"fwd+bwd B={b} L={length}: " + ", ".join(parts)


# -------------------------------------------------------------------------------------------- model steps


def tvr_config(dry_run: bool, **train: object):
    """The TVR preset (tiny dimensions for a dry run)."""
    from models.config import load_preset

    overrides: dict[str, object] = {f"train.{k}": v for k, v in train.items()}
    if dry_run:
        overrides |= {
            "model.visual_dim": 48,
            "model.query_dim": 32,
            "model.hidden_size": 32,
            "model.n_heads": 4,
        }
        overrides |= {"model.max_ctx_l": 64, "model.map_size": 8}
    return load_preset("tvr", overrides)


def synthetic_split(cfg, n_videos: int, min_rows: int, max_rows: int, captions: int = 5, tokens: int = 20):
    """A training split of random features at the config's dimensions (no feature store involved)."""
    import numpy as np

    from storage.annotations import QueryRecord
    from tasks.data import SplitData

    rng = np.random.default_rng(0)
    dv, dq = cfg.model.visual_dim, cfg.model.query_dim
    lengths = rng.integers(min_rows, max_rows + 1, n_videos)
    feats = [rng.standard_normal((int(t), dv), dtype=np.float32) for t in lengths]
    times = [np.stack([np.arange(t), np.arange(t) + 1.0], axis=1) for t in lengths]
    queries, query_feats, query_video = [], [], []
    for v in range(n_videos):
        for c in range(captions):
            queries.append(QueryRecord(f"q{v}-{c}", f"v{v}", "synthetic", None, None, "train"))
            query_feats.append(rng.standard_normal((tokens, dq), dtype=np.float32))
            query_video.append(v)
    return SplitData(
        name="train",
        video_ids=[f"v{v}" for v in range(n_videos)],
        video_sha256=[f"{v:064x}" for v in range(n_videos)],
        video_feats=feats,
        video_times=times,
        queries=queries,
        query_feats=query_feats,
        query_video=query_video,
        visual_fingerprint="synthetic",
        text_fingerprint="synthetic",
        visual_dim=dv,
        query_dim=dq,
    )


def mamba_kind(model) -> str:
    """Which scan the model's Mamba layers run on its device."""
    from models.mamba import Mamba, _cuda_kernels

    mamba = next(m for m in model.modules() if isinstance(m, Mamba))
    if next(model.parameters()).is_cuda:
        kernels = _cuda_kernels()
        return (
            "mamba_ssm kernels"
            if mamba.impl in ("auto", "cuda") and not isinstance(kernels, str)
            else "chunked"
        )
    return "compiled" if compiled_paths() and mamba.impl in ("auto", "compiled") else "chunked"


def amp(args: argparse.Namespace) -> None:
    """fp32 vs bf16-autocast loss and gradients on one TVR-preset batch, as run_epoch computes them."""
    import dataclasses

    from models.losses import MamFusionLoss
    from models.mamfusion import MamFusion
    from tasks.data import TrainCollate, VideoCaptionDataset

    cuda = cuda_ok(args.dry_run)
    device = torch.device("cuda" if cuda else "cpu")
    cfg = tvr_config(args.dry_run)
    n_videos, max_rows = (64, 512) if cuda else (6, 64)
    data = synthetic_split(cfg, n_videos, max_rows // 4, max_rows)
    collate = TrainCollate(cfg.model.map_size, cfg.model.max_ctx_l, cfg.model.max_desc_l)
    batch = collate([VideoCaptionDataset(data)[i] for i in range(n_videos)]).to(device)
    torch.manual_seed(0)
    model = MamFusion(cfg.model).to(device).eval()  # no dropout: both passes see the same network
    loss_fn = MamFusionLoss(cfg.model)
    losses, grads = [], []
    for use_amp in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(batch.videos, batch.queries, batch.labels)
        out = dataclasses.replace(
            out, **{f.name: getattr(out, f.name).float() for f in dataclasses.fields(out)}
        )
        total, _ = loss_fn(out, batch.labels, False)
        total.backward()
        losses.append(total.item())
        grads.append(torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None]))
    rel = abs(losses[1] - losses[0]) / abs(losses[0])
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0).item()
    # bf16 keeps ~3 digits; the ranking losses' hinges make gradients noisier than the loss (cosine ~0.97
    # on a TVR-size batch in CPU bf16), so the loss carries the tight limit
    finite = all(math.isfinite(v) for v in losses)
    ok = finite and (args.dry_run or (rel < 2e-2 and cosine > 0.9))
    limits = "dry run: limits not applied" if args.dry_run else "limits 2e-2, 0.9"
    result(
        "ok" if ok else "fail",
        f"{n_videos} videos x 5 captions, {mamba_kind(model)} on {device.type}: loss fp32 {losses[0]:.5f}, "
        f"bf16 {losses[1]:.5f}, rel diff {rel:.1e}; grad cosine {cosine:.4f} ({limits})",
    )


def epoch(args: argparse.Namespace) -> None:
    """One TVR-preset training epoch (bf16 autocast on CUDA) on synthetic features, after a warm-up one."""
    from tasks.train import amp_enabled, build_training, run_epoch, seed_everything

    cuda = cuda_ok(args.dry_run)
    device = torch.device("cuda" if cuda else "cpu")
    n_videos, batch, rows = (768, 256, (32, 128)) if cuda else (12, 4, (8, 40))
    cfg = tvr_config(args.dry_run, batch_size=batch, n_epoch=2, num_workers=4 if cuda else 0)
    data = synthetic_split(cfg, n_videos, *rows)
    seed_everything(cfg.train.seed)
    model, loader, optimizer, loss_fn, generator = build_training(cfg, data, device)
    use_amp = amp_enabled(cfg.train, device)
    seconds = []
    for e in range(2):  # the first pays for cuDNN/cuBLAS autotuning and allocator growth
        generator.manual_seed(e)
        sync()
        start = time.perf_counter()
        run_epoch(model, loss_fn, optimizer, loader, hard_negative=False, device=device, amp=use_amp, epoch=e)
        sync()
        seconds.append(time.perf_counter() - start)
    steps = len(loader)
    full = seconds[1] / steps * math.ceil(TVR_TRAIN_VIDEOS / batch)
    result(
        "ok",
        f"{n_videos} videos ({rows[0]}-{rows[1]} rows, 5 captions each), batch {batch}, amp {use_amp}, "
        f"{mamba_kind(model)}: epoch {seconds[1]:.2f} s ({steps} steps, {seconds[1] / steps:.3f} s/step, "
        f"{n_videos / seconds[1]:.0f} videos/s; warm-up epoch {seconds[0]:.2f} s); full TVR train epoch "
        f"({TVR_TRAIN_VIDEOS} videos) ~{full:.0f} s",
    )


def extract(args: argparse.Namespace) -> None:
    """The paper profile (ResNet-152 every 2nd frame + I3D-R50 on 1.5 s windows of 8 frames) with random-init
    backbones on synthetic decoded windows: the backbones' throughput (decoding not included)."""
    import numpy as np

    from tasks.decode import FrameChunk
    from tasks.extract import VisualExtractor
    from tasks.profiles import feature_profile, visual_precision

    cuda = cuda_ok(args.dry_run)
    backbones = [
        {"name": "resnet152", "weights": "random", "frame_stride": 2},
        {"name": "i3d_r50", "weights": "random"},
    ]
    visual: dict[str, object] = {"backbones": backbones, "device": "cuda" if cuda else "cpu"}
    if not cuda:
        visual |= {"short_side": 32, "crop": 32}
    cfg = feature_profile("paper", visual=visual).visual
    extractor = VisualExtractor(cfg)
    windows = 64 if cuda else 2
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (windows, cfg.frames_per_window, 3, cfg.crop, cfg.crop), dtype=np.uint8)
    chunk = FrameChunk(frames, np.stack([np.arange(windows) * 1.5, np.arange(1, windows + 1) * 1.5], axis=1))
    features = extractor._encode(FrameChunk(frames[:2], chunk.times[:2]))  # warm-up, loads the backbones
    seconds = timed(lambda: extractor._encode(chunk), repeats=2)
    features = extractor._encode(chunk)
    ok = features.shape == (windows, 4096) and bool(np.isfinite(features).all())
    result(
        "ok" if ok else "fail",
        f"{windows} windows of {cfg.frames_per_window} frames {cfg.crop}px, {visual_precision(cfg)} on "
        f"{extractor.device.type}, batch {cfg.batch_windows}: {windows / seconds:.1f} windows/s "
        f"({windows * cfg.window_s / seconds:.0f} s of video per s), features {features.shape}",
    )


STEPS = {"compare": compare, "amp": amp, "epoch": epoch, "extract": extract}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=list(STEPS))
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the logic without a GPU")
    args = p.parse_args()
    try:
        STEPS[args.step](args)
    except Exception as exc:
        traceback.print_exc()
        result("fail", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
