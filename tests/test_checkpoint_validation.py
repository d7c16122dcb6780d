"""Issue 16, finding 4: a checkpoint folder is checked against one schema before the model is built.

``args.json`` and ``vocab.json`` errors are ValueErrors naming the file and the field; weights the
model built from ``args.json`` would not use are an error, as missing ones are.
"""

from __future__ import annotations

import json

import pytest
import torch

from scdlkit.foundation import load_scgpt_model
from scdlkit.foundation.models.scgpt._checkpoint import ScGPTModelArgs, resolve_checkpoint


def _edit_args(folder, **changes):
    args = json.loads((folder / "args.json").read_text())
    args.update(changes)
    (folder / "args.json").write_text(json.dumps(args))


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("embsize", "32", "must be an integer"),
        ("nheads", 0, "at least 1"),
        ("nlayers", -1, "at least 1"),
        ("d_hid", 64.0, "must be an integer"),
        ("nlayers", True, "must be an integer"),
        ("n_bins", 0, "at least 3"),
        ("n_bins", 1, "at least 3"),
        ("n_bins", 2, "at least 3"),
        ("max_seq_len", 0, "at least 2"),
        ("max_seq_len", 1, "at least 2"),
        ("dropout", 1.5, "in [0, 1)"),
        ("dropout", "0.1", "must be a number"),
        ("pad_token", 3, "must be a string"),
        ("pad_value", "x", "must be a number"),
        ("input_emb_style", "category", "continuous"),
    ],
)
def test_bad_args_field_is_a_value_error_naming_file_and_field(
    checkpoint_copy, field, value, problem
):
    _edit_args(checkpoint_copy, **{field: value})
    with pytest.raises(ValueError, match=field) as info:
        resolve_checkpoint(checkpoint_copy)
    assert str(checkpoint_copy / "args.json") in str(info.value)
    assert problem in str(info.value)


@pytest.mark.parametrize("text", ["[1, 2]", '"args"', "null", "3"])
def test_args_json_must_be_an_object(checkpoint_copy, text):
    (checkpoint_copy / "args.json").write_text(text)
    with pytest.raises(ValueError, match=r"args\.json must hold a JSON object"):
        resolve_checkpoint(checkpoint_copy)


@pytest.mark.parametrize("name", ["args.json", "vocab.json"])
def test_invalid_json_names_the_file(checkpoint_copy, name):
    (checkpoint_copy / name).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON") as info:
        resolve_checkpoint(checkpoint_copy)
    assert str(checkpoint_copy / name) in str(info.value)


def test_pad_token_missing_from_the_vocabulary(checkpoint_copy):
    _edit_args(checkpoint_copy, pad_token="<padding>")
    with pytest.raises(ValueError, match=r"'pad_token' is '<padding>'.*vocab\.json"):
        resolve_checkpoint(checkpoint_copy)


@pytest.mark.parametrize("bad", [True, "3", 1.0])
def test_vocab_ids_must_be_integers_not_booleans(checkpoint_copy, bad):
    vocab = json.loads((checkpoint_copy / "vocab.json").read_text())
    first = next(iter(vocab))
    vocab[first] = bad
    (checkpoint_copy / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="integer id"):
        resolve_checkpoint(checkpoint_copy).vocab  # noqa: B018 (reading it is the test)


@pytest.mark.parametrize("size", ["empty", "truncated"])
def test_truncated_or_empty_weights_name_the_file(checkpoint_copy, size):
    weights = checkpoint_copy / "best_model.pt"
    data = weights.read_bytes()
    weights.write_bytes(b"" if size == "empty" else data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted") as info:
        load_scgpt_model(checkpoint_copy, device="cpu")
    assert str(weights) in str(info.value)


def test_fewer_nlayers_than_the_weights_is_an_error_not_a_silent_drop(checkpoint_copy):
    args = json.loads((checkpoint_copy / "args.json").read_text())
    _edit_args(checkpoint_copy, nlayers=args["nlayers"] - 1)
    with pytest.raises(ValueError, match="does not use") as info:
        load_scgpt_model(checkpoint_copy, device="cpu")
    message = str(info.value)
    assert f"transformer_encoder.layers.{args['nlayers'] - 1}." in message
    assert "nlayers" in message
    assert str(checkpoint_copy / "best_model.pt") in message


def test_more_nlayers_than_the_weights_is_an_error(checkpoint_copy):
    args = json.loads((checkpoint_copy / "args.json").read_text())
    _edit_args(checkpoint_copy, nlayers=args["nlayers"] + 1)
    with pytest.raises(ValueError, match="missing encoder weights"):
        load_scgpt_model(checkpoint_copy, device="cpu")


def test_pretraining_heads_are_still_ignored_and_reported(checkpoint_dir):
    model = load_scgpt_model(checkpoint_dir, device="cpu")
    assert model.load_report.ignored  # decoder.*, mvc_decoder.*, flag_encoder.*
    assert all(
        key.split(".")[0] in {"decoder", "mvc_decoder", "flag_encoder", "cls_decoder"}
        for key in model.load_report.ignored
    )


def test_an_extra_encoder_tensor_is_an_error(checkpoint_copy):
    state = torch.load(checkpoint_copy / "best_model.pt", weights_only=True)
    state["value_encoder.extra.weight"] = torch.zeros(2)
    torch.save(state, checkpoint_copy / "best_model.pt")
    with pytest.raises(ValueError, match=r"value_encoder\.extra\.weight"):
        load_scgpt_model(checkpoint_copy, device="cpu")


def test_from_dict_checks_types_with_the_source_named():
    with pytest.raises(ValueError, match=r"my/args\.json: field 'n_bins'"):
        ScGPTModelArgs.from_dict({"n_bins": 2}, source="my/args.json")
    assert ScGPTModelArgs.from_dict({"nlayers": 4, "lr": 1e-4}).nlayers == 4
