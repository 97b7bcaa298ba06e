import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# The suite's models are tiny and it starts subprocesses (language servers) beside itself:
# one intra-op thread avoids two threads spinning against each other on a 2-core machine,
# where each tiny matmul otherwise takes milliseconds.
torch.set_num_threads(1)
