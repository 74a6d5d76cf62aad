"""Architecture guard: the library below the callback works without importing Lightning."""

from __future__ import annotations

import subprocess
import sys


def test_import_fimcb_does_not_import_lightning() -> None:
    code = (
        "import sys, fimcb, fimcb.engine, fimcb.detectors, fimcb.evaluation, fimcb.metrics;"
        "print(any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
