"""Ablation on the synthetic PRVR benchmark: full model, w/o Mamba, w/o fusion; several seeds, mean +- std.

Same data for every run (synthetic seed 0); the training seed changes the initialisation, dropout, shuffling
and negative sampling. Tiny dimensions so the whole table takes a few minutes on a CPU. Reported, never
asserted.

    .venv/bin/python benchmarks/ablation.py [--seeds 0 1 2] [--epochs 5] [--videos 240]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from models.config import load_preset
from models.mamfusion import MamFusion
from storage.feature_store import FeatureStore
from storage.registry import RunDir
from storage.synthetic import SyntheticConfig, make_synthetic_benchmark, write_to_store
from tasks.data import load_split
from tasks.evaluate import evaluate
from tasks.train import train

VARIANTS = {"full": {}, "w/o Mamba": {"use_mamba": False}, "w/o fusion": {"use_fusion": False}}
KEYS = ("r1", "r5", "r10", "r100", "sumr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--videos", type=int, default=240)
    args = parser.parse_args()
    torch.set_num_threads(1)
    synth = make_synthetic_benchmark(
        SyntheticConfig(n_videos=args.videos, max_rows=48, split_fractions=(0.6, 0.1, 0.3), seed=0)
    )
    store = FeatureStore("memory://ablation")
    fps = write_to_store(synth, store)
    ann = synth.annotation_set()
    train_data, val_data, test_data = (load_split(store, ann, s, *fps) for s in ("train", "val", "test"))
    base = {"visual_dim": 64, "query_dim": 48, "hidden_size": 32, "n_heads": 2, "max_ctx_l": 48}
    base |= {"batch_size": 32, "lr": 1e-3, "num_workers": 0, "n_epoch": args.epochs}
    print(
        f"synthetic benchmark: {len(train_data.video_ids)} train / {len(test_data.video_ids)} test videos, "
        f"{len(test_data.queries)} test queries; {args.epochs} epochs; seeds {args.seeds}"
    )
    print()
    print("| variant | R@1 | R@5 | R@10 | R@100 | SumR | train s/run |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, overrides in VARIANTS.items():
        runs, secs = [], []
        for seed in args.seeds:
            cfg = load_preset("demo", base | overrides | {"seed": seed})
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                train(cfg, train_data, val_data, RunDir(out), progress=False)
                secs.append(time.perf_counter() - t0)
                runs.append(evaluate(MamFusion.from_pretrained(out), test_data, details=False).metrics)
        cells = []
        for k in KEYS:
            values = [getattr(r, k) for r in runs]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {std:.1f}")
        print(f"| {name} | {' | '.join(cells)} | {statistics.mean(secs):.0f} |")


if __name__ == "__main__":
    main()
