"""Time a cold (decode) and a warm (cached) load of a data set, and the ZCA fit and cache.

    python benchmarks/bench_dataset_cache.py parquet:../shared/datasets/cifar10-jpeg
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

from podd_engine.data import create_dataset
from podd_engine.preprocess import fit_preprocessing


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", nargs="?", default="parquet:../shared/datasets/cifar10-jpeg")
    parser.add_argument("--warm-repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        ds, cold = timed(lambda: create_dataset(args.dataset, cache_dir=cache))
        warm = min(timed(lambda: create_dataset(args.dataset, cache_dir=cache))[1]
                   for _ in range(args.warm_repeats))
        # The cache is memory-mapped: also time a load that touches every byte once.
        def load_and_read():
            d = create_dataset(args.dataset, cache_dir=cache)
            return int(d.train_images.sum()) + int(d.test_images.sum())
        warm_read = min(timed(load_and_read)[1] for _ in range(args.warm_repeats))
        _, zca_fit = timed(lambda: fit_preprocessing(ds, "zca", cache_dir=cache))
        _, zca_cached = timed(lambda: fit_preprocessing(ds, "zca", cache_dir=cache))
    print(json.dumps({
        "dataset": args.dataset, "train": len(ds.train_images), "test": len(ds.test_images),
        "cold_load_s": round(cold, 3), "warm_load_s": round(warm, 4),
        "warm_load_and_read_all_s": round(warm_read, 3),
        "zca_fit_s": round(zca_fit, 2), "zca_cached_s": round(zca_cached, 3),
        "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
