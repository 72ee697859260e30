"""RaT-BPTT: the functional inner loop's meta-gradient against independent references."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from podd_engine.data import create_dataset
from podd_engine.inner import AdamState, InnerSchedule, SyntheticSet, adam_update
from podd_engine.rat_bptt import Distiller, OuterSettings, draw_plan, meta_gradient
from podd_engine.labels import create_labels
from podd_engine.models import ConvNet, reinitialize
from podd_engine.poster import PosterGeometry, init_poster
from podd_engine.preprocess import apply_augmentation, standardize_per_image


@pytest.fixture(scope="module")
def digits():
    return create_dataset("digits", use_cache=False)


def tiny_problem(digits, mode, dtype=torch.float64, seed=0):
    geometry = PosterGeometry.for_ipc(0.6, channels=1, image_size=(8, 8), num_classes=10,
                                      class_grid=(5, 2), patch_grid=(6, 3))
    order = torch.tensor([[3, 1, 4, 0, 5], [9, 2, 6, 8, 7]])
    labels = create_labels(mode, geometry, order)
    labels.array = labels.array.to(dtype)
    generator = torch.Generator().manual_seed(seed)
    model = ConvNet(1, 10, (8, 8), width=4, depth=2).to(dtype)
    reinitialize(model, generator)
    poster = init_poster(geometry, "gaussian", generator).to(dtype)
    real_x = standardize_per_image(digits.train_images[:40]).to(dtype) * 8
    real_y = digits.train_labels[:40]
    return geometry, order, labels, model, poster, real_x, real_y, generator


def reference_meta_gradient(model, geometry, labels, poster, real_x, real_y, plan, schedule):
    """Plain autograd, written independently: loop-sliced patches, interpolate-based learned
    labels, textbook Adam, the full graph kept and one backward() at the end."""
    h, w = geometry.image_size
    b1, b2 = schedule.betas
    poster = poster.detach().clone().requires_grad_(True)
    label_param = labels.array.detach().clone().requires_grad_(labels.mode == "learned")

    def patches(p, indices):
        return torch.stack([p[:, y:y + h, x:x + w] for y, x in
                            geometry.patch_positions[indices].tolist()])

    def patch_labels(indices):
        if labels.mode == "fixed":
            return label_param[indices]
        cols, rows = labels.label_grid
        y = label_param.T.reshape(1, -1, rows, cols)
        y = F.interpolate(y, size=geometry.poster_size, mode="nearest")[0]
        windows = torch.stack([y[:, t:t + h, l:l + w].mean(dim=(1, 2)) for t, l in
                               geometry.patch_positions[indices].tolist()])
        return windows / windows.sum(dim=1, keepdim=True)

    params = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    for t, inner in enumerate(plan.curriculum + plan.window, start=1):
        differentiable = t > len(plan.curriculum)
        source = poster if differentiable else poster.detach()
        targets = patch_labels(inner.indices) if differentiable else patch_labels(inner.indices).detach()
        x = apply_augmentation(patches(source, inner.indices), inner.augmentation)
        logits = functional_call(model, params, (x,))
        loss = -(targets * F.log_softmax(logits, 1)).sum(1).mean()
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=differentiable)
        new = {}
        for (k, p), g in zip(params.items(), grads):
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g ** 2
            m_hat, v_hat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
            new[k] = p - schedule.lr * m_hat / (v_hat.sqrt() + schedule.eps)
        if not differentiable:
            new = {k: p.detach().requires_grad_(True) for k, p in new.items()}
            m = {k: t_.detach() for k, t_ in m.items()}
            v = {k: t_.detach() for k, t_ in v.items()}
        params = new
    logits = functional_call(model, params, (apply_augmentation(real_x, plan.real_augmentation),))
    F.cross_entropy(logits, real_y).backward()
    return poster.grad, label_param.grad


SCHEDULE = InnerSchedule(total_steps=6, window=3, batch_size=7, lr=0.01)


@pytest.mark.parametrize("mode", ["fixed", "learned"])
def test_meta_gradient_equals_plain_autograd_reference(digits, mode):
    geometry, order, labels, model, poster, real_x, real_y, gen = tiny_problem(digits, mode)
    synthetic = SyntheticSet(geometry, labels)
    plan = draw_plan(geometry.num_patches, len(real_x), SCHEDULE, gen, curriculum_start=2)
    ref_poster, ref_labels = reference_meta_gradient(model, geometry, labels, poster, real_x,
                                                     real_y, plan, SCHEDULE)
    assert ref_poster.abs().max() > 0
    results = {}
    for unroll in ("store", "recompute"):
        results[unroll] = meta_gradient(model, AdamState.fresh(model), synthetic, poster,
                                        labels.array, real_x, real_y, SCHEDULE, plan,
                                        unroll=unroll, real_chunk=13,
                                        learn_labels=mode == "learned")
        # float64; differences are rounding in another order of operations (relative to scale)
        scale = float(ref_poster.abs().max())
        torch.testing.assert_close(results[unroll].poster, ref_poster, rtol=1e-5,
                                   atol=1e-7 * scale)
        if mode == "learned":
            assert ref_labels.abs().max() > 0
            torch.testing.assert_close(results[unroll].label_array, ref_labels, rtol=1e-5,
                                       atol=1e-7 * float(ref_labels.abs().max()))
    # the two unroll modes run the same operations: they agree far more tightly
    torch.testing.assert_close(results["store"].poster, results["recompute"].poster,
                               rtol=1e-9, atol=1e-12 * float(ref_poster.abs().max()))


def test_meta_gradient_matches_finite_differences(digits):
    geometry, order, labels, model, poster, real_x, real_y, gen = tiny_problem(digits, "fixed")
    synthetic = SyntheticSet(geometry, labels)
    # With no curriculum steps the truncated (RaT-BPTT) gradient is the full derivative.
    plan = draw_plan(geometry.num_patches, len(real_x), SCHEDULE, gen, curriculum_start=0)

    def run(p):
        return meta_gradient(model, AdamState.fresh(model), synthetic, p, labels.array, real_x,
                             real_y, SCHEDULE, plan, unroll="recompute")

    grad = run(poster).poster
    covered = grad.abs().flatten().topk(3).indices  # pixels with a clear gradient
    eps = 1e-6
    for flat in covered.tolist():
        bump = torch.zeros_like(poster).flatten()
        bump[flat] = eps
        bump = bump.view_as(poster)
        numeric = (run(poster + bump).real_loss - run(poster - bump).real_loss) / (2 * eps)
        assert numeric == pytest.approx(float(grad.flatten()[flat]), rel=1e-4)


def test_gradient_reaches_only_pixels_the_inner_batches_used(digits):
    geometry, order, labels, model, poster, real_x, real_y, gen = tiny_problem(digits, "fixed")
    schedule = InnerSchedule(total_steps=2, window=2, batch_size=2, augmentation="none")
    plan = draw_plan(geometry.num_patches, len(real_x), schedule, gen, curriculum_start=0)
    result = meta_gradient(model, AdamState.fresh(model), SyntheticSet(geometry, labels), poster,
                           labels.array, real_x, real_y, schedule, plan)
    used = torch.zeros(geometry.poster_size, dtype=torch.bool)
    for inner in plan.window:
        for y, x in geometry.patch_positions[inner.indices].tolist():
            used[y:y + 8, x:x + 8] = True
    touched = result.poster.abs().sum(0) > 0
    assert torch.equal(touched, used)


def test_adam_update_matches_torch_optim_and_survives_zero_gradients():
    torch.manual_seed(0)
    start = torch.randn(5, dtype=torch.float64)
    reference = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([reference], lr=0.1)
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([0.0, 1, 1, 1, 1], dtype=torch.float64)  # entry 0 never gets a gradient
    state = AdamState({"p": start.clone()}, {"p": torch.zeros(5, dtype=torch.float64)},
                      {"p": torch.zeros(5, dtype=torch.float64)})
    for i in range(3):
        g = x * mask * (i + 1)
        reference.grad = g.detach().clone()
        optimizer.step()
        state = adam_update(state, {"p": g}, 0.1, (0.9, 0.999), 1e-8)
    torch.testing.assert_close(state.params["p"].detach(), reference.detach())
    (dx,) = torch.autograd.grad(state.params["p"].sum(), x)
    assert torch.isfinite(dx).all()  # sqrt(0) must not poison the meta-gradient with NaN
    assert dx[0] == 0 and (dx[1:] != 0).all()


def make_distiller(digits, seed, mode="learned", **outer):
    geometry, order, labels, model, poster, real_x, real_y, _ = tiny_problem(
        digits, mode, dtype=torch.float32, seed=0)
    return Distiller(model, SyntheticSet(geometry, labels), poster, real_x, real_y,
                     InnerSchedule(total_steps=4, window=2, batch_size=6),
                     OuterSettings(**{"lr": 0.01, "real_batch": 16, "real_chunk": 8, **outer}),
                     torch.Generator().manual_seed(seed))


def test_curriculum_start_per_epoch_is_shared_by_the_epochs_steps(digits):
    per_epoch = make_distiller(digits, 3, curriculum="epoch", real_batch=10, real_chunk=10)
    steps_per_epoch = len(per_epoch.real_images) // 10
    starts = []
    per_epoch.run(3 * steps_per_epoch, on_step=lambda m: starts.append(m.curriculum_start))
    epochs = [set(starts[i:i + steps_per_epoch]) for i in range(0, len(starts), steps_per_epoch)]
    assert all(len(e) == 1 for e in epochs)  # one start per epoch (the official code)
    per_step = make_distiller(digits, 3, real_batch=10, real_chunk=10)
    drawn = []
    per_step.run(steps_per_epoch, on_step=lambda m: drawn.append(m.curriculum_start))
    assert len(set(drawn)) > 1  # the default: a fresh start every outer step
    # a checkpoint mid-epoch resumes with the epoch's start
    a = make_distiller(digits, 3, curriculum="epoch", real_batch=10, real_chunk=10)
    a.run(steps_per_epoch // 2)
    b = make_distiller(digits, 4, curriculum="epoch", real_batch=10, real_chunk=10)
    b.load_state_dict(a.state_dict())
    resumed = []
    b.run(steps_per_epoch, on_step=lambda m: resumed.append(m.curriculum_start))
    assert resumed == starts[steps_per_epoch // 2:steps_per_epoch]


def test_adding_a_late_setting_keeps_every_earlier_key():
    from podd_engine.config import TrialConfig

    # the keys of trials recorded before `curriculum` existed (sweeps in users' stores)
    assert TrialConfig().key() == "32354577e3de"
    assert TrialConfig(curriculum="epoch").key() != TrialConfig().key()


def test_distiller_is_seeded_and_resumes_exactly(digits):
    a, b = make_distiller(digits, 1), make_distiller(digits, 1)
    a.run(3)
    b.run(2)
    checkpoint = b.state_dict()
    c = make_distiller(digits, 99)  # other seed: the checkpoint must restore everything
    c.load_state_dict(checkpoint)
    c.run(3)
    assert torch.equal(a.poster, c.poster)
    assert torch.equal(a.synthetic.labels.array, c.synthetic.labels.array)
    assert (a.synthetic.labels.array >= 0).all()
    d, e = make_distiller(digits, 2), make_distiller(digits, 1)
    d.run(1)
    e.run(1)
    assert not torch.equal(d.poster, e.poster)  # another seed, another step


def test_poster_gradient_is_clipped_to_twice_its_norm_ema():
    from podd_engine.rat_bptt import clip_to_ema

    g = torch.full((4,), 0.5)  # norm 1
    clipped, ema = clip_to_ema(g, None)
    assert ema == pytest.approx(1.0) and torch.equal(clipped, g)  # first norm starts the EMA
    spike = torch.full((4,), 50.0)  # norm 100
    clipped, ema = clip_to_ema(spike, ema)
    assert ema == pytest.approx(0.9 * 1 + 0.1 * 100)
    assert float(clipped.norm()) == pytest.approx(2 * ema, rel=1e-6)  # clipped to 2 x EMA
    assert torch.allclose(clipped / clipped.norm(), spike / spike.norm())  # direction kept
    small, ema2 = clip_to_ema(g, ema)
    assert torch.equal(small, g)  # below the limit: untouched
