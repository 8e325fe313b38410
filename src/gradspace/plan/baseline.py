"""The memory a training process holds before it builds anything: the interpreter, torch and transformers.

Measured once per machine (and per torch and transformers version) in a fresh interpreter that imports what a
run imports, and cached in ``~/.cache/gradspace/baseline.json``; on CUDA the planner predicts
``torch.cuda.max_memory_allocated``, which does not count the CUDA context, so the baseline is 0 there.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

PROBE = """
import torch
from gradspace.train.allocator import return_freed_memory
from gradspace.train.models import build_llama
import gradspace.train.trainer

return_freed_memory()
model = build_llama("tiny", vocab_size=64)  # a step of a model of a few KiB loads what a real step loads
x = torch.zeros(2, 16, dtype=torch.long)
model(input_ids=x, labels=x).loss.backward()
torch.optim.AdamW(model.parameters()).step()
print(int(open("/proc/self/statm").read().split()[1]) * 4096)
"""


def _cache() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "gradspace" / "baseline.json"


def process_baseline(device: str = "cpu") -> int:
    """Bytes of a training process's own RSS before its model is built (0 on CUDA)."""
    if str(device).startswith("cuda") or not sys.platform.startswith("linux"):
        return 0
    import torch
    import transformers

    key = f"{platform.node()} {platform.machine()} torch {torch.__version__} transformers {transformers.__version__}"
    path = _cache()
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return int(cached["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=False)
    try:
        measured = int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "bytes": measured}))
    except OSError:
        pass  # a read-only home: measured again next time
    return measured
