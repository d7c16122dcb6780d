"""Geneformer checkpoints: folder layouts, configuration checks, loud weight loading."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from scdlkit.foundation.models.geneformer import (
    GeneformerConfig,
    load_geneformer_dictionaries,
    load_geneformer_model,
    resolve_geneformer_checkpoint,
)

DATA = Path(__file__).parent / "data"
V2 = DATA / "geneformer-tiny-v2"
V1 = DATA / "geneformer-tiny-v1"


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    for f in dest.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    return dest


@pytest.fixture
def v2_copy(tmp_path: Path) -> Path:
    """A writable copy of the V2 fixture: ``checkpoint/`` beside ``dictionaries/``."""
    root = tmp_path / "v2"
    root.mkdir()
    _copy(V2 / "checkpoint", root / "checkpoint")
    _copy(V2 / "dictionaries", root / "dictionaries")
    return root / "checkpoint"


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_v2_fixture_resolves_with_sibling_dictionaries() -> None:
    ckpt = resolve_geneformer_checkpoint(V2 / "checkpoint")
    assert ckpt.version == "V2"
    assert ckpt.model_input_size == 512
    assert (ckpt.pad_id, ckpt.cls_id, ckpt.eos_id) == (0, 2, 3)
    assert ckpt.weights_path.name == "model.safetensors"
    assert ckpt.dictionaries.files["token"].parent == (V2 / "dictionaries").resolve()
    assert ckpt.config.hidden_act == "relu"
    assert set(ckpt.files_sha256) == {
        "config.json",
        "model.safetensors",
        "token_dictionary_gc104M.pkl",
        "gene_median_dictionary_gc104M.pkl",
        "gene_name_id_dict_gc104M.pkl",
        "ensembl_mapping_dict_gc104M.pkl",
    }


def test_load_report_lists_used_and_ignored_keys() -> None:
    model = load_geneformer_model(V2 / "checkpoint")
    report = model.load_report
    assert not model.training
    assert len(report.used) == len(model.state_dict()) == 37
    assert all(k.startswith("bert.") for k in report.used)
    assert report.ignored
    assert all(k.startswith("cls.predictions.") for k in report.ignored)
    assert "ignored" in str(report)
    assert model.checkpoint.version == "V2"


@pytest.mark.parametrize("where", ["inside", "subfolder", "repository"])
def test_dictionary_locations(tmp_path: Path, where: str) -> None:
    if where == "inside":
        ckpt = _copy(V2 / "checkpoint", tmp_path / "model")
        _copy(V2 / "dictionaries", tmp_path / "d")
        for f in (tmp_path / "d").iterdir():
            shutil.copy(f, ckpt / f.name)
    elif where == "subfolder":
        ckpt = _copy(V2 / "checkpoint", tmp_path / "model")
        _copy(V2 / "dictionaries", ckpt / "dictionaries")
    else:  # the Geneformer repository: model folders beside the geneformer/ package
        ckpt = _copy(V2 / "checkpoint", tmp_path / "Geneformer" / "Geneformer-V2-104M")
        _copy(V2 / "dictionaries", tmp_path / "Geneformer" / "geneformer")
    assert resolve_geneformer_checkpoint(ckpt).dictionaries.n_tokens == 1504


def test_repository_layout_picks_the_set_matching_vocab_size(tmp_path: Path) -> None:
    if not V1.is_dir():
        pytest.skip(f"V1 fixture not present at {V1}")
    repo = tmp_path / "Geneformer"
    _copy(V2 / "dictionaries", repo / "geneformer")
    _copy(V1 / "dictionaries", repo / "geneformer" / "gene_dictionaries_30m")
    v1 = resolve_geneformer_checkpoint(_copy(V1 / "checkpoint", repo / "Geneformer-V1-10M"))
    v2 = resolve_geneformer_checkpoint(_copy(V2 / "checkpoint", repo / "Geneformer-V2-104M"))
    assert (v1.version, v1.dictionaries.n_tokens, v1.model_input_size) == ("V1", 1002, 256)
    assert (v2.version, v2.dictionaries.n_tokens) == ("V2", 1504)


def test_explicit_dictionaries(tmp_path: Path) -> None:
    ckpt = _copy(V2 / "checkpoint", tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="no Geneformer dictionaries"):
        resolve_geneformer_checkpoint(ckpt)
    by_folder = resolve_geneformer_checkpoint(ckpt, dictionaries=V2 / "dictionaries")
    loaded = load_geneformer_dictionaries(V2 / "dictionaries")
    by_object = resolve_geneformer_checkpoint(ckpt, dictionaries=loaded)
    assert by_folder.dictionaries == by_object.dictionaries == loaded


def test_version_must_agree(v2_copy: Path) -> None:
    assert resolve_geneformer_checkpoint(v2_copy, version="V2").version == "V2"
    with pytest.raises(ValueError, match=r"version='V1'.*has <cls> and <eos>"):
        resolve_geneformer_checkpoint(v2_copy, version="V1")
    with pytest.raises(ValueError, match="not a Geneformer model series"):
        resolve_geneformer_checkpoint(v2_copy, version="V3")


def test_missing_files_are_refused(v2_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_geneformer_checkpoint(tmp_path / "nowhere")
    (v2_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights file.*training_args\.bin"):
        resolve_geneformer_checkpoint(v2_copy)
    (v2_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        resolve_geneformer_checkpoint(v2_copy)


def test_vocab_mismatch_is_refused(v2_copy: Path) -> None:
    _edit_config(v2_copy, vocab_size=1503)
    with pytest.raises(ValueError, match=r"vocab_size=1503.*1504 tokens"):
        resolve_geneformer_checkpoint(v2_copy)
    with pytest.raises(ValueError, match="has 1504 tokens: they belong to different models"):
        resolve_geneformer_checkpoint(v2_copy, dictionaries=v2_copy.parent / "dictionaries")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "is a BERT"),
        ({"hidden_act": "gelu_new"}, "only relu, gelu"),
        ({"position_embedding_type": "relative_key"}, "only absolute position"),
        ({"num_attention_heads": 5}, "not divisible"),
        ({"is_decoder": True}, "BERT decoder"),
        ({"hidden_size": 0}, "'hidden_size' is 0"),
        ({"hidden_dropout_prob": 1.5}, "in \\[0, 1\\)"),
    ],
)
def test_unsupported_configs_are_refused(v2_copy: Path, changes, message) -> None:
    _edit_config(v2_copy, **changes)
    with pytest.raises(ValueError, match=message):
        resolve_geneformer_checkpoint(v2_copy)


def test_gelu_config_builds_a_gelu_model(v2_copy: Path) -> None:
    _edit_config(v2_copy, hidden_act="gelu")
    model = load_geneformer_model(v2_copy)
    assert model.encoder.layer[0].intermediate.act is torch.nn.functional.gelu
    assert GeneformerConfig.from_dict(model.checkpoint.raw_config).hidden_act == "gelu"


def test_missing_extra_and_misshapen_weights_are_refused(v2_copy: Path) -> None:
    weights = v2_copy / "model.safetensors"
    state = load_file(weights)
    key = "bert.encoder.layer.1.attention.self.key.weight"

    save_file({k: v for k, v in state.items() if k != key}, weights)
    with pytest.raises(ValueError, match=f"missing encoder weights: {key}.*at random"):
        load_geneformer_model(v2_copy)

    save_file({**state, key: torch.zeros(32, 31)}, weights)
    with pytest.raises(ValueError, match=r"has shape \(32, 31\).*expects \(32, 32\)"):
        load_geneformer_model(v2_copy)

    extra = "bert.encoder.layer.2.output.dense.weight"
    save_file({**state, extra: torch.zeros(32, 64)}, weights)
    with pytest.raises(ValueError, match=f"does not have: {extra}.*num_hidden_layers"):
        load_geneformer_model(v2_copy)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pytorch_bin_with_legacy_keys_loads_and_training_args_is_never_read(
    v2_copy: Path, tmp_path: Path
) -> None:
    weights = v2_copy / "model.safetensors"
    state = load_file(weights)
    weights.unlink()
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma"): v for k, v in state.items()}
    legacy["bert.embeddings.position_ids"] = torch.arange(512)[None]
    legacy["bert.pooler.dense.weight"] = torch.zeros(32, 32)
    torch.save(legacy, v2_copy / "pytorch_model.bin")
    marker = tmp_path / "ran"
    (v2_copy / "training_args.bin").write_bytes(pickle.dumps(_RunsCode(marker)))

    model = load_geneformer_model(v2_copy)
    reference = load_geneformer_model(V2 / "checkpoint")
    assert not marker.exists()
    assert model.checkpoint.weights_path.name == "pytorch_model.bin"
    assert "bert.embeddings.position_ids" in model.load_report.ignored
    assert "bert.pooler.dense.weight" in model.load_report.ignored
    assert model.load_report.renamed["bert.embeddings.LayerNorm.gamma"] == (
        "embeddings.LayerNorm.weight"
    )
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickled_objects_in_weights_are_refused(v2_copy: Path, tmp_path: Path) -> None:
    (v2_copy / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    (v2_copy / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _RunsCode(marker)}))
    with pytest.raises(ValueError, match="pickled objects other than tensors"):
        load_geneformer_model(v2_copy)
    assert not marker.exists()


def test_truncated_safetensors_is_refused(v2_copy: Path) -> None:
    weights = v2_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_geneformer_model(v2_copy)
