import os
import sys
from pathlib import Path

# tests/tiny.py is a shared helper module, imported by name.
sys.path.insert(0, str(Path(__file__).parent))

try:  # torch's OpenMP threads spin; with another busy process on a 2-core machine a
    import torch  # tiny model's generate goes from 0.04 s to 6 s. One thread is plenty.

    torch.set_num_threads(1)
except ImportError:
    pass

# Export validation computes the PyTorch reference in this process, not in a child: the tests
# have torch loaded already, and a child's fresh torch import costs seconds a validation.
# (tests/test_export.py checks the child path itself.)
os.environ.setdefault("SWAPMOE_EXPORT_REFERENCE", "inprocess")
