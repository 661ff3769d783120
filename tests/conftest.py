"""Put the repository root on sys.path so `import kl` works under `python -m pytest -q`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that takes tens of seconds on a CPU")
