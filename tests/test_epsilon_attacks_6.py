"""Sixth red-team round: ways in which a printed epsilon did not hold for the training that ran,
against the round-5 fixes (a93e306: model check at the end of pre_step, step_hook property,
replaced inner step refused unless torch's scheduler wrapper, ghost .grad snapshot, deep
post-crop fingerprint).

Every test asserts the *safe* behaviour (an error, or the property the printed claim needs) and
fails on the code it was written against.  Tiny models and data, seconds each.
"""

import functools
import sys
import types

import pytest
import torch
from attack_helpers import (
    assert_one_step_is_honest,
    make_private,
    post_crop_refused,
)
from attack_helpers import read_claim as _claim
from plugin_helpers import TinySegNet, per_image_ce


def _setup(mode="hooks", optimizer=None):
    """``(engine, model, dp_model, opt, criterion, loader)``."""
    torch.manual_seed(0)
    model = TinySegNet()
    if optimizer is not None:
        optimizer = optimizer(model)
    engine, out = make_private(model, lr=1.0, mode=mode, optimizer=optimizer)
    if mode == "ghost":
        dp_model, opt, crit, loader = out
    else:
        (dp_model, opt, loader), crit = out, per_image_ce()
    return engine, model, dp_model, opt, crit, loader


# --- finding 1: the step hook rewrites the noised .grad, not the model ----------------------
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_step_hook_cannot_rewrite_the_noised_gradient(mode):
    """The user's step hook (attach_step_hook, run after the accountant's) runs inside
    ``pre_step`` after ``add_noise``/``scale_grad``; the round-5 check at the end of pre_step
    compares params, buffers and optimizer state, but not ``p.grad`` -- which is what the inner
    step applies next.  A hook that overwrites ``p.grad`` (here with 1e4; an un-noised
    gradient stashed from the backward alike) leaves the model untouched until the inner step,
    which applies it and is absorbed as the DP update.  Fix: snapshot the noised ``p.grad``
    right after ``scale_grad`` (before any step hook) and compare bit for bit at the end of
    pre_step, or run the user's hook only after the inner step."""
    engine, model, dp_model, opt, crit, loader = _setup(mode)

    def hook(o):
        for p in o.params:
            if p.grad is not None:
                p.grad.fill_(1e4)

    opt.attach_step_hook(hook)
    assert_one_step_is_honest(engine, model, dp_model, opt, loader, "a step hook on .grad",
                              crit=crit)


# --- finding 2: the scheduler exception is a name check -------------------------------------
def test_a_replaced_inner_step_dressed_as_the_scheduler_wrapper_is_refused():
    """``_check_only_dp_updates`` allows an instance ``step`` whose ``__wrapped__`` is the
    class's step (torch's LR-scheduler counter).  ``functools.wraps(type(base).step)`` on any
    function sets exactly that: the round-5 attack (``base.step = evil``) passes again.  Fix:
    accept only torch's wrapper itself (``_wrapped_by_lr_sched`` and its code object is
    ``torch.optim.lr_scheduler``'s), or better compare the parameters after the inner step
    with the update recomputed from the noised ``.grad`` / check again after the step."""
    engine, model, dp_model, opt, crit, loader = _setup()
    base = opt.original_optimizer

    @functools.wraps(type(base).step)
    def evil(*args, **kwargs):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e4)
        return type(base).step(base, *args, **kwargs)

    base.step = evil
    assert_one_step_is_honest(engine, model, dp_model, opt, loader,
                              "a wraps()-dressed inner step", crit=crit)


def test_a_patched_optimizer_class_step_is_refused():
    """The replaced-step check looks only at the instance's ``__dict__``; the same write done
    by the optimizer *class's* step (a monkeypatch ``torch.optim.SGD.step = ...``, or a
    subclass whose step adds anything to the weights) runs between the last check and
    ``take_reference`` and is absorbed.  Fix: record ``type(inner).step`` at make_private
    and refuse a change; accept only torch's own optimizer steps (or verify the update)."""
    class Leaky(torch.optim.SGD):
        def step(self, closure=None):
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.add_(1e4)
            return super().step(closure)

    engine, model, dp_model, opt, crit, loader = _setup(
        optimizer=lambda m: Leaky(m.parameters(), lr=1.0))
    assert_one_step_is_honest(engine, model, dp_model, opt, loader,
                              "an optimizer subclass's step", crit=crit)


# --- finding 3: post-crop state reached through getattr / sys.modules -----------------------
_STATE = types.ModuleType("user_state6")      # stands for `import user_state6`
_STATE.RUN = {"sum": 0.0, "n": 0}
sys.modules[_STATE.__name__] = _STATE


def _via_sys_modules(sample):
    image, mask = sample
    run = sys.modules["user_state6"].RUN
    run["sum"] += float(image.float().mean())
    run["n"] += 1
    return image.float() - run["sum"] / run["n"], mask


def _via_getattr(sample):
    image, mask = sample
    run = getattr(_STATE, "RUN")
    run["sum"] += float(image.float().mean())
    run["n"] += 1
    return image.float() - run["sum"] / run["n"], mask


# A known limit of a static walk (README, "What no check can see": state a post-crop stage
# reaches by a name computed at run time).  strict: the day the fingerprint sees it, this fails
# and the README line goes.
@pytest.mark.xfail(strict=True, reason="post-crop state reached by a run-time name (getattr "
                   "with a string, sys.modules) is outside the fingerprint; documented in README")
@pytest.mark.parametrize("stage", [_via_getattr, _via_sys_modules],
                         ids=["getattr", "sys_modules"])
def test_a_post_crop_stage_with_state_reached_by_getattr_or_sys_modules_is_refused(stage):
    """``_globals_read`` follows a user module's attributes only when their names are in the
    code's ``co_names`` and the module is a global of the function; ``getattr(state, "RUN")``
    names it with a constant string, ``sys.modules["user_state"].RUN`` reaches the module
    through a library module (``sys``), so the
    running mean over all earlier crops (one image's private region shifts every later
    sample) is accepted.  Fix: walk all data attributes of a user module/class the code names
    (not only the names it reads), or refuse getattr/sys.modules/importlib in post-crop code."""
    start = _STATE.RUN["n"]
    if post_crop_refused(stage):
        return  # refused: safe
    assert _STATE.RUN["n"] - start <= 1, \
        f"the post-crop stage carried a running mean over {_STATE.RUN['n'] - start} crops"


# --- controls ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_controls_read_only_hook_and_honest_loop(mode):
    engine, model, dp_model, opt, crit, loader = _setup(mode)
    seen = []
    opt.attach_step_hook(lambda o: seen.append(float(sum(p.grad.norm() for p in o.params))))
    for x, y in loader:
        opt.zero_grad()
        crit(dp_model(x), y).backward()
        opt.step()
    assert _claim(engine) > 0 and len(engine.accountant) == len(loader) == len(seen)
