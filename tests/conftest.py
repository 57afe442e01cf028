import sys
from pathlib import Path

# tests/tiny.py is a shared helper module, imported by name.
sys.path.insert(0, str(Path(__file__).parent))
