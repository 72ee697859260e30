"""The `podd-sweep` command line (the console script `orchestrator.cli:app`). The app and
what the commands share live in cli_app; each command module registers its own on the app:
  cli_engine   datasets, distill, evaluate (the engine, no Ray)
  cli_sweeps   launch, stop, status, ui (Ray Tune and MLflow)
  cli_report   report

Errors a user can fix (bad data set name, missing folder, malformed files) print one line
`error: ...` to stderr and exit with code 2; nothing half-written is left behind.
"""

from orchestrator import cli_engine, cli_report, cli_sweeps  # noqa: F401 (they register)
from orchestrator.cli_app import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
