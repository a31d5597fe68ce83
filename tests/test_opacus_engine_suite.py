"""Drop-in: Opacus' own engine-level tests, shipped inside the installed opacus package, pass
with ``opacus.PrivacyEngine`` replaced by ``patchdp_opacus.PrivacyEngine``.

Both runs happen here, side by side in two processes: plain Opacus, and Opacus with our engine
substituted by the ``substitute_engine`` plugin (``tests/opacus_suite``).  Every test that
passes with plain Opacus must pass with ours; nothing is deselected, and a test may be skipped
only where it is skipped under plain Opacus too.
"""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import opacus

HERE = Path(__file__).parent
FILES = ("privacy_engine_test.py", "privacy_engine_validation_test.py",
         "batch_memory_manager_test.py", "gradient_accumulation_test.py")


def _start(tmp_path: Path, name: str, plugin: bool) -> tuple[subprocess.Popen, Path]:
    tests = Path(opacus.__file__).parent / "tests"
    xml = tmp_path / f"{name}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
           "addopts=", f"--junitxml={xml}", "--rootdir", str(tests.parent),
           *[str(tests / f) for f in FILES]]
    if plugin:
        cmd[3:3] = ["-p", "substitute_engine"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE / "opacus_suite"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1", "HYPOTHESIS_PROFILE": "default"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, xml


def _outcomes(xml: Path) -> dict:
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        key = f"{case.get('classname')}::{case.get('name')}"
        tags = {child.tag for child in case}
        out[key] = ("failed" if tags & {"failure", "error"} else
                    "skipped" if "skipped" in tags else "passed")
    return out


def test_opacus_engine_tests_pass_with_our_engine(tmp_path):
    runs = {name: _start(tmp_path, name, plugin) for name, plugin in (("opacus", False),
                                                                      ("patchdp", True))}
    logs = {name: proc.communicate()[0] for name, (proc, _) in runs.items()}
    plain, ours = (_outcomes(runs[name][1]) for name in ("opacus", "patchdp"))
    assert plain and set(ours) == set(plain), logs["patchdp"][-3000:]
    regressions = sorted(k for k, v in plain.items() if v == "passed" and ours[k] != "passed")
    assert not regressions, f"{len(regressions)} tests pass with Opacus but not with ours: " \
                            f"{regressions[:10]}\n{logs['patchdp'][-3000:]}"
    extra_skips = sorted(k for k, v in ours.items() if v == "skipped" and plain[k] != "skipped")
    assert not extra_skips
    counts = {name: sum(v == "passed" for v in outcome.values())
              for name, outcome in (("opacus", plain), ("patchdp", ours))}
    assert counts["patchdp"] == counts["opacus"] > 0
