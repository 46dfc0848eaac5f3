"""The fake geocoding provider of ``scripts/fake_geocoder.py``, plus the tests' places.

The server lives under scripts/ because ``make run`` starts it for the demo without
the tests package; it is loaded from its file, so nothing depends on ``scripts`` being
importable as a package.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "fake_geocoder.py"
_spec = importlib.util.spec_from_file_location("fleetticketsd_fake_geocoder", _PATH)
assert _spec is not None and _spec.loader is not None
_module = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _module  # dataclasses look their module up there
_spec.loader.exec_module(_module)

FakeGeocoder = _module.FakeGeocoder
Request = _module.Request
kenya_point = _module.kenya_point
KEY: str = _module.DEFAULT_KEY

# Points used across the tests: a cluster centroid, places near it, and one far away.
KILIMANI = (-1.2921, 36.7856)
JOGOO_KILIMANI = (-1.2950, 36.7900)  # ~0.6 km from KILIMANI
MOMBASA = (-4.0435, 39.6682)  # ~440 km from Kilimani: the wrong city
