"""The fidelity study (docs/fidelity.md): does the engine reproduce the paper's claims, and at
which scale? Its sweeps live in sweeps/fidelity/; every run is recorded in MLflow and read back
through the report, so the study resumes across days and its figures trace to run ids.

    python benchmarks/fidelity/run.py launch c1     # run (or resume) the study's C1 sweeps
    python benchmarks/fidelity/run.py summary       # tables + JSON + plot from the store

C1 (overlap helps): at 1 IPC, PoDD's overlapping patches against the no-overlap RaT-BPTT
baseline, per schedule (inner horizon T, window, network width): the gap with its 95 %
interval over seeds, at the final evaluation and at each evaluation checkpoint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = ROOT / "sweeps" / "fidelity"
STUDY = {  # claim -> its sweeps, in the order they run
    "c1": ["c1-horizon-width.yaml", "c1-seeds.yaml", "c1-balanced.yaml",
           "c1-patches-small.yaml", "c1-patches-small-seeds.yaml", "c1-width128.yaml",
           "c1-w64-seeds.yaml", "c1-patches.yaml", "c1-extras.yaml"],
    "c2": ["c2-ipc.yaml", "c2-seeds.yaml", "c2-pooling.yaml", "c2-fixed-seeds.yaml"],
    "c3": ["c3-order.yaml"],
}
STORE = f"sqlite:///{ROOT / 'runs' / 'fidelity' / 'mlflow.db'}"  # where launch records it


def launch(claim: str) -> int:
    """Each sweep of the claim in turn through `podd-sweep launch` (a finished sweep is not
    rerun; an interrupted one resumes from its checkpoints)."""
    (ROOT / "runs" / "fidelity").mkdir(parents=True, exist_ok=True)
    cli = str(Path(sys.executable).with_name("podd-sweep"))
    for name in STUDY[claim]:
        print(f"== {name}", flush=True)
        done = subprocess.run([cli, "launch", str(SWEEPS / name), "--quiet"], cwd=ROOT)
        if done.returncode not in (0,):
            return done.returncode
    return 0


PAPER_GRID = "16x6"  # Fig. 6's 96 overlapping patches at 1 IPC: the C1 curve's PoDD side
C1_SWEEPS = "fidelity-c1"  # the C1 sweeps' names start so; C2 also runs 1 IPC at cpu-small,
# and its one-seed runs must not stand in for the C1 curve's point at that schedule


def c1_rows(tracking_uri: str, grid: str = PAPER_GRID) -> list[dict]:
    """One row per schedule with PoDD runs of patch grid `grid` and baseline runs at 1 IPC:
    the settings that set it apart, both sides' accuracies and the gap, at the end and per
    evaluation step. (Only that grid: with several in a schedule, the report's verdict would
    take the best, and the curve would mix grids.)"""
    import dataclasses

    import pyarrow as pa

    from orchestrator.report import build_report
    from orchestrator.runs import gather_runs
    from orchestrator.store import run_records
    from orchestrator.stats import welch_interval

    gathered = gather_runs(tracking_uri, "podd-sweep")
    columns = (gathered.runs.column(c).to_pylist() for c in ("sweep", "method", "patch_grid"))
    keep = [i for i, (sweep, method, patch_grid) in enumerate(zip(*columns))
            if sweep.startswith(C1_SWEEPS) and (method != "podd" or patch_grid == grid)]
    gathered = dataclasses.replace(gathered, runs=gathered.runs.take(pa.array(keep, pa.int64())))
    records = {r.run_id: r for r in run_records(tracking_uri, "podd-sweep")}
    rows = []
    for family in sorted(set(gathered.runs.column("dataset").to_pylist())):
        report = build_report(gathered, family)
        for schedule in report.schedules:
            b = schedule.baseline
            ones = [r for r in schedule.verdict.per_ipc if r.ipc == 1.0]
            if b is None or not ones:
                continue
            (podd,) = ones
            row = {"family": family, "schedule": schedule.label, **{
                k: schedule.schedule.get(k) for k in ("total_inner_steps", "window", "width",
                                                      "steps")},
                "configuration": podd.configuration, "podd": podd.accuracy,
                "podd_std": podd.accuracy_std, "podd_runs": podd.runs,
                "baseline": b.accuracy, "baseline_std": b.std, "baseline_runs": b.runs,
                "gap": podd.difference, "gap_low": podd.difference_low,
                "gap_high": podd.difference_high, "podd_run_ids": podd.run_ids,
                "baseline_run_ids": b.run_ids, "by_eval_step": {}}
            steps = sorted({int(k.rsplit("_", 1)[1]) for i in podd.run_ids
                            for k in records[i].metrics
                            if k.startswith("test_accuracy_") and k[14:].isdigit()})
            for step in steps:
                def side(ids):
                    values = [records[i].metrics[f"test_accuracy_{step}"] for i in ids]
                    mean = sum(values) / len(values)
                    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 \
                        if len(values) > 1 else None
                    return mean, std, len(values)

                (pm, ps, pn), (bm, bs, bn) = side(podd.run_ids), side(b.run_ids)
                interval = welch_interval(pm, ps, pn, bm, bs, bn)
                row["by_eval_step"][str(step)] = {
                    "podd": pm, "baseline": bm, "gap": pm - bm,
                    "gap_low": interval.low if interval else None,
                    "gap_high": interval.high if interval else None}
            rows.append(row)
    return rows


def pct(value: float | None) -> str:
    return "?" if value is None else f"{100 * value:.2f}"


def mean_std(mean: float, std: float | None) -> str:
    """'27.21 +- 0.54' over seeds; one run has no spread to show."""
    return pct(mean) if std is None else f"{pct(mean)} +- {pct(std)}"


C1_GRID_SWEEPS = ("fidelity-c1-balanced", "fidelity-c1-patches-small",  # patch grids at 1 IPC
                  "fidelity-c1-patches-small-seeds")
C2_SWEEPS = ("fidelity-c2-ipc", "fidelity-c2-seeds",  # C2's first pass and its second,
             "fidelity-c2-pooling",  # learned labels pooled the official code's way,
             "fidelity-c2-fixed-seeds")  # and a second seed for the fixed labels below 0.7 IPC


def podd_rows(tracking_uri: str, sweeps: tuple[str, ...]) -> list[dict]:
    """Every PoDD configuration of the sweeps (their runs read together, one store) against
    the RaT-BPTT 1-IPC baseline of its schedule: its accuracy over seeds and its gap with the
    report's own 95 % interval. A configuration is all settings but the seed, so the patch
    grid, IPC and labels each keep their own row (the report's verdict keeps only the best
    configuration per IPC)."""
    from orchestrator.report import build_report
    from orchestrator.runs import gathered_from
    from orchestrator.store import run_records
    from orchestrator.verdict import interval_to

    # read each sweep once; one that has not run in this store (a store is not committed: a
    # new one has none) adds nothing
    records = [r for s in sweeps for r in run_records(tracking_uri, "podd-sweep", sweep=s)]
    if not records:
        return []
    gathered = gathered_from(records)
    sweep_of = dict(zip(gathered.runs.column("run_id").to_pylist(),
                        gathered.runs.column("sweep").to_pylist()))
    rows = []
    for family in sorted(set(gathered.runs.column("dataset").to_pylist())):
        for schedule in build_report(gathered, family).schedules:
            b = schedule.baseline
            if b is None:
                continue
            for g in schedule.groups.to_pylist():
                if g["method"] != "podd":
                    continue
                interval = interval_to(g, b)  # the report's own, as its verdict uses
                rows.append({"family": family, "schedule": schedule.schedule,
                             "sweeps": sorted({sweep_of[i] for i in g["run_ids"]}),
                             "ipc": g["ipc"], "patch_grid": g["patch_grid"],
                             "labels": g["labels"], "order": g["order"],
                             # an older run's settings carry the late setting's default
                             "label_pooling": json.loads(g["settings"])["label_pooling"],
                             "podd": g["accuracy"], "podd_std": g["accuracy_std"],
                             "podd_runs": g["runs"], "podd_run_ids": g["run_ids"],
                             "baseline": b.accuracy, "baseline_std": b.std,
                             "baseline_runs": b.runs, "baseline_run_ids": b.run_ids,
                             "gap": g["accuracy"] - b.accuracy,
                             "gap_low": interval.low if interval else None,
                             "gap_high": interval.high if interval else None})
    return rows


def grid_rows(tracking_uri: str, sweeps: tuple[str, ...] = C1_GRID_SWEEPS) -> list[dict]:
    """The patch grids at 1 IPC against the baseline (Fig. 6's axis): one row per grid, with
    its number of patches."""
    return [{**r, "patches": patches(r["patch_grid"])}
            for r in podd_rows(tracking_uri, sweeps) if r["ipc"] == 1.0]


def patches(grid: str) -> int:
    across, down = (int(n) for n in grid.split("x"))
    return across * down


def print_grids(rows: list[dict]) -> None:
    print("| patch grid | patches | PoDD % (runs) | RaT-BPTT % (runs) | gap (points) | "
          "95 % interval |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['patch_grid']} | {patches(r['patch_grid'])} | "
              f"{mean_std(r['podd'], r['podd_std'])} ({r['podd_runs']}) | "
              f"{mean_std(r['baseline'], r['baseline_std'])} ({r['baseline_runs']}) | "
              f"{100 * r['gap']:+.2f} | {interval_text(r)} |")


def interval_text(row: dict) -> str:
    return ("unknown" if row["gap_low"] is None else
            f"[{100 * row['gap_low']:+.2f}, {100 * row['gap_high']:+.2f}]")


def print_c1(rows: list[dict]) -> None:
    print("| T | window | width | PoDD 16x6 % (runs) | RaT-BPTT % (runs) | gap (points) | "
          "95 % interval | gap by evaluation step (300 / 600 / 1000 / 2000) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (int(r["width"] or 0), int(r["total_inner_steps"] or 0))):
        interval = ("unknown (1 seed)" if r["gap_low"] is None else
                    f"[{100 * r['gap_low']:+.2f}, {100 * r['gap_high']:+.2f}]")
        by_step = " / ".join(f"{100 * v['gap']:+.2f}" for _, v in
                             sorted(r["by_eval_step"].items(), key=lambda kv: int(kv[0])))
        print(f"| {r['total_inner_steps']} | {r['window']} | {r['width']} | {pct(r['podd'])} "
              f"({r['podd_runs']}) | {pct(r['baseline'])} ({r['baseline_runs']}) | "
              f"{100 * r['gap']:+.2f} | {interval} | {by_step} |")


def plot_c1(rows: list[dict], path: Path) -> None:
    """The gap (PoDD minus no overlap, points) against the inner horizon T, one line per
    width, with the 95 % interval where there are seeds to tell it."""
    fig, ax = figure()
    for width in sorted({int(r["width"]) for r in rows}):
        mine = sorted((r for r in rows if int(r["width"]) == width),
                      key=lambda r: int(r["total_inner_steps"]))
        xs = [int(r["total_inner_steps"]) for r in mine]
        ax.plot(xs, [100 * r["gap"] for r in mine], marker="o", label=f"width {width}")
        for x, r in zip(xs, mine):
            if r["gap_low"] is not None:
                ax.vlines(x, 100 * r["gap_low"], 100 * r["gap_high"], alpha=0.5)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("inner horizon T (window T/4)")
    ax.set_ylabel("PoDD 16x6 minus no overlap (points)")
    ax.set_title("C1 at 1 IPC on CIFAR-10 (cpu-small otherwise)", fontsize=10)
    save(fig, ax, path, loc="lower right", title="bars: 95 % interval over seeds",
         title_fontsize=7)


def c2_rows(tracking_uri: str, sweeps: tuple[str, ...] = C2_SWEEPS) -> list[dict]:
    """C2: PoDD at each IPC and label mode of the C2 sweeps against their RaT-BPTT 1-IPC
    baseline (one schedule, one store)."""
    rows = podd_rows(tracking_uri, sweeps)
    for r in rows:  # the label mode as the plot and table name it
        r["label_mode"] = (f"{r['labels']}, {r['label_pooling']} pooling"
                           if r["labels"] == "learned" else r["labels"])
    return sorted(rows, key=lambda r: (r["ipc"], r["label_mode"]))


def c3_rows(tracking_uri: str, sweep: str = "fidelity-c3-order") -> dict:
    """C3: each run's class order score (the inverse of its summed neighbour distance, as the
    paper) against its test accuracy, and their correlation with a 95 % interval."""
    from orchestrator.stats import pearson_interval
    from orchestrator.store import run_records

    runs = [r for r in run_records(tracking_uri, "podd-sweep", sweep=sweep)
            if r.status == "FINISHED" and r.params.get("order_score") not in (None, "null")]
    points = [{"run_id": r.run_id, "order": r.params.get("order"),
               "seed": int(r.params.get("seed", 0)),
               "order_score": 1.0 / float(r.params["order_score"]),
               "summed_distance": float(r.params["order_score"]),
               "accuracy": r.metrics["test_accuracy"]} for r in runs]
    result: dict = {"points": sorted(points, key=lambda p: (p["order"], p["seed"]))}
    if len(points) >= 3:
        c = pearson_interval([p["order_score"] for p in points],
                             [p["accuracy"] for p in points])
        result["correlation"] = {"r": c.r, "low": c.low, "high": c.high, "n": c.n}
    return result


def plot_c2(rows: list[dict], path: Path) -> None:
    """PoDD's accuracy against IPC, one line per label mode, with the RaT-BPTT 1-IPC baseline
    as a band (mean +- std over its seeds): C2 reads off where the lines cross the band."""
    fig, ax = figure()
    for mode, marker in zip(sorted({r["label_mode"] for r in rows}), "osD^v"):
        mine = sorted((r for r in rows if r["label_mode"] == mode), key=lambda r: r["ipc"])
        ax.errorbar([r["ipc"] for r in mine], [100 * r["podd"] for r in mine],
                    yerr=[100 * (r["podd_std"] or 0) for r in mine], marker=marker,
                    capsize=3, label=f"PoDD 16x6, labels: {mode}")
    b, s = 100 * rows[0]["baseline"], 100 * (rows[0]["baseline_std"] or 0)
    ax.axhline(b, color="black", lw=0.8,
               label=f"RaT-BPTT 1 IPC ({rows[0]['baseline_runs']} seeds, band: std)")
    ax.axhspan(b - s, b + s, color="black", alpha=0.1)
    ax.set_xlabel("images per class (IPC)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("C2 on CIFAR-10 (cpu-small schedule; bars: std over seeds)", fontsize=10)
    save(fig, ax, path, loc="lower right")


def plot_grids(rows: list[dict], path: Path) -> None:
    """Fig. 6's axis: the gap to the no-overlap baseline (10 patches) against the number of
    patches at 1 IPC, with the 95 % interval where there are seeds to tell it."""
    fig, ax = figure()
    rows = sorted(rows, key=lambda r: patches(r["patch_grid"]))
    xs = [patches(r["patch_grid"]) for r in rows]
    ax.plot(xs, [100 * r["gap"] for r in rows], "o")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['patch_grid']} ({r['podd_runs']})", (x, 100 * r["gap"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
        if r["gap_low"] is not None:
            ax.vlines(x, 100 * r["gap_low"], 100 * r["gap_high"], alpha=0.5)
    ax.axhline(0, color="black", lw=0.8)
    ax.plot([10], [0], "ks", label="no overlap: 10 patches (RaT-BPTT), the reference")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks([10, *xs], [str(x) for x in (10, *xs)])
    ax.set_xlabel("patches at 1 IPC (grid, seeds)")
    ax.set_ylabel("PoDD minus no overlap (points)")
    ax.set_title("Patch count (Fig. 6) on CIFAR-10, cpu-small; bars: 95 % interval",
                 fontsize=10)
    save(fig, ax, path, loc="lower right")


def figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.5, 4), dpi=120)


def save(fig, ax, path: Path, **legend) -> None:
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, **legend)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_c3(result: dict, path: Path) -> None:
    """Each run's accuracy against its class order's score, PoCO's runs marked."""
    fig, ax = figure()
    for order, marker in (("random", "o"), ("poco", "*")):
        mine = [p for p in result["points"] if p["order"] == order]
        ax.scatter([p["order_score"] for p in mine], [100 * p["accuracy"] for p in mine],
                   marker=marker, s=60 if order == "poco" else 30, label=order)
    c = result.get("correlation")
    if c:
        interval = "unknown" if c["low"] is None else f"[{c['low']:+.2f}, {c['high']:+.2f}]"
        ax.set_title(f"C3 at 0.3 IPC: r = {c['r']:+.2f}, 95 % interval {interval}, "
                     f"{c['n']} runs (paper: 0.76)", fontsize=10)
    ax.set_xlabel("order score (1 / summed neighbour distance)")
    ax.set_ylabel("test accuracy (%)")
    save(fig, ax, path)


def print_c2(rows: list[dict]) -> None:
    print("| IPC | labels | PoDD % (runs) | RaT-BPTT 1 IPC % (runs) | gap (points) | "
          "95 % interval |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ipc']:g} | {r['label_mode']} | {mean_std(r['podd'], r['podd_std'])} "
              f"({r['podd_runs']}) | {mean_std(r['baseline'], r['baseline_std'])} "
              f"({r['baseline_runs']}) | {100 * r['gap']:+.2f} | {interval_text(r)} |")


def print_c3(result: dict) -> None:
    print("| order | seed | summed neighbour distance | score (its inverse) | accuracy % |")
    print("|---|---|---|---|---|")
    for p in result["points"]:
        print(f"| {p['order']} | {p['seed']} | {p['summed_distance']:.4f} | "
              f"{p['order_score']:.4f} | {pct(p['accuracy'])} |")
    c = result.get("correlation")
    if c:
        interval = "unknown" if c["low"] is None else f"[{c['low']:+.2f}, {c['high']:+.2f}]"
        print(f"correlation of score with accuracy: r = {c['r']:+.2f}, 95 % interval "
              f"{interval} over {c['n']} runs (the paper: 0.76)")


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments are one `error:` line (exit 2), as everywhere in podd-sweep, not argparse's
    usage block."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def main() -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("launch", help="run (or resume) a claim's sweeps")
    run.add_argument("claim", choices=sorted(STUDY))
    summary = sub.add_parser("summary", help="tables, JSON and plot from the store")
    summary.add_argument("--tracking-uri", default=STORE)
    summary.add_argument("--json", type=Path, default=ROOT / "docs/results/fidelity/c1.json")
    summary.add_argument("--plot", type=Path, default=ROOT / "docs/images/fidelity-c1.png")
    args = parser.parse_args()
    if args.command == "launch":
        return launch(args.claim)
    from orchestrator.store import check_store

    try:  # before anything is read or written: a fresh clone has the results, not the store
        check_store(args.tracking_uri)
    except ValueError as e:
        print(f"error: --tracking-uri: {e}; the committed results are in "
              f"docs/results/fidelity/ (the study's store is not committed)", file=sys.stderr)
        return 2
    rows = merged(c1_rows(args.tracking_uri), args.json)
    print_c1(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"claim": "c1", "rows": rows}, indent=1) + "\n")
    if rows:
        plot_c1(rows, args.plot)
    print(f"wrote {args.json} and {args.plot}", file=sys.stderr)
    export_runs(args.tracking_uri, args.json.with_name("runs.jsonl"))
    grids_json = args.json.with_name("c1-grids.json")
    grids = sorted(merged(grid_rows(args.tracking_uri), grids_json, grid_key),
                   key=lambda r: patches(r["patch_grid"]))
    if grids:
        print_grids(grids)
        write(grids_json, {"claim": "c1", "rows": grids})
        plot_grids(grids, args.plot.with_name("fidelity-c1-patches.png"))
    c2 = c2_rows(args.tracking_uri)
    if c2:
        print_c2(c2)
        write(args.json.with_name("c2.json"), {"claim": "c2", "rows": c2})
        plot_c2(c2, args.plot.with_name("fidelity-c2.png"))
    c3 = c3_rows(args.tracking_uri)
    if c3["points"]:
        print_c3(c3)
        write(args.json.with_name("c3.json"), {"claim": "c3", **c3})
        plot_c3(c3, args.plot.with_name("fidelity-c3.png"))
    return 0


KEPT_PARAMS = ("method", "ipc", "patch_grid", "order", "labels", "seed", "steps",
               "total_inner_steps", "window", "width", "real_batch", "eval_models", "curriculum",
               "embedder_used", "order_score", "achieved_ipc", "trial_key", "engine_commit")


def export_runs(tracking_uri: str, path: Path) -> None:
    """Every finished run of the study's store, one JSON line each (its settings and test
    accuracies), merged into the file by run id: the record that outlives the store, which is
    not committed."""
    from orchestrator.runs import provenance_of
    from orchestrator.store import run_records

    known = {}
    if path.exists():
        for line in path.read_text().splitlines():
            known[json.loads(line)["run_id"]] = line
    for r in run_records(tracking_uri, "podd-sweep"):
        if r.status != "FINISHED":
            continue
        known[r.run_id] = json.dumps({
            "run_id": r.run_id, "sweep": r.tags.get("podd.sweep"),
            **{k: r.params[k] for k in KEPT_PARAMS if k in r.params},
            # where it came from (none for runs older than the record; 'A then B' for a run
            # resumed on other code or data)
            **{k: v for k, v in provenance_of(r).items() if v},
            **{k: v for k, v in sorted(r.metrics.items()) if k.startswith("test_accuracy")}})
    path.write_text("".join(line + "\n" for line in known.values()))
    print(f"wrote {path} ({len(known)} runs)", file=sys.stderr)


def merged(rows: list[dict], previous: Path, key=None) -> list[dict]:
    """This store's rows, and the rows of an earlier summary (`previous`) that this store does
    not hold (a store is not committed: a new checkout starts with an empty one); a row is
    known by `key` (default: the C1 curve's schedule). Each row keeps its run ids, so an old
    row says which store it came from."""
    if not previous.exists():
        return rows
    key = key or c1_schedule
    mine = {key(r) for r in rows}
    kept = [{**r, "from_earlier_summary": True} for r in json.loads(previous.read_text())["rows"]
            if key(r) not in mine]
    return rows + kept


def c1_schedule(row: dict) -> tuple:
    return (row["family"], row["total_inner_steps"], row["window"], row["width"], row["steps"])


def grid_key(row: dict) -> tuple:
    return (row["family"], json.dumps(row["schedule"], sort_keys=True), row["patch_grid"])


def write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
