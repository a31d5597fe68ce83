"""Fourth red-team round: ways in which a printed epsilon did not hold for the training that ran,
against the round-3 fixes (6fd0c89: ModuleIntegrity's bit-for-bit copy checked at the start of
each DP step and re-taken after it; post-crop fingerprint through ``_held``).

The reference is re-taken after *every* non-skipped DP step, so whatever changes the model
*inside* ``optimizer.step()`` after the check at its start is absorbed as if it were the DP
update.  And the reference covers the model only: the optimizer's state, hooks and the
``.grad`` of frozen parameters it holds are free to carry un-noised information into the next
DP update.

Every test asserts the *safe* behaviour (an error, or the property the printed claim needs) and
fails on the code it was written against.  Tiny models and data, seconds each.
"""

import numpy as np
import pytest
import torch
from attack_helpers import CROP, REGION, SAFE_ERRORS, SIZE, post_crop_refused
from attack_helpers import Prototypes as _FrozenHead
from attack_helpers import make_private as _private
from attack_helpers import read_claim as _claim
from plugin_helpers import TinySegNet, per_image_ce
from torch.utils.data import DataLoader, TensorDataset


def _plain_grads(model, x, y):
    """The un-clipped, un-noised gradient of the private batch (a second, ordinary model)."""
    twin = TinySegNet()
    twin.load_state_dict(model.state_dict())
    per_image_ce()(twin(x), y).backward()
    return [p.grad.detach().clone() for p in twin.parameters()]


# --- finding 1: a closure passed to step() runs after the check, before the re-take ------------
@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_a_model_change_inside_the_step_closure_is_refused(mode):
    """``optimizer.step(closure)``: Opacus' ``DPOptimizer.step`` calls the closure first, then
    ``pre_step`` and the original step.  ``LogicalBatchGuard.step`` checks the model *before*
    ``super().step(closure)`` and re-takes the reference *after* it, so anything the closure
    writes is absorbed as the DP update.  A loop that adds the un-noised, unclipped gradient of
    the batch in the closure (or writes prototypes there, round 3's attack moved one line)
    trains non-privately; get_epsilon, privacy_report and save_checkpoint accept it and print
    5.31.  Fix: run the closure (if any) before check_unchanged, i.e. call it in the guard and
    pass closure=None on; or compare after ``pre_step`` with the expected update."""
    torch.manual_seed(0)
    model = TinySegNet()
    engine, (dp_model, opt, loader) = _private(model, mode=mode)
    moved = 0.0
    try:
        for x, y in loader:
            opt.zero_grad()
            per_image_ce()(dp_model(x), y).backward()
            plain = _plain_grads(model, x, y)

            def closure():
                nonlocal moved
                with torch.no_grad():
                    for p, g in zip(model.parameters(), plain):
                        p.sub_(0.1 * g)                  # the non-private SGD update
                        moved += float(g.norm())

            opt.step(closure)
        eps = _claim(engine)
    except SAFE_ERRORS:
        return  # refused: safe
    assert moved == 0.0, f"un-noised gradients were applied in step(closure); epsilon {eps:.3g}"


# --- finding 2: the optimizer's state is not part of the reference --------------------------
@pytest.mark.parametrize("kind", ["sgd_momentum", "adam"])
def test_optimizer_state_written_outside_the_dp_step_is_refused(kind):
    """The reference is the model's parameters and buffers; the DP optimizer's *state*
    (SGD's ``momentum_buffer``, Adam's ``exp_avg``/``exp_avg_sq``) is neither compared nor
    re-taken.  A loop that writes the un-noised gradient of the private batch into the
    momentum buffer (or loads it from a non-private "warm start" run with
    ``opt.load_state_dict``) leaves every parameter bit-identical until the next DP step,
    which then applies the buffer as part of the "DP update": ``p -= lr * (noisy_grad +
    momentum * plain_grad)`` (Adam: ``exp_avg`` drives the update direction).  The step's
    check passes, the reference is re-taken, get_epsilon prints 5.31.  Fix: keep a copy of
    ``optimizer.state`` (tensors bit for bit, like the model) in the reference, re-taken after
    each DP step, compared with the model at every check."""
    torch.manual_seed(0)
    model = TinySegNet()
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9) if kind == "sgd_momentum" \
        else torch.optim.Adam(params, lr=0.01)
    engine, (dp_model, opt, loader) = _private(model, optimizer=base)
    planted = 0
    try:
        for i, (x, y) in enumerate(loader):
            opt.zero_grad()
            per_image_ce()(dp_model(x), y).backward()
            if i > 0:  # after the first step the state exists; overwrite it, model untouched
                for p, g in zip(params, _plain_grads(model, x, y)):
                    state = opt.state[p]
                    key = "momentum_buffer" if kind == "sgd_momentum" else "exp_avg"
                    state[key].copy_(1e3 * g)     # the private, un-noised gradient
                    planted += 1
            opt.step()
        eps = _claim(engine)
    except SAFE_ERRORS:
        return  # refused: safe
    assert planted == 0, f"un-noised gradients rode the optimizer state; epsilon {eps:.3g}"


# --- finding 3: a frozen parameter held by the optimizer is stepped with any .grad ---------------
def test_a_grad_set_on_a_frozen_parameter_of_the_optimizer_is_refused():
    """Opacus clips and noises only ``optimizer.params`` (those with ``requires_grad``); the
    original optimizer's ``step`` updates every parameter of its groups whose ``.grad`` is
    not None -- also a frozen one.  make_private accepts frozen parameters in the optimizer
    (only trainable ones outside it are refused).  A loop that sets
    ``model.prototypes.grad = -(private class means)`` before ``opt.step()`` gets them
    written by the DP step itself (``p -= lr * grad``), after the check at its start and before
    the reference is re-taken: the private class means are in state_dict() without noise, and
    get_epsilon prints 5.31.  Fix: refuse a ``.grad`` on any parameter of the optimizer's groups
    that is not in ``optimizer.params`` (or drop frozen parameters from the groups at
    make_private)."""
    torch.manual_seed(0)
    model = _FrozenHead()
    engine, (dp_model, opt, loader) = _private(
        model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
    try:
        for x, y in loader:
            opt.zero_grad()
            logits = dp_model(x)
            per_image_ce()(logits, y).backward()
            feats = logits.detach().permute(0, 2, 3, 1).reshape(-1, 3)
            labels = y.reshape(-1)
            means = torch.stack([feats[labels == c].mean(0) if (labels == c).any()
                                 else torch.zeros(3) for c in range(3)])
            model.prototypes.grad = model.prototypes.detach() - means   # p - lr*g = means
            opt.step()
        eps = _claim(engine)
    except SAFE_ERRORS:
        return  # refused: safe
    assert float(model.prototypes.abs().sum()) == 0, \
        f"private class means written by the DP step itself; epsilon {eps:.3g}"


# --- finding 4: hooks of the original optimizer run inside the DP step ------------------------
def test_a_step_hook_of_the_original_optimizer_cannot_change_the_model_unchecked():
    """``torch.optim.Optimizer.register_step_post_hook`` on the optimizer given to make_private
    (or torch's global ``register_optimizer_step_post_hook``) runs inside
    ``original_optimizer.step()``, i.e. inside the DP step, after its check and before the
    reference is re-taken.  A hook that adds the batch's un-noised gradient (kept by the loop)
    to the weights trains non-privately while get_epsilon prints 5.31.  Fix: the same as for
    the closure -- the reference must only absorb the DP update, e.g. compare the model after
    the step with ``before - update`` computed from the noised ``.grad``, or refuse optimizers
    with step hooks at make_private and at each step (``_optimizer_step_pre_hooks``/
    ``_optimizer_step_post_hooks``, torch.optim.optimizer's global dicts)."""
    torch.manual_seed(0)
    model = TinySegNet()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, (dp_model, opt, loader) = _private(model, optimizer=base)
    pending: list = []
    applied = []

    def post_hook(optimizer, args, kwargs):
        with torch.no_grad():
            for p, g in zip(model.parameters(), pending):
                p.sub_(0.1 * g)
                applied.append(1)
        pending.clear()

    handle = base.register_step_post_hook(post_hook)
    try:
        for x, y in loader:
            opt.zero_grad()
            per_image_ce()(dp_model(x), y).backward()
            pending[:] = _plain_grads(model, x, y)
            opt.step()
        eps = _claim(engine)
    except SAFE_ERRORS:
        return  # refused: safe
    finally:
        handle.remove()
    assert not applied, f"un-noised updates applied by a step hook; epsilon {eps:.3g}"


# --- finding 5: a post-crop stage keeping its state in a module global -----------------------
_RUNNING = {"sum": 0.0, "n": 0}   # the attack: a running mean at module level


def _normalise_by_running_mean(sample):
    """A post-crop "normalisation" by the running mean of the crops seen so far."""
    image, mask = sample
    _RUNNING["sum"] += float(image.float().mean())
    _RUNNING["n"] += 1
    return image.float() - _RUNNING["sum"] / _RUNNING["n"], mask


def test_a_post_crop_stage_with_state_in_a_module_global_is_refused():
    """``post_crop_state`` walks what ``_held`` reaches from the stage: closure cells,
    defaults, ``__self__``, attributes, class attributes -- not the function's
    ``__globals__``.  A plain function that keeps a running mean (or a cache of earlier crops)
    in a module-level dict passes the fingerprint: each sample is shifted by the mean of all
    earlier crops, including crops that covered other images' private regions, so one image's
    private region changes every later sample (sensitivity unbounded in the number of later
    samples) -- the exact pattern test_records.py refuses when the dict is an attribute or a
    default argument.  (The project's own test_gaussian_augmentation probe relies on this
    hole.)  Fix: in ``_held`` of a function, yield the globals its code names
    (``co_names`` of the code and nested code objects) that are data (dicts, lists, arrays,
    tensors, user objects), skipping modules, functions and classes."""
    _RUNNING.update(sum=0.0, n=0)
    if post_crop_refused(_normalise_by_running_mean):
        return  # refused: safe
    assert _RUNNING["n"] <= 1, \
        f"the post-crop stage carried a running mean over {_RUNNING['n']} crops"


# --- controls: the legitimate versions run ---------------------------------------------------
def test_controls_momentum_adam_frozen_params_closure_and_pure_post_crop_functions():
    """The plain DP loop with SGD+momentum (the CLI's optimizer), Adam, a frozen parameter in
    the optimizer without a .grad, an honest closure that only recomputes the loss, and a pure
    module-level post-crop function all run and report epsilon."""
    from patchdp_opacus.plugin.loader import CropDPDataLoader

    for make in (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                 lambda m: torch.optim.Adam(m.parameters(), lr=0.01)):
        torch.manual_seed(0)
        model = TinySegNet()
        engine, (dp_model, opt, loader) = _private(model, optimizer=make(model))
        for x, y in loader:
            opt.zero_grad()
            per_image_ce()(dp_model(x), y).backward()
            opt.step()
        assert _claim(engine) > 0
    model = _FrozenHead()
    engine, (dp_model, opt, loader) = _private(
        model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    for x, y in loader:
        def closure():
            opt.zero_grad()
            loss = per_image_ce()(dp_model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    assert _claim(engine) > 0 and len(engine.accountant) == len(loader)

    def pure(sample):
        return sample[0].float() / 255.0, sample[1]

    data = TensorDataset(torch.randint(0, 256, (12, 3, *SIZE), dtype=torch.uint8),
                         torch.randint(0, 3, (12, *SIZE)))
    loader = CropDPDataLoader.from_data_loader(
        DataLoader(data, batch_size=4), crop=CROP, private_region=REGION, image_sizes=[SIZE],
        post_crop_transform=pure)
    assert sum(len(b[0]) for b in loader) == 12
    assert np.isfinite(float(next(iter(loader))[0].mean()))
