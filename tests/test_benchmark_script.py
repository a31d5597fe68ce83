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
                     "--out", str(out)])
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
    (check,) = report["checks"]
    # the real model (GroupNorm DeepLabV3+, ResNet-18 encoder): float rounding over ~70 layers
    assert check["norm_rel_err"] < 1e-4 and check["grad_rel_err_max"] < 1e-4
    capsys.readouterr()

    assert bench.main(["--markdown", str(out)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| device | precision | model |")
    assert len(table) == 2 + 2
    assert table[-1].startswith("| cpu | fp32 | deeplabv3plus resnet18 OS8 crop 64 | group | bk | 2 |")
    assert table[-1].endswith(f"| {rows['bk']['ratio_to_nonprivate']:.2f}× |")


def test_markdown_skips_failed_rows_and_names_precision(bench, capsys):
    report = {"config": {"bf16": True, "channels_last": False, "encoder": "resnet101",
                         "output_stride": 8, "crop": 505},
              "env": {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"},
              "results": [{"arch": "pspnet", "norm": "frozen", "mode": "nonprivate", "batch": 32,
                           "img_per_s": 40.0, "peak_gib": 60.25, "ratio_to_nonprivate": 1.0},
                          {"arch": "pspnet", "norm": "frozen", "mode": "hooks",
                           "error": "out of memory at every batch tried"}]}
    table = bench.markdown_table([report]).splitlines()
    assert table[2:] == ["| NVIDIA H100 80GB HBM3 | bf16 autocast | pspnet resnet101 OS8 crop 505 "
                         "| frozen | nonprivate | 32 | 40.00 | 60.2 | 1.00× |"]
