"""scripts/benchmark_training.py in its CPU smoke mode: it measures, checks bk against Opacus
hooks, writes the JSON report, and renders the README table from it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_training.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_report_and_markdown(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--device", "cpu", "--tiny", "--archs", "deeplabv3plus", "--norms", "group",
                     "--modes", "nonprivate,bk", "--layer-bench", "0", "--iters", "1",
                     "--memory-batches", "1,2", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    # explicit flags win over the smoke-mode defaults
    assert report["config"]["layer_bench"] == 0 and report["layer_bench"] == []
    assert report["config"]["iters"] == 1 and report["config"]["encoder"] == "resnet18"
    rows = {r["mode"]: r for r in report["results"]}
    assert set(rows) == {"nonprivate", "bk"}
    assert rows["nonprivate"]["ratio_to_nonprivate"] == pytest.approx(1.0)
    assert rows["bk"]["img_per_s"] > 0 and rows["bk"]["batch"] == 2
    assert rows["bk"]["ratio_to_nonprivate"] == pytest.approx(
        rows["bk"]["img_per_s"] / rows["nonprivate"]["img_per_s"])
    assert rows["bk"]["cpu_time_ratio_to_nonprivate"] == pytest.approx(
        rows["bk"]["img_per_cpu_s"] / rows["nonprivate"]["img_per_cpu_s"])
    # one fresh process per mode and batch; the fit and the 80 GB batch are derived from them
    memory = {r["mode"]: r for r in report["memory"]}
    assert set(memory) == {"nonprivate", "bk"}
    for r in memory.values():
        assert [p["batch"] for p in r["points"]] == [1, 2]
        assert all(p["peak_bytes"] > 0 and p["loss_finite"] for p in r["points"])
        assert r["budget_bytes"] == 80e9
        assert r["fixed_bytes"] + 2 * r["per_sample_bytes"] == pytest.approx(
            r["points"][1]["peak_bytes"])
    assert memory["nonprivate"]["per_sample_ratio_to_nonprivate"] == pytest.approx(1.0)
    (check,) = report["checks"]
    # the real model (GroupNorm DeepLabV3+, ResNet-18 encoder): float rounding over ~70 layers
    assert check["norm_rel_err"] < 1e-4 and check["grad_rel_err_max"] < 1e-4
    capsys.readouterr()

    assert bench.main(["--markdown", str(out)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| device | precision | model |")
    assert len(table[:table.index("")]) == 2 + 2
    speed = table[:table.index("")]
    assert speed[-1].startswith("| CPU, torch threads 1 | fp32 | deeplabv3plus resnet18 OS8 crop 64 | group | bk | 2 |")
    assert speed[-1].endswith(f"| {rows['bk']['ratio_to_nonprivate']:.2f}× "
                              f"| {rows['bk']['cpu_time_ratio_to_nonprivate']:.2f}× |")
    memory_rows = table[table.index("") + 1:]
    assert memory_rows[0].startswith("| device | model | norm | mode | peak GiB of one step")
    assert memory_rows[0].endswith("| largest batch in 80 GB |")
    assert len(memory_rows) == 2 + 2


def test_markdown_skips_failed_rows_and_names_precision(bench, capsys):
    report = {"config": {"bf16": True, "channels_last": False, "encoder": "resnet101",
                         "output_stride": 8, "crop": 505},
              "env": {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"},
              "results": [{"arch": "pspnet", "norm": "frozen", "mode": "nonprivate", "batch": 32,
                           "img_per_s": 40.04, "peak_gib": 60.25, "ratio_to_nonprivate": 1.0},
                          {"arch": "pspnet", "norm": "frozen", "mode": "bk", "batch": 2,
                           "img_per_s": 0.05452, "peak_gib": None, "ratio_to_nonprivate": None},
                          {"arch": "pspnet", "norm": "frozen", "mode": "hooks",
                           "error": "out of memory at every batch tried"}]}
    table = bench.markdown_table([report]).splitlines()
    assert table[2:] == ["| NVIDIA H100 80GB HBM3 | bf16 autocast | pspnet resnet101 OS8 crop 505 "
                         "| frozen | nonprivate | 32 | 40 | 60.2 | 1.00× | n/a |",
                         "| NVIDIA H100 80GB HBM3 | bf16 autocast | pspnet resnet101 OS8 crop 505 "
                         "| frozen | bk | 2 | 0.0545 | n/a | n/a | n/a |"]


def test_frozen_batchnorm_statistics_are_calibrated(bench):
    """Random-weight frozen BatchNorms get their inputs' statistics: every one of them then
    outputs zero-mean, unit-variance channels on the calibration batch (identity maps would let
    a ResNet-101's activations grow until the non-private step diverges)."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    make = bench.model_builder("deeplabv3plus", "resnet18", 8, "frozen", 5)
    net, again = make(), make()
    norms = {n: m for n, m in net.named_modules() if isinstance(m, _BatchNorm)}
    assert len(norms) > 20 and all(not m.training for m in norms.values())
    for name, buf in again.named_buffers():  # the second build gets the same statistics
        assert torch.equal(buf, dict(net.named_buffers())[name])
    assert any(not torch.allclose(m.running_var, torch.ones_like(m.running_var))
               for m in norms.values())
    outputs = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: outputs.__setitem__(n, o))
               for n, m in norms.items()]
    gen = torch.Generator().manual_seed(0)  # calibrate_frozen_bn's defaults: the same batch
    with torch.no_grad():
        net.eval()(torch.rand(2, 3, 129, 129, generator=gen) * 255)
    for h in handles:
        h.remove()
    for name, out in outputs.items():
        per_channel = out.transpose(0, 1).flatten(1)
        assert per_channel.mean(1).abs().max() < 1e-3, name
        # unit variance, up to BatchNorm's eps (visible where 2 samples x 1 pixel barely differ)
        rv, eps = norms[name].running_var, norms[name].eps
        torch.testing.assert_close(per_channel.var(1, unbiased=False), rv / (rv + eps),
                                   rtol=1e-3, atol=1e-4, msg=name)


def test_memory_fit_is_least_squares_and_gives_the_largest_batch(bench):
    """peak(b) = fixed + b * per_sample: exact through two points, least squares through more;
    the largest batch is the floor of (budget - fixed) / per_sample."""
    from benchlib.memory import fit

    gb = 1e9
    two = fit([{"batch": 1, "peak_bytes": 3 * gb}, {"batch": 2, "peak_bytes": 5 * gb}], 80 * gb)
    assert two["per_sample_bytes"] == pytest.approx(2 * gb)
    assert two["fixed_bytes"] == pytest.approx(1 * gb)
    assert two["max_batch_in_budget"] == 39  # 1 + 39 * 2 = 79 <= 80 < 81
    noisy = fit([{"batch": b, "peak_bytes": (1 + 2 * b + e) * gb}
                 for b, e in ((1, 0.1), (2, -0.2), (4, 0.1))], 80 * gb)
    assert noisy["per_sample_bytes"] == pytest.approx(2 * gb, rel=0.05)
    with pytest.raises(ValueError, match="two different batch sizes"):
        fit([{"batch": 2, "peak_bytes": gb}, {"batch": 2, "peak_bytes": gb}], 80 * gb)
