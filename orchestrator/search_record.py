"""How a search is recorded and said: its progress as one tag of the sweep's parent run (which
`status` and `report` read back), and in words."""

from __future__ import annotations

import json

from orchestrator.search import ANSWER_NONE, ANSWER_PASS, NO_BASELINE, RUNNING


TAG_LIMIT = 8000  # MLflow's longest tag value


def compact(search: dict) -> dict:
    """One search's summary (`Plan.summary()` with its label) in the form the parent run's tag
    keeps: probes as [IPC, decision, mean accuracy, finished runs, runs stopped early]."""
    return ({k: search.get(k) for k in ("label", "dataset", "state", "done", "answer", "bracket",
                                        "trials_run", "trials_in_grid", "notes")}
            | {"probes": [[p["ipc"], p["state"], p["accuracy"], p["runs"], p["stopped_early"]]
                          for p in search["probes"]]})


def progress_tag(summary: dict) -> str:
    """The searcher's summary as one tag value (each search compacted; its probes and all but
    the first note dropped when it would not fit: the full summary is the parent run's
    search.json)."""
    searches = [compact(s) for s in summary["searches"]]
    text = json.dumps({"criterion": summary["criterion"], "searches": searches})
    if len(text) > TAG_LIMIT:
        for s in searches:
            s["probes"], s["notes"] = [], s["notes"][:1]
        text = json.dumps({"criterion": summary["criterion"], "searches": searches})
    if len(text) > TAG_LIMIT:
        text = json.dumps({"criterion": summary["criterion"], "searches": [],
                           "truncated": True})
    return text


_WORD = {"beats": "beats", "comparable": "is comparable to",
         "significant": "beats (its whole 95 % interval above zero)"}


def describe(search: dict, criterion: str = "beats") -> list[str]:
    """A compacted search (`compact`) in words: its answer or open bracket, each probe, its
    notes and what it saved against the grid."""
    label, state = search["label"], search["state"]
    probes = sorted(search["probes"])
    low, high = search["bracket"]
    if state == ANSWER_PASS:
        below = f" ({low:g} IPC fails below it)" if low is not None else \
            " (it is the lowest IPC searched)"
        head = (f"{search['answer']:g} IPC is the lowest at which the poster "
                f"{_WORD.get(criterion, criterion)} the baseline{below}")
    elif state == ANSWER_NONE:
        head = "no IPC passes" + (f": the highest, {high or low:g} IPC, fails" if low is not None
                                  else "")
    elif state == NO_BASELINE:
        head = "no answer: every baseline trial failed"
    elif low is None and high is None:
        head = "open: nothing decided yet"
    elif low is None:
        head = f"open: the answer is {high:g} IPC or below"
    elif high is None:
        head = f"open: the answer is above {low:g} IPC"
    else:
        head = f"open: the answer is above {low:g} and at most {high:g} IPC"
    lines = [f"{label}: {head}"]
    for ipc, decision, accuracy, runs, stopped in probes:
        measured = "" if accuracy is None else f" {100 * accuracy:.2f} % over {runs} run(s)"
        if stopped:
            measured += f"{',' if measured else ''} {stopped} run(s) stopped early"
        shown = "deciding" if decision == RUNNING else decision
        lines.append(f"  {ipc:g} IPC: {shown}{measured}")
    lines += [f"  note: {note}" for note in search["notes"]]
    run, grid = search["trials_run"], search["trials_in_grid"]
    lines.append(f"  {run} of the grid's {grid} trials run"
                 + (f" ({grid - run} not needed)" if search["done"] else " so far"))
    return lines
