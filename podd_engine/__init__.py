"""PoDD engine: Poster Dataset Distillation in pure PyTorch (no Ray, MLflow or CLI code).

    from podd_engine import TrialConfig, distill, make_config
    config = make_config("cpu-small", dataset="parquet:../shared/datasets/cifar10-jpeg", ipc=0.5)
    result = distill(config)
    print(result.summary())
"""

import importlib

# name -> module; imported on first use, so that `import podd_engine.fileio` (or the CLI's
# report, which needs no torch) does not pay for torch
_EXPORTS = {"TrialConfig": "config", "make_config": "config", "create_dataset": "data",
            "distill": "pipeline", "build_trial": "pipeline", "evaluate_poster": "pipeline",
            "DistillResult": "pipeline"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"podd_engine.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'podd_engine' has no attribute {name!r}")
