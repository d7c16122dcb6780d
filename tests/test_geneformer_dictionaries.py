"""Geneformer dictionaries: read without running pickled code, converted, cached as JSON."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from scdlkit.foundation.models.geneformer import (
    GeneformerDictionaries,
    _dictionaries,
    load_geneformer_dictionaries,
    read_dictionary,
)

DATA = Path(__file__).parent / "data"
V2_DICTS = DATA / "geneformer-tiny-v2" / "dictionaries"
V1_DICTS = DATA / "geneformer-tiny-v1" / "dictionaries"


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SCDLKIT_CACHE_DIR", str(cache))
    return cache


class _RunsCode:
    """Pickles as a call to os.system, as a hostile file would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_v2_dictionaries_convert_to_plain_python(fresh_cache: Path) -> None:
    dicts = load_geneformer_dictionaries(V2_DICTS)
    with open(V2_DICTS / "gene_median_dictionary_gc104M.pkl", "rb") as fh:
        reference = pickle.load(fh)  # the test's own trusted fixture, for comparison only
    assert dicts.medians == {k: float(v) for k, v in reference.items()}
    assert all(type(v) is float for v in dicts.medians.values())
    assert all(type(v) is int for v in dicts.token_ids.values())
    assert (dicts.pad_id, dicts.mask_id, dicts.cls_id, dicts.eos_id) == (0, 1, 2, 3)
    assert dicts.version == "V2"
    assert dicts.n_tokens == 1504
    assert len(dicts.gene_name_id) == 1500
    # the mapping keeps only targets that are token genes; no special token is a target
    assert set(dicts.gene_mapping.values()) <= set(dicts.token_ids) - {"<pad>", "<cls>"}
    assert set(dicts.sha256) == {"token", "median", "name_id", "mapping"}


def test_v1_dictionaries_with_int16_tokens(fresh_cache: Path) -> None:
    if not V1_DICTS.is_dir():
        pytest.skip(f"V1 fixture not present at {V1_DICTS}")
    dicts = load_geneformer_dictionaries(V1_DICTS)
    assert dicts.version == "V1"
    assert dicts.cls_id is None
    assert dicts.eos_id is None
    assert all(type(v) is int for v in dicts.token_ids.values())  # numpy.int16 upstream
    assert sorted(dicts.token_ids.values()) == list(range(dicts.n_tokens))


def test_scalars_pickled_by_numpy_2_are_admitted(tmp_path: Path, fresh_cache: Path) -> None:
    # numpy 2 names the scalar global numpy._core.multiarray.scalar
    path = tmp_path / "token_dictionary_x.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0, "<mask>": np.int16(1), "ENSG01": np.int64(2)}))
    data, digest = read_dictionary(path, "token")
    assert data == {"<pad>": 0, "<mask>": 1, "ENSG01": 2}
    assert len(digest) == 64


@pytest.mark.parametrize("kind", ["token", "median", "mapping"])
def test_pickle_running_code_is_refused_unrun(tmp_path: Path, fresh_cache: Path, kind) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "hostile.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0, "ENSG01": _RunsCode(marker)}))
    with pytest.raises(ValueError, match=r"hostile\.pkl was not loaded.*(posix|os)\.system"):
        read_dictionary(path, kind)
    assert not marker.exists()
    assert not list(fresh_cache.rglob("*.json"))


def test_object_dtype_and_builtins_are_refused(tmp_path: Path, fresh_cache: Path) -> None:
    path = tmp_path / "object.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0, "ENSG01": np.dtype(object)}))
    with pytest.raises(ValueError, match="not a number or string dtype"):
        read_dictionary(path, "token")
    path.write_bytes(pickle.dumps({"<pad>": 0, "ENSG01": slice(1, 2)}))
    with pytest.raises(ValueError, match=r"builtins\.slice"):
        read_dictionary(path, "token")


def test_wrong_values_are_refused(tmp_path: Path, fresh_cache: Path) -> None:
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0, "ENSG01": 5}))
    with pytest.raises(ValueError, match=r"token ids must be 0\.\.1"):
        read_dictionary(path, "token")
    path.write_bytes(pickle.dumps({"ENSG01": -1.0}))
    with pytest.raises(ValueError, match="positive finite number"):
        read_dictionary(path, "median")
    path.write_bytes(pickle.dumps(["not", "a", "dict"]))
    with pytest.raises(ValueError, match="holds a list, not a dictionary"):
        read_dictionary(path, "mapping")
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="not a readable pickled dictionary"):
        read_dictionary(path, "mapping")
    with pytest.raises(ValueError, match="kind='vocab'"):
        read_dictionary(path, "vocab")


def test_second_load_reads_the_json_cache(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_geneformer_dictionaries(V2_DICTS)
    cached = sorted(fresh_cache.rglob("*.json"))
    assert [p.stem for p in cached] == sorted(first.sha256.values())
    payload = json.loads(cached[0].read_text())
    assert payload["schema"] == _dictionaries.CACHE_SCHEMA

    def refuse(*args, **kwargs):
        msg = "unpickling must not happen when the JSON cache holds the file"
        raise AssertionError(msg)

    monkeypatch.setattr(_dictionaries, "_unpickle", refuse)
    second = load_geneformer_dictionaries(V2_DICTS)
    assert second == first
    # another cache folder has no JSON yet: the pickle would be read again
    monkeypatch.setenv("SCDLKIT_CACHE_DIR", str(fresh_cache.parent / "other"))
    with pytest.raises(AssertionError, match="unpickling must not happen"):
        load_geneformer_dictionaries(V2_DICTS)


def test_corrupt_cache_is_ignored_and_rewritten(fresh_cache: Path) -> None:
    first = load_geneformer_dictionaries(V2_DICTS)
    for file in fresh_cache.rglob("*.json"):
        file.write_text("{not json")
    assert load_geneformer_dictionaries(V2_DICTS) == first
    assert all(json.loads(f.read_text())["data"] for f in fresh_cache.rglob("*.json"))


def test_folder_and_mapping_forms(tmp_path: Path, fresh_cache: Path) -> None:
    with pytest.raises(FileNotFoundError, match="holds no Geneformer dictionaries"):
        load_geneformer_dictionaries(tmp_path)
    files = {
        "token": V2_DICTS / "token_dictionary_gc104M.pkl",
        "median": V2_DICTS / "gene_median_dictionary_gc104M.pkl",
    }
    only_two = load_geneformer_dictionaries(files)
    assert only_two.mapping is None
    assert only_two.gene_name_id == {}
    # without a mapping file each token gene maps to itself (upstream's fallback)
    genes = set(only_two.token_ids) - {"<pad>", "<mask>", "<cls>", "<eos>"}
    assert only_two.gene_mapping == {g: g for g in genes}
    with pytest.raises(ValueError, match="are required"):
        load_geneformer_dictionaries({"token": files["token"]})
    with pytest.raises(ValueError, match="unknown dictionary kind"):
        load_geneformer_dictionaries({**files, "vocab": files["token"]})


def test_medians_must_cover_token_genes(fresh_cache: Path) -> None:
    dicts = load_geneformer_dictionaries(V2_DICTS)
    medians = dict(dicts.medians)
    medians.pop(next(iter(medians)))
    with pytest.raises(ValueError, match="lacks the median of 1 token genes"):
        GeneformerDictionaries(token_ids=dicts.token_ids, medians=medians)
