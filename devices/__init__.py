"""Device profiles, one JSON file each; ``swapmoe_edge.system.devices`` reads them."""

from pathlib import Path

PROFILE_DIR = Path(__file__).resolve().parent
