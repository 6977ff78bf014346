import re
from pathlib import Path

import keras
import pytest

# Test files whose results cannot depend on the Keras backend: they test Keras-free modules (settings,
# folders, image decoding, the import graph) and never import a framework themselves. `make test` runs
# them in one backend's process only (the torch one, the shortest: see the Makefile's -m); a plain
# `pytest` runs them wherever it is started.
BACKEND_FREE = {
    "test_cli_common.py",
    "test_config.py",
    "test_data_folders.py",
    "test_data_sources.py",
    "test_data_transforms.py",
    "test_gpu_cifar.py",
    "test_imagenet.py",
    "test_resume.py",
    "test_settings.py",
    "test_structure.py",
}
_FRAMEWORK_IMPORT = re.compile(r"^\s*(import|from)\s+(keras|tensorflow|jax|torch)\b", re.M)


def pytest_configure(config):
    config.addinivalue_line("markers", "backend_free: the result does not depend on the Keras backend")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.fspath))
        if path.name in BACKEND_FREE:
            # A framework import would make the file's results backend-dependent: then it leaves the list.
            assert not _FRAMEWORK_IMPORT.search(path.read_text(encoding="utf-8")), f"{path.name} imports a framework"
            item.add_marker(pytest.mark.backend_free)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
