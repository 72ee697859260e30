"""The random-kills drill (`python scripts/reliability.py random-kills [--spec S] [--kills N]`):
a real sweep (the smoke sweep by default) run twice from the shipped spec, into two stores:
once uninterrupted, once with its driver and whole session (its local Ray too) killed with
SIGKILL at N random moments, each followed by the same command, the last run to the end. The
two records must agree: the same trials, each with one MLflow run, every run FINISHED (or, in
a search, stopped early and KILLED by design, in both records alike), and,
the engine being seeded and deterministic on the CPU, the same test accuracy per trial.

The kill times are drawn uniformly over the uninterrupted run's duration (`--seed` picks
them), so a kill can land anywhere: Ray's start, the store's creation, mid-trial, a final
evaluation, the wind-up.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from reliability import CLI, ROOT, Checks, trial_runs
from reliability_kill import _kill_all


def _launch(spec: Path, folder: Path, name: str) -> subprocess.Popen:
    """`podd-sweep launch SPEC` from the repository root (the spec's relative data paths),
    into this drill's own storage and store."""
    log = open(folder / f"{name}.log", "ab")
    return subprocess.Popen([CLI, "launch", str(spec), "--quiet", f"name={name}",
                             f"storage={folder / 'ray'}",
                             f"tracking_uri=sqlite:///{folder / name}.db"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _record(folder: Path, name: str) -> dict[str, tuple[str, float | None, int]]:
    """trial key -> (status, test accuracy, runs with that key); a run a search stopped early
    (KILLED by design, tag podd.stopped_early) has status STOPPED-EARLY."""
    runs = trial_runs(f"sqlite:///{folder / name}.db", name)
    out: dict[str, tuple[str, float | None, int]] = {}
    for run in runs:
        key = run.data.tags["podd.trial_key"]
        count = out[key][2] + 1 if key in out else 1
        status = ("STOPPED-EARLY" if run.info.status == "KILLED"
                  and "podd.stopped_early" in run.data.tags else run.info.status)
        out[key] = (status, run.data.metrics.get("test_accuracy"), count)
    return out


def drill_random_kills(spec: Path, kills: int, seed: int) -> bool:
    checks = Checks("random-kills")
    folder = Path(tempfile.mkdtemp(prefix="podd-random-kills-"))
    started = time.time()
    code = _launch(spec, folder, "uninterrupted").wait()
    duration = time.time() - started
    checks.check("the uninterrupted run exits 0", code == 0, f"exit {code}, {duration:.0f} s")
    rng = random.Random(seed)
    moments = sorted(rng.uniform(5, duration) for _ in range(kills))
    killed_at = []
    for moment in moments:  # each run is killed `moment` seconds after its own start
        process = _launch(spec, folder, "killed")
        try:
            process.wait(timeout=moment)
            killed_at.append(f"ended before {moment:.0f} s (exit {process.returncode})")
        except subprocess.TimeoutExpired:
            _kill_all(process)
            killed_at.append(f"killed at {moment:.0f} s")
    started = time.time()
    code = _launch(spec, folder, "killed").wait()
    checks.facts.update(spec=str(spec), uninterrupted_s=round(duration), kills=killed_at,
                        last_launch_s=round(time.time() - started))
    checks.check("after the kills, the same command finishes (exit 0)", code == 0,
                 f"exit {code}")
    reference, killed = _record(folder, "uninterrupted"), _record(folder, "killed")
    checks.check("the same trials", sorted(reference) == sorted(killed),
                 f"{len(reference)} and {len(killed)} trials")
    done = ("FINISHED", "STOPPED-EARLY")  # a search's stopped-early trials end KILLED, tagged
    checks.check("one MLflow run per trial, every run FINISHED (or stopped early by a search), "
                 "each with the uninterrupted run's status",
                 all(v[0] in done and v[2] == 1 for v in (*reference.values(),
                                                          *killed.values()))
                 and all(killed.get(k, ("",))[0] == v[0] for k, v in reference.items()),
                 f"{sorted(Counter(v[:1] + v[2:] for v in killed.values()).items())}")
    differing = {k[:8]: (reference[k][1], killed[k][1]) for k in reference
                 if k in killed and reference[k][1] != killed[k][1]}
    checks.check("the same test accuracy per trial (seeded, deterministic on the CPU)",
                 not differing, f"{differing}" if differing else f"{len(reference)} trials equal")
    checks.facts["accuracies"] = {k[:8]: v[1] for k, v in sorted(reference.items())}
    shutil.rmtree(folder, ignore_errors=True)
    return checks.record(f"python scripts/reliability.py random-kills --spec {spec} "
                         f"--kills {kills} --seed {seed}")
