"""The README's tour runs as shown: every Python block of README.md, on the CPU (the blocked torch
paths: no Triton interpreter), in one fresh process, each block in a namespace of its own. The
context-parallel block needs ``torchrun`` and is left out; the transformers block runs where
transformers is installed."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_python_blocks_run():
    blocks = [b for b in _blocks() if "init_process_group" not in b]
    if importlib.util.find_spec("transformers") is None:
        blocks = [b for b in blocks if "transformers" not in b]
    assert len(blocks) >= 6, f"found {len(blocks)} runnable Python blocks in README.md"
    script = ("blocks = %r\n"
              "for i, b in enumerate(blocks):\n"
              "    exec(compile(b, f'<README.md python block {i}>', 'exec'), {'__name__': '__readme__'})\n"
              "print('ran', len(blocks))\n") % (blocks,)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    assert f"ran {len(blocks)}" in run.stdout
