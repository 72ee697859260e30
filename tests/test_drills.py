"""The reliability drills that fit in CI time, run as they are documented
(scripts/reliability.py; results go to a temporary file instead of docs/results)."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reliability.py"


@pytest.mark.slow
@pytest.mark.parametrize("drill", ["killed-driver", "kill-anytime", "crash", "ctrl-c",
                                   "server-outage", "cluster"])
def test_drill_passes(drill, tmp_path, monkeypatch):
    monkeypatch.setenv("PODD_RELIABILITY_RESULTS", str(tmp_path / "results.jsonl"))
    done = subprocess.run([sys.executable, str(SCRIPT), drill], capture_output=True, text=True,
                          timeout=840)  # within the suite's 900 s a test
    checks = [line for line in done.stdout.splitlines() if line.strip().startswith("[")]
    assert done.returncode == 0, "\n".join(checks) + done.stderr[-2000:]
    assert checks and all(line.strip().startswith("[ok]") for line in checks)
    assert '"passed": true' in (tmp_path / "results.jsonl").read_text()
