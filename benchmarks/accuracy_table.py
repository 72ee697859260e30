"""Markdown table (mean +- std over seeds) of the JSON summaries written by run_accuracy.sh.

    python benchmarks/accuracy_table.py runs/accuracy
"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def main(folder: str) -> None:
    groups = defaultdict(list)
    for path in sorted(Path(folder).glob("*.json")):
        s = json.loads(path.read_text())
        groups[(s["method"], s["requested_ipc"], s["label_mode"])].append(s)
    print("| method | labels | IPC (achieved) | test accuracy % (mean +- std over seeds) | seeds "
          "| per-seed (mean over eval models) |")
    print("|---|---|---|---|---|---|")
    for (method, ipc, labels), runs in sorted(groups.items(),
                                              key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])):
        accs = [100 * r["test_accuracy"] for r in runs]
        if len(accs) > 1:
            spread = f"{statistics.fmean(accs):.2f} +- {statistics.stdev(accs):.2f}"
        else:  # one seed: the spread over its evaluation networks is all there is
            spread = (f"{accs[0]:.2f} (+- {100 * runs[0]['test_accuracy_std']:.2f} over "
                      f"{runs[0]['eval_models']} eval models)")
        print(f"| {method} | {labels} | {ipc:g} ({runs[0]['achieved_ipc']:.3f}) | {spread} | "
              f"{len(runs)} | "
              f"{', '.join(f'{a:.2f}' for a in accs)} |")


if __name__ == "__main__":
    main(sys.argv[1])
