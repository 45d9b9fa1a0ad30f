import os
from pathlib import Path

import pytest

FMNIST = Path(os.environ.get("VARPRUNE_FMNIST", "/usr/share/datasets/fashion-mnist"))


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    """The Debian package's Fashion-MNIST; scripts/setup.sh installs it."""
    assert (FMNIST / "train-images-idx3-ubyte.gz").is_file(), \
        f"Fashion-MNIST not found in {FMNIST}: run scripts/setup.sh (apt-get install dataset-fashion-mnist)"
    return FMNIST
