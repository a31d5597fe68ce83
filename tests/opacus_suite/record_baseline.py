"""Record plain Opacus' outcomes of its four engine-level test files for the installed Opacus
version (``opacus-<version>.json`` beside this file), which
``tests/test_opacus_engine_suite.py`` compares our engine's run with.

    python tests/opacus_suite/record_baseline.py      # a few CPU minutes
"""

import json
import sys
import tempfile
from pathlib import Path

import opacus

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_opacus_engine_suite import baseline_path, outcomes, start  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "opacus.xml"
        log = start(xml, substitute=False).communicate()[0]
        result = outcomes(xml)
    if not result:
        print(log[-3000:])
        return 1
    counts = {k: sum(v == k for v in result.values()) for k in ("passed", "skipped", "failed")}
    baseline_path().write_text(json.dumps(
        {"opacus": opacus.__version__, "command": "pytest --hypothesis-seed=0 <4 files>",
         "counts": counts, "outcomes": dict(sorted(result.items()))}, indent=1) + "\n")
    print(f"wrote {baseline_path()}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
