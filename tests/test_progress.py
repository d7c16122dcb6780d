"""Progress bars pick notebook widgets only when ipywidgets can draw them."""

from __future__ import annotations

import importlib.util
import warnings

import tqdm.auto
import tqdm.std

from scdlkit._shared import progress as _progress


def test_text_bar_without_ipywidgets(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ipywidgets" else real(name)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bar = _progress.tqdm(range(3), disable=True)
    assert type(bar) is tqdm.std.tqdm
    assert list(bar) == [0, 1, 2]


def test_auto_bar_with_ipywidgets(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "ipywidgets" else real(name),
    )
    bar = _progress.tqdm(range(2), disable=True)
    assert isinstance(bar, tqdm.auto.tqdm)
    assert list(bar) == [0, 1]
