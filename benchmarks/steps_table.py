"""Markdown table of step-benchmark results (JSON lines from run_step_benchmarks.sh).

    python benchmarks/steps_table.py docs/results/step-10of40.jsonl
"""

import json
import sys


def engine_name(result: dict) -> str:
    if "engine" in result:
        return result["engine"]
    s = result["settings"]
    graphs = ", CUDA graphs" if result.get("cuda_graphs") else ""
    return f"podd-sweep ({s['unroll']}, {s['precision']}{graphs})"


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    # on a GPU the memory that matters is the GPU's (PyTorch's peak allocation)
    key, what = (("peak_gpu_gib", "GPU memory") if rows and rows[0].get("peak_gpu_gib") is not None
                 else ("peak_rss_gib", "RSS"))
    reference = {r["allocator"]: r["seconds_per_outer_step"] for r in rows if "engine" in r}
    memory = {r["allocator"]: r[key] for r in rows if "engine" in r}
    print(f"| allocator | engine | s / outer step | speed-up vs official-style | peak {what} GiB "
          f"| {what} vs official-style | extraction share |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ref, mem = reference.get(r["allocator"]), memory.get(r["allocator"])
        speedup = f"{ref / r['seconds_per_outer_step']:.2f}x" if ref else "-"
        share = f"{100 * r['extraction_share']:.1f} %" if r.get("extraction_share") else "-"
        ratio = f"{100 * r[key] / mem:.0f} %" if mem else "-"
        print(f"| {r['allocator']} | {engine_name(r)} | {r['seconds_per_outer_step']:.2f} | "
              f"{speedup} | {r[key]:.2f} | {ratio} | {share} |")


if __name__ == "__main__":
    main(sys.argv[1])
