"""Drop-in: Opacus' own engine-level tests, shipped inside the installed opacus package, pass
with ``opacus.PrivacyEngine`` replaced by ``patchdp_opacus.PrivacyEngine``.

Our run substitutes the engine with the ``substitute_engine`` plugin (``tests/opacus_suite``)
and derandomises hypothesis (``--hypothesis-seed=0``).  It is compared test by test with plain
Opacus' outcomes for the installed Opacus version: recorded in
``tests/opacus_suite/opacus-<version>.json`` by ``tests/opacus_suite/record_baseline.py`` (the
same command without the plugin), or, for a version without a record, run here in a second
process beside ours.  Every test that passes with plain Opacus must pass with ours; nothing is
deselected, and a test may be skipped only where plain Opacus skips it too.
"""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import opacus

SUITE = Path(__file__).parent / "opacus_suite"
FILES = ("privacy_engine_test.py", "privacy_engine_validation_test.py",
         "batch_memory_manager_test.py", "gradient_accumulation_test.py")


def start(xml: Path, substitute: bool) -> subprocess.Popen:
    """Opacus' four engine-level test files in a subprocess, JUnit XML into ``xml``."""
    tests = Path(opacus.__file__).parent / "tests"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "--hypothesis-seed=0", f"--junitxml={xml}", "--rootdir", str(tests.parent),
           *(["-p", "substitute_engine"] if substitute else []),
           *[str(tests / f) for f in FILES]]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SUITE),
                                                        os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(cmd, cwd=xml.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def outcomes(xml: Path) -> dict:
    """``{test id: "passed" | "failed" | "skipped"}`` from a JUnit XML file."""
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        out[f"{case.get('classname')}::{case.get('name')}"] = (
            "failed" if tags & {"failure", "error"} else
            "skipped" if "skipped" in tags else "passed")
    return out


def baseline_path() -> Path:
    return SUITE / f"opacus-{opacus.__version__}.json"


def test_opacus_engine_tests_pass_with_our_engine(tmp_path):
    ours_proc = start(tmp_path / "patchdp.xml", substitute=True)
    recorded = baseline_path()
    if recorded.is_file():
        plain = json.loads(recorded.read_text())["outcomes"]
    else:
        plain_proc = start(tmp_path / "opacus.xml", substitute=False)
        plain_proc.communicate()
        plain = outcomes(tmp_path / "opacus.xml")
    log = ours_proc.communicate()[0]
    ours = outcomes(tmp_path / "patchdp.xml")
    assert plain and set(ours) == set(plain), log[-3000:]
    regressions = sorted(k for k, v in plain.items() if v == "passed" and ours[k] != "passed")
    assert not regressions, (f"{len(regressions)} tests pass with Opacus but not with ours: "
                             f"{regressions[:10]}\n{log[-3000:]}")
    assert not [k for k, v in ours.items() if v == "skipped" and plain[k] != "skipped"]
    passed = {name: sum(v == "passed" for v in o.values())
              for name, o in (("opacus", plain), ("patchdp", ours))}
    assert passed["patchdp"] == passed["opacus"] > 200
