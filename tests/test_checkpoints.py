"""Trial checkpoints: written atomically with a checksum, read back exactly, corruption and
truncation detected with a message that says what to do."""

import json

import pytest
import torch

from orchestrator.tune import (PROGRESS_FILE, STATE_FILE, FaultPlan, read_checkpoint_state,
                               write_checkpoint)


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


def test_newest_intact_checkpoint_is_found(tmp_path):
    from orchestrator.tune import newest_checkpoint

    assert newest_checkpoint(tmp_path / "missing") is None
    for index, step in ((1, 10), (2, 30), (3, 20)):
        write_checkpoint(tmp_path / f"checkpoint_00000{index}", state() | {"step": step}, step,
                         None)
    damaged = tmp_path / "checkpoint_000002" / STATE_FILE  # the newest (30) is damaged
    damaged.write_bytes(damaged.read_bytes()[:100])
    (tmp_path / "checkpoint_000004").mkdir()  # half-copied: no progress.json
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint_000003"
    final = tmp_path / "checkpoint_000005"
    write_checkpoint(final, None, 20, None)
    (final / "artifact").mkdir()
    (final / "artifact" / "poster.json").write_text("{}")
    assert newest_checkpoint(tmp_path) == final
