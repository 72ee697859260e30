"""A schedule's verdict depends on its own runs only: permuting the store, duplicating runs of
another schedule or adding some never changes it (hypothesis, on run records shaped as the
recorder writes them)."""

import dataclasses
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.report import build_report
from orchestrator.runs import gathered_from
from orchestrator.store import KEY_TAG, SWEEP_TAG, RunRecord
from podd_engine.config import TrialConfig

_ids = itertools.count()


def record(method: str, ipc: float, seed: int, accuracy: float, steps: int,
           patch_grid: str = "16x6") -> RunRecord:
    config = TrialConfig(dataset="parquet:/data/cifar10", method=method, ipc=ipc, seed=seed,
                         steps=steps, patch_grid=patch_grid).canonical()
    params = {k: (v if isinstance(v, str) else str(v).replace("'", '"'))
              for k, v in config.to_dict().items() if v is not None}
    params.update(dataset_family="cifar10", achieved_ipc=str(ipc), num_classes="10",
                  channels="3", image_size="32x32", poster_pixels=str(int(ipc * 10240)),
                  label_parameters="0")
    run_id = f"r{next(_ids):06d}"
    return RunRecord(run_id, run_id, "FINISHED", params,
                     {"test_accuracy": accuracy, "test_accuracy_std": 0.01},
                     {SWEEP_TAG: f"s{steps}", KEY_TAG: config.key()})


accuracy = st.floats(0.1, 0.9, allow_nan=False)
IPCS = (0.3, 0.5, 0.8, 1.0)


@st.composite
def schedule_runs(draw, steps: int):
    runs = [record("rat-bptt", 1.0, seed, draw(accuracy), steps)
            for seed in range(draw(st.integers(0, 3)))]
    for ipc in draw(st.lists(st.sampled_from(IPCS), min_size=1, max_size=3, unique=True)):
        grid = draw(st.sampled_from(["16x6", "8x3"]))
        runs += [record("podd", ipc, seed, draw(accuracy), steps, grid)
                 for seed in range(draw(st.integers(1, 3)))]
    return runs


def verdict_of(runs, steps):
    report = build_report(gathered_from(runs), "cifar10")
    (mine,) = [s for s in report.schedules if s.schedule.get("steps") == str(steps)]
    verdict = dataclasses.asdict(mine.verdict)
    # the message names the schedule only when the store holds others
    verdict["message"] = verdict["message"].replace(f" [{mine.label}]", "").replace(
        f" ({mine.label})", "")
    return verdict, mine.baseline


@settings(max_examples=40, deadline=None)
@given(mine=schedule_runs(300), others=schedule_runs(120), data=st.data())
def test_other_schedules_never_change_a_verdict(mine, others, data):
    alone = verdict_of(mine, 300)
    permuted = data.draw(st.permutations(mine + others))
    assert verdict_of(permuted, 300) == alone
    copies = [dataclasses.replace(r, run_id=r.run_id + "-copy") for r in
              data.draw(st.lists(st.sampled_from(others), max_size=6))] if others else []
    assert verdict_of(mine + others + copies, 300) == alone
