"""Training epoch time on the synthetic benchmark at TVR dimensions on CPU, and the data-loading share.

The TVR preset (Dv 3072, Dq 768, d 384, 8 heads, max_ctx_l 512) on synthetic videos of 32-128 rows. For
each data-loader worker count: one full epoch (`tasks.train.run_epoch`: forward, losses, backward, BertAdam
step), then a pass over the same loader alone (reading, clip averaging, downsampling, L2, padding).
Share = loader pass / epoch. The one-time bulk read of the split from the feature store is timed too. One
intra-op thread (the machine is shared; OpenMP spin-waits make 2 threads erratic under load).

    .venv/bin/python benchmarks/bench_epoch.py [--videos 46] [--batch-size 32] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from models.config import load_preset
from storage.feature_store import FeatureStore
from storage.synthetic import SyntheticConfig, make_synthetic_benchmark, write_to_store
from tasks.data import load_split
from tasks.train import build_training, run_epoch, seed_everything


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=46, help="synthetic videos (70%% are the train split)")
    parser.add_argument("--batch-size", type=int, default=32, help="videos per batch (TVR preset: 256)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg_synth = SyntheticConfig(
        n_videos=args.videos, visual_dim=3072, query_dim=768, min_rows=32, max_rows=128
    )
    synth = make_synthetic_benchmark(cfg_synth)
    store = FeatureStore("memory://bench_epoch")
    fps = write_to_store(synth, store)
    t0 = time.perf_counter()
    data = load_split(store, synth.annotation_set(), "train", *fps)
    read_s = time.perf_counter() - t0
    n_rows = sum(len(f) for f in data.video_feats)
    print(
        f"train split: {len(data.video_ids)} videos, {len(data.queries)} captions, {n_rows} rows x 3072; "
        f"bulk read from the store {read_s:.2f} s; torch threads {torch.get_num_threads()}"
    )
    print()
    print("| workers | batches | epoch (s) | s / video | loader alone (s) | data-loading share |")
    print("|---:|---:|---:|---:|---:|---:|")
    device = torch.device("cpu")
    for workers in args.workers:
        cfg = load_preset("tvr", {"batch_size": args.batch_size, "num_workers": workers, "n_epoch": 1})
        seed_everything(cfg.train.seed)
        model, loader, optimizer, loss_fn, generator = build_training(cfg, data, device)
        generator.manual_seed(0)
        t0 = time.perf_counter()
        run_epoch(model, loss_fn, optimizer, loader, hard_negative=False, device=device)
        epoch_s = time.perf_counter() - t0
        generator.manual_seed(0)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        load_s = time.perf_counter() - t0
        print(
            f"| {workers} | {len(loader)} | {epoch_s:.1f} | {epoch_s / len(data.video_ids):.3f} | "
            f"{load_s:.2f} | {100 * load_s / epoch_s:.1f}% |"
        )


if __name__ == "__main__":
    main()
