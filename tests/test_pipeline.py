"""The engine end to end on the real 8x8 digits: every method, artifacts, re-evaluation."""

import copy
import json

import pytest
import torch

from podd_engine import TrialConfig, distill
from podd_engine.artifact import ArtifactError, load_artifact
from podd_engine.config import default_class_grid, make_config
from podd_engine.data import create_dataset
from podd_engine.pipeline import build_geometry, evaluate_artifact, save_result


@pytest.fixture(scope="module")
def digits():
    return create_dataset("digits", use_cache=False)


def tiny(**changes) -> TrialConfig:
    base = dict(dataset="digits", ipc=1.0, class_grid="5x2", patch_grid="8x3", order="identity",
                width=8, steps=3, total_inner_steps=4, window=2, distill_batch=12,
                real_batch=64, real_chunk=32, eval_models=2, eval_steps=[10, 20], lr=0.01,
                device="cpu")
    return TrialConfig(**{**base, **changes})


def test_default_class_grid_matches_the_official_grids():
    assert [default_class_grid(n) for n in (10, 100, 200, 7)] == ["5x2", "10x10", "20x10", "7x1"]


def test_geometry_of_each_method(digits):
    podd = build_geometry(tiny(ipc=0.5), digits)
    assert podd.achieved_ipc <= 0.5 and podd.num_patches == 24
    rat = build_geometry(tiny(method="rat-bptt", ipc=2), digits)
    assert rat.poster_size == (2 * 8, 5 * 2 * 8) and rat.patch_grid == (10, 2)
    assert rat.achieved_ipc == 2.0
    # the undistilled control has PoDD's geometry at every IPC: same pixels, same patches
    assert build_geometry(tiny(method="random-real", ipc=0.5), digits) == podd


def test_random_real_is_podds_layout_filled_with_real_images(digits):
    from podd_engine.pipeline import build_trial
    from podd_engine.poster import extract_patches

    whole = build_trial(tiny(method="random-real", patch_grid="5x2", order="random", seed=3),
                        digits)
    patches = extract_patches(whole.poster, whole.geometry)
    labels = whole.labels.patch_labels()
    assert sorted(labels.argmax(1).tolist()) == list(range(10))  # one image per class
    for patch, label in zip(patches, labels.argmax(1)):  # each patch is a real image of its class
        same = (whole.train_images[digits.train_labels == label] == patch).flatten(1).all(1)
        assert same.any()
    # below 1 IPC: PoDD's poster and PoDDL labels, real pixels, nothing distilled
    half = build_trial(tiny(method="random-real", ipc=0.5, order="random", seed=3), digits)
    podd = build_trial(tiny(method="podd", ipc=0.5, order="random", seed=3), digits)
    assert half.geometry == podd.geometry
    assert torch.equal(half.labels.patch_labels(), podd.labels.patch_labels())
    assert half.poster.std() > 5 * podd.poster.std()  # whitened images, not unit-norm noise


@pytest.mark.parametrize("changes", [
    dict(method="podd", labels="fixed", ipc=0.6),
    dict(method="podd", labels="learned", ipc=0.6, unroll="store"),
    dict(method="rat-bptt", labels="learned", ipc=1),
    dict(method="random-real", ipc=1),
])
def test_every_method_runs_and_reports(digits, changes):
    steps_seen = []
    result = distill(tiny(**changes), digits, on_step=lambda m, d: steps_seen.append(m.step))
    summary = result.summary()
    assert summary["method"] == changes["method"]
    assert 0 <= summary["test_accuracy"] <= 1 and summary["eval_models"] == 2
    assert set(summary) >= {"achieved_ipc", "poster_pixels", "label_parameters", "config_key"}
    if changes["method"] == "random-real":
        assert steps_seen == []  # no distillation
    else:
        assert steps_seen == [1, 2, 3]
        assert torch.isfinite(result.poster).all()
    if changes.get("labels") == "learned" and changes["method"] == "rat-bptt":
        assert summary["label_parameters"] == 10 * 10  # per-image labels, n x n


def test_distillation_learns_digits_well_above_chance(digits):
    # A short inner horizon (T=10) needs a larger inner learning rate than the paper's 1e-3.
    config = tiny(ipc=1.0, width=16, steps=60, total_inner_steps=10, window=4, real_batch=256,
                  eval_models=2, eval_steps=[150], patch_grid="10x4", lr=0.01, inner_lr=0.01)
    result = distill(config, digits)
    assert result.evaluation.mean() > 0.45  # chance is 0.1
    losses = [m.loss for m in result.history]
    assert sum(losses[-10:]) < sum(losses[:10]) - 1.0  # the meta-loss goes down


def test_a_trial_resumed_at_an_evaluation_step_redoes_that_evaluation(digits):
    """A checkpoint at an evaluation step is taken before that evaluation, so a trial killed
    between the two never reported it, and a search's early stopping never judged it: the
    resumed trial evaluates again at that step, with the same figures."""
    config = tiny(steps=4, eval_every=2)
    states, evals = {}, []
    # a deep copy: the state holds the live poster, which later steps change in place
    distill(config, digits,
            on_step=lambda m, d: states.setdefault(m.step, copy.deepcopy(d.state_dict())),
            on_eval=lambda step, r: evals.append((step, r.accuracies)), evaluate=False)
    assert [step for step, _ in evals] == [2]
    again = []
    distill(config, digits, resume=states[2], evaluate=False,
            on_eval=lambda step, r: again.append((step, r.accuracies)))
    assert again == evals  # step 2 once more, the same accuracies; none at step 3
    later = []
    distill(config, digits, resume=states[3], evaluate=False,
            on_eval=lambda step, r: later.append(step))
    assert later == []  # step 3 had no evaluation to redo (and 4 is the final one)


@pytest.mark.parametrize("pooling", ["poster", "array"])
def test_artifact_round_trip_and_exact_re_evaluation(digits, tmp_path, pooling):
    result = distill(tiny(labels="learned", ipc=0.6, label_pooling=pooling), digits)
    save_result(result, tmp_path / "art")
    meta = json.loads((tmp_path / "art" / "poster.json").read_text())
    assert meta["label_mode"] == "learned" and meta["embedder"] is None
    assert meta["metrics"]["test_accuracy"] == result.evaluation.mean()
    assert (tmp_path / "art" / "poster.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = load_artifact(tmp_path / "art")
    assert torch.equal(loaded.poster, result.poster.cpu())
    assert torch.equal(loaded.labels.patch_labels(), result.labels.patch_labels().detach())
    again = evaluate_artifact(loaded, device="cpu")
    assert again.accuracies == result.evaluation.accuracies  # seeded: the very same numbers


def test_corrupt_artifact_is_detected(digits, tmp_path):
    save_result(distill(tiny(), digits, evaluate=False), tmp_path / "art")
    data = (tmp_path / "art" / "poster.pt").read_bytes()
    (tmp_path / "art" / "poster.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        load_artifact(tmp_path / "art")
    with pytest.raises(ArtifactError, match="not a poster artifact"):
        load_artifact(tmp_path / "nothing")


def test_an_edited_poster_json_is_refused_and_an_older_unsealed_one_is_checked(digits,
                                                                              tmp_path):
    save_result(distill(tiny(), digits, evaluate=False), tmp_path / "art")
    meta_path = tmp_path / "art" / "poster.json"
    sealed = json.loads(meta_path.read_text())
    edited = {**sealed, "config": {**sealed["config"], "width": 16}}
    meta_path.write_text(json.dumps(edited))
    with pytest.raises(ArtifactError, match="was changed after the distillation wrote it"):
        load_artifact(tmp_path / "art")
    # an artifact from before the seal: loaded, but its settings are still validated
    unsealed = {k: v for k, v in edited.items() if k != "metadata_sha256"}
    meta_path.write_text(json.dumps(unsealed))
    assert load_artifact(tmp_path / "art").config.width == 16
    meta_path.write_text(json.dumps({**unsealed, "config": {**unsealed["config"],
                                                            "ipc": "lots"}}))
    with pytest.raises(ArtifactError, match="holds ipc must be a number"):
        load_artifact(tmp_path / "art")
    meta_path.write_text(json.dumps({k: v for k, v in unsealed.items() if k != "geometry"}))
    with pytest.raises(ArtifactError, match="lacks 'geometry'"):
        load_artifact(tmp_path / "art")


def test_paper_preset_is_chosen_by_data_set_family_not_shape():
    config = make_config("paper", dataset="parquet:/x", data_family="cifar10", ipc=0.9)
    assert (config.patch_grid, config.distill_batch, config.real_batch, config.window,
            config.total_inner_steps, config.labels) == ("16x6", 96, 5000, 60, 200, "fixed")
    # the paper's labels: learned below 0.7 IPC on CIFAR-10 (section 5), unless one is given
    assert [make_config("paper", dataset="cifar10", ipc=ipc).labels
            for ipc in (0.3, 0.6, 0.7, 1.0)] == ["learned", "learned", "fixed", "fixed"]
    assert make_config("paper", dataset="cifar10", ipc=0.5, labels="fixed").labels == "fixed"
    assert make_config("paper", dataset="cifar10", method="rat-bptt").labels == "fixed"
    c100 = make_config("paper", dataset="cifar100", ipc=0.4)
    assert (c100.patch_grid, c100.labels, c100.window, c100.total_inner_steps) == \
        ("20x20", "learned", 100, 300)
    # a 10-class 32x32 copy of no benchmark (SVHN, say) gets no CIFAR-10 preset by its shape
    with pytest.raises(ValueError, match="no paper preset for 'parquet:/svhn'"):
        make_config("paper", dataset="parquet:/svhn", ipc=1)
    with pytest.raises(ValueError, match="no paper preset for 'digits'"):
        make_config("paper", dataset="digits", data_family="digits", ipc=1)


@pytest.mark.parametrize("changes,message", [
    (dict(labels="soft"), "labels must be one of fixed, learned"),
    (dict(method="rat-bptt", ipc=0.5), "ipc 0.5 is not a whole number"),
    (dict(window=9, total_inner_steps=4), r"window \(9\) must not exceed"),
    (dict(steps=0), "steps must be a positive finite number"),
])
def test_bad_settings_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny(**changes).validate()


def test_bf16_distils_and_evaluates_on_the_cpu(digits):
    config = tiny(precision="bf16")
    result = distill(config, digits)
    assert result.poster.dtype == torch.float32  # autocast computes in bf16, keeps fp32 state
    assert torch.isfinite(result.poster).all() and all(m.loss > 0 for m in result.history)
    assert 0 <= result.evaluation.mean() <= 1
    fp32 = distill(tiny(), digits)
    assert not torch.equal(result.poster, fp32.poster)  # bf16 really ran
    from podd_engine.pipeline import build_trial

    start = build_trial(tiny(), digits).poster  # the seeded initial poster of both
    moved_bf16, moved_fp32 = (result.poster - start).flatten(), (fp32.poster - start).flatten()
    # the same distillation up to bf16 rounding: the poster moved the same way
    assert torch.nn.functional.cosine_similarity(moved_bf16, moved_fp32, dim=0) > 0.9
