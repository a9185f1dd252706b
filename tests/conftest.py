import os
import sys

import torch

# The project is a flat set of scripts at the repo root: make them importable from the tests.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Without a GPU, kernels.py's Triton kernels run in Triton's interpreter (read when they are defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
