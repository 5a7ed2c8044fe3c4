"""`moec` starts without the heavy libraries: every command imports them in its body, so `--help`
and an option error answer at once (a CI gate runs the CLI many times; issue 12 measured an 11 s
start on a loaded runner when the quantize passes were imported at start)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("onnx_ir", "onnx", "onnxruntime", "torch", "scipy", "tensorrt_rtx")


def test_importing_the_cli_loads_none_of_the_heavy_libraries():
    code = ("import sys, moec.compiler.cli; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing the CLI loaded {out}"
