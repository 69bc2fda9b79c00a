"""Planning a stored profile must not need torch: the planner never imports it."""

import subprocess
import sys


def test_planner_imports_no_torch():
    code = ("import sys, bitplan.planner.plan, bitplan.planner.allocators, bitplan.planner.pins; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'highspy') if m in sys.modules); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
