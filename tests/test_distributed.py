"""Two-process DDP (gloo, CPU): global fixed-size batch split across ranks, one accountant step
per global step, identical models on both ranks."""

import json
import os
import socket
import sys

import torch
import torch.multiprocessing as mp

HERE = os.path.dirname(__file__)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    sys.path.insert(0, HERE)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    from plugin_helpers import TinySegNet, per_image_ce, plain_loader

    from patchdp_opacus import PrivacyEngine

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = DPDDP(TinySegNet())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = PrivacyEngine()
        model, opt, loader = engine.make_private(
            module=model, optimizer=opt, data_loader=plain_loader(n=24, batch_size=8),
            criterion=per_image_ce(), noise_multiplier=0.8, max_grad_norm=1.0,
            crop=(8, 10), private_region=(2, 2), seed=123)
        crit = per_image_ce()
        shapes = []
        for x, y in loader:
            shapes.append(x.shape[0])
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        result = {"steps": len(engine.accountant), "len": len(loader), "shapes": shapes,
                  "expected_batch_size": opt.expected_batch_size,
                  "sample_rate": loader.sample_rate, "eps": engine.get_epsilon(1e-5),
                  "params": flat.tolist()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_two_process_ddp(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    for r in (r0, r1):
        assert r["steps"] == r["len"] == 3  # round(24 / 8) global steps, one accountant step each
        assert r["shapes"] == [4, 4, 4]      # global batch 8 split across 2 ranks
        assert r["expected_batch_size"] == 4
        assert r["sample_rate"] == 8 / 24
    assert r0["eps"] == r1["eps"]
    assert torch.allclose(torch.tensor(r0["params"]), torch.tensor(r1["params"]), atol=1e-6)


# -- bk (patchdp_opacus.fast) under DPDDP ---------------------------------------------------------

def _bk_train(model, *, noise, C, lr=0.1, loss="ce"):
    """make_private(grad_sample_mode='bk') on the plugin test data (global batch 8 of 24, seed
    123) and one epoch of training; returns (engine, model, optimizer, loader)."""
    from plugin_helpers import per_image_ce, plain_loader

    from patchdp_opacus import PrivacyEngine

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=plain_loader(n=24, batch_size=8),
        criterion=per_image_ce(), noise_multiplier=noise, max_grad_norm=C, crop=(8, 10),
        private_region=(2, 2), seed=123, grad_sample_mode="bk")
    crit = per_image_ce()
    for x, y in loader:
        opt.zero_grad()
        out = model(x)
        (crit(out, y) if loss == "ce" else (out * 0.0).flatten(1).sum(1).mean()).backward()
        opt.step()
    return engine, model, opt, loader


def _noise_net():
    """A model with many parameters (80k) whose loss `(out * 0).sum()` has zero gradient."""
    from torch import nn
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 10, 200), nn.Linear(200, 160))


def _bk_worker(rank, world, port, out_dir):
    sys.path.insert(0, HERE)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    from plugin_helpers import TinySegNet
    from torch.nn.parallel import DistributedDataParallel as DDP

    from patchdp_opacus.fast import FAST_MODES, DistributedBKDPOptimizer

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        result = {}
        # 1. no noise, clipping active: the update of the global batch
        torch.manual_seed(0)
        engine, model, opt, loader = _bk_train(DPDDP(TinySegNet()), noise=0.0, C=0.05)
        result.update(optimizer=[c.__name__ for c in type(opt).__mro__],
                      steps=len(engine.accountant),
                      history=[list(h) for h in engine.accountant.history],
                      expected_batch_size=opt.expected_batch_size,
                      params=torch.cat([p.detach().flatten() for p in model.parameters()]).tolist())
        assert isinstance(opt, DistributedBKDPOptimizer)
        # 2. zero per-sample gradients, noise on: the update is the noise of the global step
        torch.manual_seed(1 + rank)  # independent noise streams, as on separate machines
        z, C = 1.3, 0.7
        net = DPDDP(_noise_net())  # rank 0's initial weights on both ranks
        start = [p.detach().clone() for p in net.parameters()]
        engine, model, opt, loader = _bk_train(net, noise=z, C=C, lr=1.0, loss="zero")
        result["noise_deltas"] = torch.cat(
            [(a - p.detach()).flatten() for a, p in zip(start, model.parameters())]).tolist()
        result["noise_steps"] = len(engine.accountant)
        # 3. torch's DDP cannot carry bk (no ordinary .grad to all-reduce)
        try:
            FAST_MODES["bk"].wrap_model(DDP(TinySegNet()))
            result["ddp_error"] = None
        except ValueError as exc:
            result["ddp_error"] = str(exc)
        with open(os.path.join(out_dir, f"bk_rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_bk_two_process_ddp_equals_single_process_and_noises_once(tmp_path):
    """grad_sample_mode='bk' under DPDDP (2 gloo processes, global batch 8 = 2 x 4):
    * noise off: the parameters after one epoch equal the single-process bk run on the same
      global batches (same seed), and each rank's accountant holds one step per global step;
    * zero gradients, noise z: the update is (one N(0, (zC)^2) draw) / B -- noise added once
      for the global batch, not once per rank (which would give std sqrt(2) z C)."""
    sys.path.insert(0, HERE)
    from plugin_helpers import TinySegNet

    mp.spawn(_bk_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"bk_rank{r}.json").read_text()) for r in (0, 1))
    torch.manual_seed(0)
    engine, model, opt, loader = _bk_train(TinySegNet(), noise=0.0, C=0.05)
    single = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.manual_seed(0)
    init = torch.cat([p.detach().flatten() for p in TinySegNet().parameters()])
    assert (single - init).abs().max() > 1e-3  # the epoch did move the model
    for r in (r0, r1):
        assert "DistributedBKDPOptimizer" in r["optimizer"]  # (with the guard mixed in)
        assert r["expected_batch_size"] == 4
        assert r["steps"] == len(engine.accountant) == 3 and r["noise_steps"] == 3
        assert r["history"] == [list(h) for h in engine.accountant.history]
        torch.testing.assert_close(torch.tensor(r["params"]), single, rtol=1e-5, atol=1e-6)
        assert "DPDDP" in r["ddp_error"]
    # the two ranks apply the same noisy update
    assert r0["noise_deltas"] == r1["noise_deltas"]
    deltas = torch.tensor(r0["noise_deltas"])  # 3 steps of lr 1: sum of 3 draws of noise / 8
    z, C, B, steps = 1.3, 0.7, 8, 3
    measured = deltas.std().item() * B / steps ** 0.5
    assert abs(measured / (z * C) - 1) < 0.05, measured / (z * C)
