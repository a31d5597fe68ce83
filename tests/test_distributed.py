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
