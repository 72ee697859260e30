"""The GPU script of the fidelity study (benchmarks/fidelity/gpu_c1.py) on its --tiny path: it
cannot be run here for real (no GPU), so the script itself is checked on a CPU, on a CIFAR-10
copy small enough for seconds, before a lent GPU's minutes are spent on it."""

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from datafiles import write_parquet_dataset

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")


def test_the_gpu_script_runs_every_cell_and_writes_each_result_with_its_provenance(tmp_path):
    write_parquet_dataset(tmp_path / "cifar10", classes=CIFAR10, n_train=40, n_test=20,
                          size=(32, 32))
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fidelity" / "gpu_c1.py"), "--tiny",
         "--dataset", f"parquet:{tmp_path / 'cifar10'}", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "c1-gpu.jsonl").read_text()
            .splitlines()]
    assert [(r["method"], r["total_inner_steps"]) for r in rows] == [
        ("rat-bptt", 4), ("podd", 4), ("rat-bptt", 4), ("podd", 4)]  # both cells, tiny
    for r in rows:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["width"] == 8
        assert r["device_used"] == "cpu" and len(r["data_hash"]) == 16
        assert r["engine_revision"].startswith(version("podd-sweep"))


def test_bad_input_is_one_line_before_anything_is_written(tmp_path):
    import torch

    write_parquet_dataset(tmp_path / "cifar10", classes=CIFAR10, n_train=40, n_test=20,
                          size=(32, 32))
    copy = ["--dataset", f"parquet:{tmp_path / 'cifar10'}"]
    cases = [(["--dataset", f"parquet:{tmp_path / 'none'}"], "no data at"),
             ([*copy, "--steps", "0", "--device", "cpu"], "steps")]
    if not torch.cuda.is_available():
        cases.append(([*copy, "--device", "cuda"], "no CUDA GPU"))
    for args, says in cases:
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fidelity" / "gpu_c1.py"),
                               "--out", str(tmp_path / "out"), *args],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert done.returncode == 2, done.stderr[-1000:]
        assert done.stderr.startswith("error: ") and says in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (tmp_path / "out").exists()  # nothing written
