from pathlib import Path

import pytest

SHARED_CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpeg"


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    """Every test gets its own cache and data root, never the user's ~/.cache."""
    monkeypatch.setenv("PODD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PODD_DATA_ROOT", str(tmp_path / "data"))
    return tmp_path


@pytest.fixture(scope="session")
def shared_cifar10() -> Path:
    if not (SHARED_CIFAR10 / "train.parquet").exists():
        pytest.skip(f"the shared CIFAR-10 Parquet is not at {SHARED_CIFAR10}")
    return SHARED_CIFAR10


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs) for every test of the session that runs real sweeps.

    address="local" starts a private instance even when a Ray cluster already runs on this
    machine (a user's `ray start --head`): plain ray.init() would try to join that one, and
    joining refuses num_cpus.
    """
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
