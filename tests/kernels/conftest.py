"""Kernel tests run on CPU through the Triton interpreter; it must be switched on before triton is imported.

The package is also put first on sys.path from this checkout, so the tests exercise the code beside them even
when another checkout of the project is installed (editable) in the environment.
"""

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "kernels"))
