"""Shared test settings: offline, quiet, and one torch thread per test worker.

`make test` runs two pytest workers on two cores; more threads than cores makes small
CPU kernels dramatically slower, so each worker uses one.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def wide_consoles():
    """Rich tables and notes at a fixed, wide width: test output must not depend on the terminal."""
    from layermoe.core.console import console, err_console

    saved = console.width, err_console.width
    console.width = err_console.width = 200
    yield
    console.width, err_console.width = saved
