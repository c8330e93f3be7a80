import os
import sys

import pytest
import torch

# Triton kernels run on CPU tensors through Triton's interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FER2013_NPZ = os.path.join(ROOT, "..", "shared", "data", "fer2013.npz")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread per test module: on a shared 2-core machine more threads oversubscribe and crawl;
    train.py's --threads may change it inside a test, so it is restored after each module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
