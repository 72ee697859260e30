"""PoDD engine: Poster Dataset Distillation in pure PyTorch (no Ray, MLflow or CLI code).

    from podd_engine import TrialConfig, distill, make_config
    config = make_config("cpu-small", dataset="parquet:../shared/datasets/cifar10-jpeg", ipc=0.5)
    result = distill(config)
    print(result.summary())
"""

from podd_engine.config import TrialConfig, make_config
from podd_engine.data import create_dataset
from podd_engine.pipeline import DistillResult, build_trial, distill, evaluate_poster

__all__ = ["TrialConfig", "make_config", "create_dataset", "distill", "build_trial",
           "evaluate_poster", "DistillResult"]
