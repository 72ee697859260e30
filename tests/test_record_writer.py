"""The background MLflow writer (orchestrator/record_writer.py): events recorded in order,
retried while the store is away, given up on after the limit with the sweep told, and what was
not recorded replayed by the next launch from the journal. The store here is a recorder that
refuses for a while; scripts/reliability.py server-outage runs the same against a real
`mlflow server` that is stopped and started (tests/test_drills.py)."""

import json
import pickle
import threading
import time

import pytest

from orchestrator import record_writer
from orchestrator.record_writer import RecordWriter, transient


class AwayStore:
    """A recorder whose store refuses every write until `back()`; records what it took."""

    tracking_uri = "http://127.0.0.1:1"

    def __init__(self, away: bool = False, error: Exception | None = None):
        self.away = away
        self.error = error or ConnectionError("Connection refused")
        self.taken: list[tuple] = []
        self.refused = 0

    def back(self):
        self.away = False

    def _take(self, *event):
        if self.away:
            self.refused += 1
            raise self.error
        self.taken.append(event)

    def trial_started(self, trial):
        self._take("started", trial)

    def trial_result(self, key, result):
        self._take("result", key, result["step"])

    def trial_checkpoint(self, key, folder, step):
        self._take("checkpoint", key, (folder / "poster.png").read_bytes(), step)

    def trial_finished(self, key, error=None, detail=None):
        self._take("finished", key, error)


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(record_writer, "BACKOFF_S", (0.01, 0.05))


def _writer(store, folder, **kw):
    stops = []
    writer = RecordWriter(store, {"a": "trial-a", "b": "trial-b"}, folder,
                          on_give_up=stops.append, **kw)
    return writer, stops


def test_events_are_recorded_in_order_and_the_journal_is_cleared(tmp_path):
    store = AwayStore()
    writer, stops = _writer(store, tmp_path)
    writer.submit("trial_started", "a")
    for step in (5, 10):
        writer.submit("trial_result", "a", {"step": step})
    writer.submit("trial_finished", "a")
    assert writer.flush(timeout=10)
    writer.close()
    assert store.taken == [("started", "trial-a"), ("result", "a", 5), ("result", "a", 10),
                           ("finished", "a", None)]
    assert not writer.journal.exists() and not stops


def test_an_away_store_is_retried_and_takes_every_event_once_when_back(tmp_path):
    store = AwayStore(away=True)
    writer, stops = _writer(store, tmp_path, give_up_s=60)
    submitted = threading.Event()

    def loop():  # Tune's loop: never waits for the store
        for step in range(1, 21):
            writer.submit("trial_result", "a", {"step": step})
        submitted.set()

    started = time.monotonic()
    threading.Thread(target=loop).start()
    assert submitted.wait(5) and time.monotonic() - started < 2
    time.sleep(0.3)
    assert store.refused >= 2 and not store.taken  # retried, with nothing lost meanwhile
    store.back()
    assert writer.flush(timeout=10)
    writer.close()
    assert [e[2] for e in store.taken] == list(range(1, 21)) and not stops


def test_a_store_away_past_the_limit_stops_the_sweep_and_the_next_launch_replays(tmp_path):
    store = AwayStore(away=True)
    writer, stops = _writer(store, tmp_path, give_up_s=0.2)
    writer.submit("trial_started", "a")
    writer.submit("trial_result", "a", {"step": 5})
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "poster.png").write_bytes(b"picture")
    writer.checkpoint("a", tmp_path / "ckpt", 5)
    (tmp_path / "ckpt" / "poster.png").unlink()  # Tune may delete a checkpoint at once
    writer.submit("trial_finished", "a")
    assert not writer.flush(timeout=10)  # gave up: nothing marked recorded
    writer.close()
    assert len(stops) == 1 and "did not answer for 0.2 s" in stops[0] == writer.gave_up
    assert not store.taken and len(writer.pending()) == 4
    # a kill can cut the journal's last line short: that event was never handed over
    with open(writer.journal, "a") as f:
        f.write('{"seq": 99, "op": "trial_res')

    store.back()
    again, stops = _writer(store, tmp_path)  # the next launch of the same sweep
    assert again.replay() == 4
    assert store.taken == [("started", "trial-a"), ("result", "a", 5),
                           ("checkpoint", "a", b"picture", 5), ("finished", "a", None)]
    assert not again.journal.exists() and not again.spool.exists() and not stops


def test_a_replay_the_store_still_refuses_is_one_line_and_keeps_the_journal(tmp_path):
    (tmp_path / ".mlflow-journal.jsonl").write_text(
        json.dumps({"seq": 1, "op": "trial_finished", "key": "a", "args": []}) + "\n")
    writer, _ = _writer(AwayStore(away=True), tmp_path)
    with pytest.raises(Exception) as caught:
        writer.replay()
    assert "cannot take the 1 record(s)" in str(caught.value)
    assert "\n" not in str(caught.value) and len(writer.pending()) == 1


def test_a_write_that_is_wrong_is_skipped_with_a_warning_not_retried(tmp_path, capsys):
    store = AwayStore(away=True, error=ValueError("INVALID_PARAMETER_VALUE: key too long"))
    writer, stops = _writer(store, tmp_path)
    writer.submit("trial_finished", "a")
    store_was_refused = writer.flush(timeout=10)
    writer.close()
    assert store_was_refused and store.refused == 1 and not stops
    assert "could not record trial_finished of trial a" in capsys.readouterr().err


def test_what_counts_as_the_store_being_away():
    assert transient(ConnectionError("refused"))
    assert transient(RuntimeError("API request to http://x failed: Max retries exceeded"))
    assert transient(RuntimeError("sqlite3.OperationalError: database is locked"))
    assert not transient(ValueError("INVALID_PARAMETER_VALUE: metric value nan"))


def test_tune_pickles_the_callback_and_gets_this_launchs_writer_back(tmp_path):
    writer, _ = _writer(AwayStore(), tmp_path)
    assert pickle.loads(pickle.dumps(writer)) is writer


def test_the_limit_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv(record_writer.GRACE_ENV, "12.5")
    assert record_writer.grace_s() == 12.5
    monkeypatch.setenv(record_writer.GRACE_ENV, "soon")
    with pytest.raises(Exception, match="PODD_SWEEP_TRACKING_GRACE_S: 'soon'"):
        record_writer.grace_s()


def test_an_event_journaled_but_never_queued_is_recorded_by_flush(tmp_path):
    """A second Ctrl-C raises KeyboardInterrupt wherever Tune's loop thread is, possibly
    between journaling an event and queueing it: flush records it, so the wind-up can close
    the runs (a CI run of the ctrl-c drill once left two runs RUNNING this way)."""
    store = AwayStore()
    writer, stops = _writer(store, tmp_path)
    writer.submit("trial_started", "a")
    real_put = writer._queue.put

    def interrupted_put(event):
        raise KeyboardInterrupt

    writer._queue.put = interrupted_put
    with pytest.raises(KeyboardInterrupt):
        writer.submit("trial_finished", "a")
    writer._queue.put = real_put
    assert writer.flush(timeout=10)
    writer.close()
    assert store.taken == [("started", "trial-a"), ("finished", "a", None)]
    assert not writer.journal.exists() and not stops


def test_an_event_the_writer_thread_cannot_finish_neither_stops_it_nor_hangs_flush(
        tmp_path, capsys):
    """Whatever goes wrong in the writer thread beyond a write to the store (here: marking the
    first event done in the journal fails, as on a full disk), the events after it are still
    recorded, and flush, which waits for the thread with no time limit at the end of a
    sweep, returns having recorded the one left pending."""
    store = AwayStore()
    writer, stops = _writer(store, tmp_path)
    real_append, failures = writer._append, []

    def append(entry):
        if "done" in entry and threading.current_thread().name == "podd-sweep-mlflow" \
                and not failures:
            failures.append(entry)
            raise OSError(28, "No space left on device")
        real_append(entry)

    writer._append = append
    writer.submit("trial_started", "a")
    writer.submit("trial_started", "b")
    assert writer.flush(timeout=10)
    writer.close()
    # "a" is recorded twice (the writer's try and flush's): the recorder's writes are
    # idempotent, so the MLflow record holds it once
    assert store.taken == [("started", "trial-a"), ("started", "trial-b"),
                           ("started", "trial-a")]
    assert "could not finish trial_started of trial a: [Errno 28]" in capsys.readouterr().err
    assert not writer.journal.exists() and not stops
