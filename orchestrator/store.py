"""How podd-sweep keeps sweeps in MLflow: tag names, the default store, reading it back.

Imports neither Ray nor torch, so that `podd-sweep status` and `report` start fast.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SWEEP_TAG = "podd.sweep"        # on the parent run and every trial run of a sweep
ROLE_TAG = "podd.role"          # sweep | trial
KEY_TAG = "podd.trial_key"      # hash of the trial's engine config (TrialConfig.key)
ERROR_TAG = "podd.error"        # why a trial failed
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TERMINAL = ("FINISHED", "FAILED", "KILLED")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "podd-sweep"


def absolute_tracking_uri(uri: str) -> str:
    """sqlite:///relative.db resolved against the working directory, so that the driver, a
    resumed launch and `podd-sweep ui` started elsewhere all mean the same file."""
    match = re.match(r"^sqlite:///(?!/)(.+)$", uri)
    if match:
        return f"sqlite:///{Path(match.group(1)).resolve()}"
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        return Path(uri).resolve().as_uri()  # a plain folder: MLflow's file store
    return uri


def resolve_tracking_uri(override: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here."""
    return absolute_tracking_uri(override or os.environ.get("MLFLOW_TRACKING_URI")
                                 or DEFAULT_TRACKING_URI)


def open_store(tracking_uri: str | None, experiment: str):
    """(client, experiment id) of an existing store and experiment, else a ValueError that
    says what to do. Never creates a store."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise ValueError(f"no MLflow store at {uri.removeprefix('sqlite:///')}: run "
                         f"`podd-sweep launch SPEC` here first, or pass --tracking-uri")
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(f"no experiment {experiment!r} in {uri}: use --experiment with one of "
                         f"{', '.join(names) or '(none: the store is empty)'}")
    return client, found.experiment_id


def search_all(client, experiment_id: str, filter_string: str) -> list:
    """Every run matching `filter_string` (MLflow pages its search results)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000,
                                  page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs
