"""``pip install gradspace`` is the core (torch only): importing it pulls in none of the training side (numpy and
tqdm count only when torch itself has not already imported them)."""

import subprocess
import sys

TRAINING_SIDE = ("transformers", "matplotlib", "yaml", "safetensors", "tqdm", "numpy")


def test_the_core_imports_nothing_beyond_torch():
    code = (
        "import sys; import torch; top = lambda: {m.split('.')[0] for m in sys.modules}; before = top(); "
        "import gradspace, gradspace.layerwise, gradspace.distributed, gradspace.update; "
        "gradspace.create_optimizer('galore', torch.nn.Linear(8, 8), rank=2, target_modules='all-linear'); "
        f"print(sorted(m for m in top() - before if m in {TRAINING_SIDE!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
