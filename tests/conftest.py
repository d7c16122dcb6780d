from __future__ import annotations

import os
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "scgpt-tiny-flash"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "auto_precision: depends on what precision='auto' picks on a CPU; `make test` runs these "
        "again with SCDLKIT_NATIVE_BF16 set the other way, so both decisions are covered",
    )


def pytest_report_header(config: pytest.Config) -> str:
    from scdlkit._shared.hardware import NATIVE_BF16_ENV, native_bf16

    forced = os.environ.get(NATIVE_BF16_ENV)
    how = f"{NATIVE_BF16_ENV}={forced}" if forced else "CPU flags"
    picks = "bf16" if native_bf16("cpu") else "fp32"
    return f"precision='auto' on CPU picks {picks} ({how})"


@pytest.fixture(scope="session", autouse=True)
def _cache_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """Runners saved without output_dir go to the scdlkit cache: a temporary one in tests."""
    from scdlkit._shared.cache import CACHE_ENV_VAR

    if os.environ.get(CACHE_ENV_VAR):
        yield
        return
    os.environ[CACHE_ENV_VAR] = str(tmp_path_factory.mktemp("scdlkit-cache"))
    yield
    os.environ.pop(CACHE_ENV_VAR, None)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURE


@pytest.fixture(scope="session")
def checkpoint_dir() -> Path:
    return FIXTURE / "checkpoint"


@pytest.fixture
def fixture_adata() -> ad.AnnData:
    return ad.read_h5ad(FIXTURE / "data.h5ad")


@pytest.fixture(scope="session")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "expected.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture
def checkpoint_copy(tmp_path: Path, checkpoint_dir: Path) -> Path:
    """A writable copy of the fixture checkpoint for tests that alter it."""
    dest = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, dest)
    for f in dest.iterdir():
        f.chmod(0o644)
    return dest


@pytest.fixture(scope="session")
def _pbmc_raw() -> ad.AnnData:
    import scanpy as sc

    pbmc = sc.datasets.pbmc68k_reduced()
    raw = pbmc.raw.to_adata()
    raw.obs["bulk_labels"] = pbmc.obs["bulk_labels"].copy()
    return raw


@pytest.fixture
def pbmc_raw(_pbmc_raw: ad.AnnData) -> ad.AnnData:
    """pbmc68k_reduced's log-normalised ``.raw`` (765 symbols) with ``bulk_labels``."""
    return _pbmc_raw.copy()


@pytest.fixture(scope="module")
def baseline_runner(_pbmc_raw: ad.AnnData, checkpoint_dir: Path, tmp_path_factory):
    """A saved ``baseline`` runner fitted on pbmc68k_reduced's ``.raw`` (``bulk_labels``)."""
    import scdlkit as sck

    runner = sck.AnnotationRunner(
        label_key="bulk_labels",
        strategies=("baseline",),
        checkpoint=checkpoint_dir,
        random_state=0,
        progress=False,
        precision="fp32",
    ).fit(_pbmc_raw)
    runner.save(tmp_path_factory.mktemp("baseline") / "runner")
    return runner


@pytest.fixture(scope="module")
def annotated(_pbmc_raw: ad.AnnData, baseline_runner) -> ad.AnnData:
    """pbmc68k_reduced's ``.raw`` labelled by :func:`baseline_runner` (``sck.tl.annotate``)."""
    import scdlkit as sck

    adata = _pbmc_raw.copy()
    sck.tl.annotate(adata, baseline_runner)
    return adata
