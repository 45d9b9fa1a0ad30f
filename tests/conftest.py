import os
from pathlib import Path

import pytest

# Under pytest-xdist (`make test`: one worker per core) each worker is one process of torch: give
# it one thread, or N workers x N OpenMP threads oversubscribe the cores and libgomp's spinning
# threads slow everything several times (benchmarks/README.md, contention). Set before any test
# module imports torch; subprocesses the tests start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

FMNIST = Path(os.environ.get("VARPRUNE_FMNIST", "/usr/share/datasets/fashion-mnist"))


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    """The Debian package's Fashion-MNIST; scripts/setup.sh installs it."""
    assert (FMNIST / "train-images-idx3-ubyte.gz").is_file(), (
        f"Fashion-MNIST not found in {FMNIST}: run scripts/setup.sh (apt-get install dataset-fashion-mnist)"
    )
    return FMNIST


# ------------------------------------------------------------------ the `slow` marker
# End-to-end tests that train, sweep, start subprocesses (each imports torch) or SIGKILL runs:
# `python -m pytest -m "not slow"` (make test-fast) leaves them out for a quick developer loop;
# `make test` and CI run everything. A test file may also use @pytest.mark.slow directly.
SLOW_FIXTURES = {
    "trained_runs",  # test_cli: trains two runs through the command line (subprocesses)
    "refs",  # test_reliability: reference runs for the kill/resume tests
    "run_copy",  # test_reliability: a copy of a reference run
}
SLOW_TESTS = {
    # test_cli: study and demo end to end (subprocesses, several trainings and sweeps)
    "test_study_of_every_method_fills_every_cell",
    "test_study_averages_seeds_and_reuses_runs",
    "test_demo_tiny_end_to_end",
    # test_reliability: SIGKILL + resume in subprocesses, a diverging training
    "test_s2sam_method_state_survives_a_kill",
    "test_diverging_run_exits_3_naming_epoch_and_step",
    # test_train: full (small) training runs
    "test_same_seed_gives_a_bitwise_identical_run_on_cpu",
    "test_var_widens_the_magnitude_distribution",
    "test_bn_retuning_restores_a_pruned_model",
    # test_speed_paths: training runs counting host reads
    "test_training_loop_uses_the_closed_form_var_gradient",
    "test_host_reads_do_not_grow_with_the_number_of_steps",
    # test_html_report: headless chromium; test_sparse_format: a second Python process
    "test_rendered_in_headless_chromium",
    "test_repeated_saves_are_byte_identical_even_across_processes",
}


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        name = getattr(item, "originalname", None) or item.name.split("[")[0]
        if name in SLOW_TESTS or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(slow)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, whatever ran before it on its worker: a model built without an
    explicit seed is the same model on every run. (CI once drew a ResNet-20 holding an exact 0.0 weight, which the
    exact-sparsity test counted as pruned: 2 of 300 seeds do.)"""
    import torch

    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own folder: a default output (prune_comparison.png, runs/demo) never lands in the
    checkout, and no test sees another's."""
    monkeypatch.chdir(tmp_path)
