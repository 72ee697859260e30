"""How podd-sweep keeps sweeps in MLflow: tag names, the default store, reading it back.

Imports neither Ray nor torch, so that `podd-sweep status` and `report` start fast.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from podd_engine.errors import UserError, first_line

SWEEP_TAG = "podd.sweep"        # on the parent run and every trial run of a sweep
ROLE_TAG = "podd.role"          # sweep | trial
KEY_TAG = "podd.trial_key"      # hash of the trial's engine config (TrialConfig.key)
ERROR_TAG = "podd.error"        # why a trial failed
DATASET_TAG = "podd.dataset"    # on trial runs from their start, before any param
STOPPED_EARLY_TAG = "podd.stopped_early"  # why a search stopped a trial early (run KILLED)
SEARCH_TAG = "podd.search"      # on a search's parent run: its progress and answer (JSON)
# Where a trial run came from (params of its first attempt: podd_engine/provenance.py, and the
# data's content hash), and, when a resumed attempt ran other code, torch, device or data, each
# value in the order the attempts ran ("" for an attempt older than the record), as JSON
PROVENANCE = ("engine_revision", "torch_version", "device_used", "data_hash")
PROVENANCE_HISTORY_TAG = "podd.provenance_history"
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


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of a local sqlite store keeps its artifacts: `mlruns/` beside the
    database file, wherever the command runs (MLflow's default, ./mlruns, depends on the
    working folder). None for other stores: the server decides."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()
    return None


def resolve_tracking_uri(override: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here."""
    return absolute_tracking_uri(override or os.environ.get("MLFLOW_TRACKING_URI")
                                 or DEFAULT_TRACKING_URI)


def open_store(tracking_uri: str | None, experiment: str):
    """(client, experiment id) of an existing store and experiment, else a ValueError that
    says what to do. Never creates a store."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    check_store(uri)
    with mlflow_errors(uri):
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = [e.name for e in client.search_experiments()]
            raise UserError(f"no experiment {experiment!r} in {uri}: use --experiment with one "
                             f"of {', '.join(names) or '(none: the store is empty)'}")
    return client, found.experiment_id


# The tables the direct reader queries; MLflow's own bookkeeping table marks the file as its.
MLFLOW_SQLITE_TABLES = frozenset({"experiments", "runs", "tags", "params", "latest_metrics",
                                  "metrics", "alembic_version"})


def _no_store(path: Path) -> ValueError:
    return ValueError(f"no MLflow store at {path}: run `podd-sweep launch SPEC` here first, or "
                      f"pass --tracking-uri")


def check_store(uri: str) -> None:
    """Before reading a store: a local one must exist and be MLflow's (`check_local_store`), a
    tracking server must answer within seconds (`check_tracking_server`; MLflow's client would
    retry for minutes)."""
    check_local_store(uri)
    check_tracking_server(uri)


def check_local_store(uri: str) -> None:
    """A ValueError unless a local store (sqlite file, file: folder) exists and is MLflow's.

    MLflow's client *creates* what it does not find: the tables in an empty or foreign sqlite
    file, a folder and its default experiment for a file: store. Reading must never write to a
    file the user pointed at by mistake, so it is checked here, read-only, before the client
    ever sees it."""
    if uri.startswith("sqlite:///"):
        _check_sqlite_store(Path(uri.removeprefix("sqlite:///")))
    elif uri.startswith("file:"):
        _check_file_store(Path(unquote(urlparse(uri).path)))


def _check_sqlite_store(path: Path) -> None:
    if not path.exists():
        raise _no_store(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not an MLflow sqlite store: pass "
                         f"--tracking-uri file:{path} for a folder store")
    try:
        with _reading(path) as db:
            tables = _tables(db)
    except sqlite3.DatabaseError:  # "file is not a database"
        raise UserError(f"{path} is not an MLflow store (not a sqlite database)") from None
    if not tables:
        raise UserError(f"{path} is not an MLflow store (an empty sqlite file): run "
                         f"`podd-sweep launch SPEC` to fill it, or pass --tracking-uri")
    missing = MLFLOW_SQLITE_TABLES - tables
    if missing:
        raise UserError(f"{path} is a sqlite database but not an MLflow store (no "
                         f"{', '.join(sorted(missing))} table)")


def _reading(path: Path) -> contextlib.closing:
    """A connection to read a sqlite file. Read-only, unless a writer was killed mid-write and
    left its rollback journal beside it: then SQLite must roll that back first, which a
    read-only connection cannot (it refuses to read at all), so the file is opened for
    writing; it is never created (mode rw), and only SQLite's own recovery writes to it."""
    journal = path.with_name(path.name + "-journal")
    mode = "rw" if journal.exists() and journal.stat().st_size > 0 else "ro"
    return contextlib.closing(sqlite3.connect(f"file:{path}?mode={mode}", uri=True))


def _tables(db: sqlite3.Connection) -> set[str]:
    return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = "
                                           "'table'") if not name.startswith("sqlite_")}


def _mlflow_tables() -> set[str]:
    """Every table MLflow's schema makes (its models, and alembic's version table)."""
    import mlflow.store.model_registry.dbmodels.models  # noqa: F401 (registers the tables)
    import mlflow.store.tracking.dbmodels.models  # noqa: F401
    from mlflow.store.db.base_sql_model import Base

    return set(Base.metadata.tables) | {"alembic_version"}


def _check_file_store(root: Path) -> None:
    if not root.exists():
        raise _no_store(root)
    # MLflow's file store keeps a .trash folder and one folder with a meta.yaml per experiment
    if not root.is_dir() or not ((root / ".trash").is_dir() or any(root.glob("*/meta.yaml"))):
        raise UserError(f"{root} is not an MLflow file store (no .trash folder or experiment "
                         f"meta.yaml in it)")


def prepare_sqlite_store(uri: str) -> None:
    """Make sure a local sqlite store can be written, before a sweep writes to it.

    A store that does not exist is created atomically: MLflow's schema is written into a
    temporary file beside it, which is then linked into place, so a launch killed while MLflow
    creates its tables leaves either no store or a complete one (never a half-migrated file
    MLflow cannot open again). A half-created store found (an older version's, or another
    tool's interrupted creation) is rebuilt when it holds no runs; with runs it is one line
    saying what to do. Other stores (a server) are left to MLflow."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if path.exists():
        state, runs = _sqlite_schema_state(path)
        if state == "complete":
            return
        if state == "foreign":  # never touched: say what the file is
            check_local_store(uri)
            raise UserError(f"{path} holds tables MLflow does not make, so it is not an MLflow "
                            f"store (or one from another version): it is left as it is; point "
                            f"--tracking-uri at another store")
        if runs:
            raise UserError(f"{path} is an MLflow store whose creation or migration was cut "
                            f"short, and it holds {runs} run(s): back it up, then run `mlflow "
                            f"db upgrade sqlite:///{path}`, or move it away and launch again "
                            f"for a new store")
        for leftover in (path, path.with_name(path.name + "-journal")):
            leftover.unlink(missing_ok=True)  # nothing recorded in it: build it anew
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.creating-*"):  # a killed launch's
        if not _alive(stale.name.rsplit("-", 1)[-1].split(".")[0]):
            stale.unlink(missing_ok=True)
    staging = path.with_name(f".{path.name}.creating-{os.getpid()}")
    try:
        with mlflow_errors(f"sqlite:///{path}"):
            _write_mlflow_schema(staging)
        try:
            os.link(staging, path)  # atomic, and never over a store another launch just made
        except FileExistsError:
            pass
    finally:
        for leftover in (staging, staging.with_name(staging.name + "-journal")):
            leftover.unlink(missing_ok=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _write_mlflow_schema(path: Path) -> None:
    """An empty MLflow store with the whole schema at `path` (MLflow creates and migrates it
    when it first opens a store)."""
    import logging

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    quiet = logging.getLogger("mlflow.store.db.utils")
    level, quiet.level = quiet.level, logging.WARNING  # "Creating initial MLflow database..."
    try:
        store = SqlAlchemyStore(f"sqlite:///{path}", str(path.parent / "mlruns"))
        store.engine.dispose()
    finally:
        quiet.setLevel(level)


def _sqlite_schema_state(path: Path) -> tuple[str, int]:
    """(complete | half-created | foreign, the number of runs it holds) of a sqlite file.
    Half-created: MLflow's tables and nothing else, not all of them or not at the latest
    revision (an empty file counts too); a file with any other table is foreign."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    try:
        with _reading(path) as db:
            tables = _tables(db)
            if tables and not (tables & MLFLOW_SQLITE_TABLES and tables <= _mlflow_tables()):
                return "foreign", 0
            runs = (db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
                    if "runs" in tables else 0)
            version = (db.execute("SELECT version_num FROM alembic_version").fetchone()
                       if "alembic_version" in tables else None)
    except sqlite3.DatabaseError:
        return "foreign", 0
    if version is not None and version[0] == _get_latest_schema_revision() \
            and MLFLOW_SQLITE_TABLES <= tables:
        return "complete", runs
    return "half-created", runs


@contextlib.contextmanager
def mlflow_errors(uri: str) -> Iterator[None]:
    """MLflow's own errors (a store it cannot read, a schema it would have to migrate, a server
    that does not answer) as one ValueError line the CLI shows, not a traceback."""
    from mlflow.exceptions import MlflowException

    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except MlflowException as exc:
        reason = first_line(str(exc.message) or type(exc).__name__)
        raise UserError(f"MLflow could not read the store {uri}: {reason}") from None
    except (SQLAlchemyError, sqlite3.Error) as exc:
        raise UserError(f"the MLflow store {uri} cannot be used: {first_line(exc)}: check the "
                        f"file (or point --tracking-uri at another store)") from None


def runs_filter(role: str, sweep: str | None = None) -> str:
    """MLflow's search filter for the runs of one role (`sweep` parents or `trial`s), of one
    sweep or of all."""
    query = f"tags.`{ROLE_TAG}` = '{role}'"
    return query + (f" and tags.`{SWEEP_TAG}` = '{sweep}'" if sweep is not None else "")


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


@dataclass
class RunRecord:
    """What the report and status need of one trial run."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]  # each metric's latest value
    tags: dict[str, str]
    steps: dict[str, int] = field(default_factory=dict)    # step of the latest value
    peaks: dict[str, float] = field(default_factory=dict)  # highest value (metrics asked for)


def run_records(tracking_uri: str | None, experiment: str, *, role: str = "trial",
                sweep: str | None = None, peaks: tuple[str, ...] = ()) -> list[RunRecord]:
    """Every run of the experiment with this role (trial runs, or the sweeps' parent runs), of
    one sweep or all, with params, latest metrics and tags; for the metrics named in `peaks`
    also the highest value reached and the latest step.

    A sqlite store is read directly (one query per table: 10,000 runs in about a second, where
    MLflow's client builds an object per param and takes 15 s); any other store, or a sqlite
    store whose columns are not the ones this reader knows, goes through MLflow's client. A
    local store that does not exist or is not MLflow's is a ValueError, never created."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        check_local_store(uri)
        try:
            return _sqlite_run_records(Path(uri.removeprefix("sqlite:///")), experiment, role,
                                       sweep, peaks)
        except sqlite3.DatabaseError:
            pass  # MLflow's tables, but columns this reader does not know: the client reads it
    client, experiment_id = open_store(tracking_uri, experiment)  # checks the store
    query = runs_filter(role, sweep)
    records = []
    with mlflow_errors(uri):
        for run in search_all(client, experiment_id, query):
            record = RunRecord(run.info.run_id, run.info.run_name, run.info.status,
                               dict(run.data.params), dict(run.data.metrics),
                               dict(run.data.tags))
            for key in set(peaks) & set(record.metrics):  # a metric's steps: a request each
                history = client.get_metric_history(record.run_id, key)
                record.steps[key] = max(m.step for m in history)
                record.peaks[key] = max(m.value for m in history)
            records.append(record)
    return records


def _sqlite_run_records(path: Path, experiment: str, role: str, sweep: str | None,
                        peaks: tuple[str, ...]) -> list[RunRecord]:
    with _reading(path) as db:
        found = db.execute("SELECT experiment_id FROM experiments WHERE name = ? AND "
                           "lifecycle_stage = 'active'", (experiment,)).fetchone()
        if found is None:
            names = [row[0] for row in db.execute(
                "SELECT name FROM experiments WHERE lifecycle_stage = 'active'")]
            raise UserError(f"no experiment {experiment!r} in sqlite:///{path}: use "
                             f"--experiment with one of "
                             f"{', '.join(names) or '(none: the store is empty)'}")
        chosen = ("SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                  "WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active' "
                  "AND t.key = ? AND t.value = ?")
        args: list = [found[0], ROLE_TAG, role]
        if sweep is not None:
            chosen += (" AND EXISTS (SELECT 1 FROM tags s WHERE s.run_uuid = r.run_uuid "
                       "AND s.key = ? AND s.value = ?)")
            args += [SWEEP_TAG, sweep]
        records = {run_id: RunRecord(run_id, name or "", status, {}, {}, {})
                   for run_id, name, status in db.execute(
                       f"SELECT run_uuid, name, status FROM runs WHERE run_uuid IN ({chosen})",
                       args)}
        for run_id, key, value in db.execute(
                f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({chosen})", args):
            records[run_id].params[key] = value
        for run_id, key, value in db.execute(
                f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({chosen})", args):
            records[run_id].tags[key] = value
        for run_id, key, value, is_nan, step in db.execute(
                f"SELECT run_uuid, key, value, is_nan, step FROM latest_metrics "
                f"WHERE run_uuid IN ({chosen})", args):
            records[run_id].metrics[key] = float("nan") if is_nan else float(value)
            records[run_id].steps[key] = int(step)
        for key in peaks:
            for run_id, value in db.execute(
                    f"SELECT run_uuid, MAX(value) FROM metrics WHERE key = ? AND is_nan = 0 "
                    f"AND run_uuid IN ({chosen}) GROUP BY run_uuid", [key, *args]):
                records[run_id].peaks[key] = float(value)
    return list(records.values())


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """A tracking server (http/https URI) must answer its /health page within seconds, before
    a sweep starts anything: otherwise one line naming it (MLflow's client would retry for
    minutes, after Ray had started)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answers (a proxy or an older server without /health): MLflow will tell
    except (OSError, ValueError) as exc:
        reason = first_line(getattr(exc, "reason", None) or exc)
        raise UserError(f"the MLflow tracking server {uri} does not answer ({reason}): start "
                        f"it, check the address, or pass --tracking-uri sqlite:///mlflow.db "
                        f"for a local store", field="tracking_uri") from None
