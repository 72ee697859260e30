"""Trial checkpoints: written atomically with a checksum, read back exactly, corruption and
truncation detected with a message that says what to do."""

import json

import pytest
import torch

from orchestrator.checkpoints import (PROGRESS_FILE, STATE_FILE, read_checkpoint_state,
                                      scan_checkpoints, write_checkpoint)
from orchestrator.faults import FaultPlan


def state():
    g = torch.Generator().manual_seed(0)
    return {"poster": torch.randn(3, 8, 20, generator=g), "step": 7,
            "optimizer": {"exp_avg": torch.randn(3, 8, 20, generator=g)}}


def test_round_trip(tmp_path):
    saved = state()
    write_checkpoint(tmp_path, saved, 7, b"\x89PNG fake")
    loaded = read_checkpoint_state(tmp_path)
    assert loaded["step"] == 7 and torch.equal(loaded["poster"], saved["poster"])
    assert json.loads((tmp_path / PROGRESS_FILE).read_text())["step"] == 7
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_or_truncated_state_is_detected(tmp_path, damage):
    write_checkpoint(tmp_path, state(), 7, None)
    data = bytearray((tmp_path / STATE_FILE).read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    (tmp_path / STATE_FILE).write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="is corrupt \\(sha256 mismatch\\): delete that"):
        read_checkpoint_state(tmp_path)


def test_state_without_progress_record_is_refused(tmp_path):
    write_checkpoint(tmp_path, state(), 7, None)
    (tmp_path / PROGRESS_FILE).unlink()
    with pytest.raises(RuntimeError, match="no progress.json"):
        read_checkpoint_state(tmp_path)


def test_final_checkpoint_without_state(tmp_path):
    write_checkpoint(tmp_path, None, 40, None)
    assert read_checkpoint_state(tmp_path) is None


def test_fault_plan_fires_the_given_number_of_times(tmp_path):
    plan_file = tmp_path / "faults.json"
    plan_file.write_text(json.dumps([{"trial": "ipc1-", "step": 3, "kind": "error", "times": 2}]))
    plan = FaultPlan(str(plan_file))
    plan.maybe_fail("podd-ipc1-s0", 2)  # another step: nothing
    plan.maybe_fail("podd-ipc0.5-s0", 3)  # another trial: nothing
    for _ in range(2):
        with pytest.raises(RuntimeError, match="injected fault at step 3"):
            plan.maybe_fail("podd-ipc1-s0", 3)
    plan.maybe_fail("podd-ipc1-s0", 3)  # used up
    with pytest.raises(torch.OutOfMemoryError):
        plan_file.write_text(json.dumps([{"trial": "x", "step": 1, "kind": "oom"}]))
        FaultPlan(str(plan_file)).maybe_fail("x", 1)


def test_newest_intact_checkpoint_is_found_and_damaged_ones_are_listed(tmp_path):
    from orchestrator.checkpoints import newest_checkpoint

    assert newest_checkpoint(tmp_path / "missing") is None
    for index, step in ((1, 10), (2, 30), (3, 20), (6, 40), (7, 50)):
        write_checkpoint(tmp_path / f"checkpoint_00000{index}", state() | {"step": step}, step,
                         None)
    damaged = tmp_path / "checkpoint_000002" / STATE_FILE  # the newest (30) is damaged
    damaged.write_bytes(damaged.read_bytes()[:100])
    (tmp_path / "checkpoint_000004").mkdir()  # half-copied: no progress.json
    (tmp_path / "checkpoint_000006" / STATE_FILE).unlink()  # progress (40) without its state
    (tmp_path / "checkpoint_000007" / PROGRESS_FILE).write_text('{"step": 5')  # torn record
    scan = scan_checkpoints(tmp_path)
    assert scan.newest == newest_checkpoint(tmp_path) == tmp_path / "checkpoint_000003"
    assert [(d.folder.name, d.reason) for d in scan.damaged] == [
        ("checkpoint_000002", "state.pt does not match its sha256 (corrupt or truncated)"),
        ("checkpoint_000004", "no progress.json (an incomplete copy)"),
        ("checkpoint_000006", "progress.json (step 40) but no state.pt (an incomplete copy)"),
        ("checkpoint_000007", "progress.json is unreadable (truncated or not written by "
                              "podd-sweep)")]
    assert scan.is_damaged(str(tmp_path / "checkpoint_000002"))
    assert not scan.is_damaged(tmp_path / "checkpoint_000003")
    assert scan.damaged[0].line() == f"{damaged.parent}: {scan.damaged[0].reason}"
    final = tmp_path / "checkpoint_000005"
    write_checkpoint(final, None, 20, None)
    (final / "artifact").mkdir()
    (final / "artifact" / "poster.json").write_text("{}")
    assert newest_checkpoint(tmp_path) == final


def test_a_torn_progress_record_is_reported_with_what_to_do(tmp_path):
    write_checkpoint(tmp_path, state(), 7, None)
    (tmp_path / PROGRESS_FILE).write_text('{"step": 7, "sha')
    with pytest.raises(RuntimeError, match="is not valid JSON \\(truncated\\?\\): delete that"):
        read_checkpoint_state(tmp_path)


class FakeDistiller:
    def __init__(self):
        self.poster = torch.zeros(3, 4, 4)


@pytest.mark.parametrize("kind, poisoned", [("nan", torch.isnan), ("nan-poster", torch.isnan),
                                            ("inf-poster", torch.isposinf)])
def test_poster_faults_poison_the_poster(tmp_path, kind, poisoned):
    plan_file = tmp_path / "faults.json"
    plan_file.write_text(json.dumps([{"trial": "t", "step": 2, "kind": kind}]))
    distiller = FakeDistiller()
    FaultPlan(str(plan_file)).maybe_fail("t", 1, distiller)  # another step: nothing
    assert torch.isfinite(distiller.poster).all()
    FaultPlan(str(plan_file)).maybe_fail("t", 2, distiller)
    assert poisoned(distiller.poster).all()


def test_nan_loss_fault_is_caught_by_the_engine_at_the_next_step(tmp_path):
    from podd_engine.data import create_dataset
    from podd_engine.rat_bptt import NonFiniteError
    from test_rat_bptt import make_distiller

    plan_file = tmp_path / "faults.json"
    plan_file.write_text(json.dumps([{"trial": "t", "step": 1, "kind": "nan-loss"}]))
    distiller = make_distiller(create_dataset("digits"), 0)
    distiller.step()
    FaultPlan(str(plan_file)).maybe_fail("t", 1, distiller)
    before = distiller.poster.detach().clone()
    with pytest.raises(NonFiniteError, match="real-batch loss or the poster gradient"):
        distiller.step()
    assert torch.equal(distiller.poster, before)  # nothing was applied
    assert torch.isfinite(distiller.real_images).all()  # the data set itself is untouched


@pytest.mark.parametrize("fault, message", [
    ({"kind": "typo"}, "unknown kind 'typo'; one of error, oom, exit, nan"),
    ({"kind": "nan-loss", "step": 0}, "kind 'nan-loss' needs a running distillation")])
def test_fault_plan_refuses_what_it_cannot_do(tmp_path, fault, message):
    plan_file = tmp_path / "faults.json"
    plan_file.write_text(json.dumps([{"trial": "t", "step": 0} | fault]))
    with pytest.raises(ValueError, match=message):
        FaultPlan(str(plan_file)).maybe_fail("t", 0)
