"""Property-based tests of the argument checks of every runner entry point (issue 23).

The tables the entry points run (``RUNNER_ARGUMENTS``, ``TRAINER_ARGUMENTS``, ...) drive the
tests: every parameter of an entry point must have a check in its table, every check must have
generators here, and for every argument hypothesis draws values that must be accepted (numpy
integers and floats included) and values that must be refused with a TypeError or ValueError
naming the argument (wrong types, strings, NaN and infinities, out of range, bools), first from
the check alone, then through the entry point with its expensive work made to fail the test. A
new argument without a check, or a check without generators, fails a test.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import string
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anndata as ad
import hypothesis.strategies as st
import numpy as np
import pandas as pd
import pytest
import torch
from anndata.tests.helpers import assert_equal
from hypothesis import HealthCheck, given, settings

from scdlkit._shared import arguments
from scdlkit._shared.strategies import NEURAL_STRATEGIES, STRATEGIES
from scdlkit.baselines import _task_runner
from scdlkit.baselines._task_runner import (
    QUERY_ARGUMENTS,
    TASK_RUNNER_ARGUMENTS,
    TaskRunner,
    check_widths,
)
from scdlkit.foundation import LoRAConfig, ScGPTAnnotationRunner, adapt_scgpt_annotation
from scdlkit.foundation import _runner as runner_module
from scdlkit.foundation import _runner_args as runner_args
from scdlkit.foundation._training_settings import (
    SETTING_CHECKS,
    TRAINING_KEYS,
    check_training_overrides,
)
from scdlkit.foundation.models.scgpt._checkpoint import resolve_checkpoint
from scdlkit.training import Trainer
from scdlkit.training import _checks as checks
from scdlkit.training import _trainer as trainer_module

PROPERTY = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
#: Through the entry points (an AnnData copy and compare per example): fewer examples; the checks
#: themselves get the full number above.
THROUGH = settings(PROPERTY, max_examples=10)
CHECKPOINT = Path(__file__).parent / "data" / "scgpt-tiny-flash" / "checkpoint"

# ------------------------------------------------------------------------ the entry points

#: Entry point -> (the table it runs, the callable whose parameters the table must cover).
ENTRY_POINTS: dict[str, tuple[dict[str, Callable], Callable]] = {
    "ScGPTAnnotationRunner": (runner_args.RUNNER_ARGUMENTS, ScGPTAnnotationRunner),
    "ScGPTAnnotationRunner.fit": ({"adata": checks.check_adata}, ScGPTAnnotationRunner.fit),
    "ScGPTAnnotationRunner.predict": (runner_args.PREDICT_ARGUMENTS, ScGPTAnnotationRunner.predict),
    "ScGPTAnnotationRunner.annotate_adata": (
        runner_args.ANNOTATE_ARGUMENTS,
        ScGPTAnnotationRunner.annotate_adata,
    ),
    "ScGPTAnnotationRunner.save": ({"path": checks.check_path}, ScGPTAnnotationRunner.save),
    "ScGPTAnnotationRunner.load": (runner_args.LOAD_ARGUMENTS, ScGPTAnnotationRunner.load),
    "Trainer": (checks.TRAINER_ARGUMENTS, Trainer),
    "TaskRunner": (TASK_RUNNER_ARGUMENTS, TaskRunner),
    "TaskRunner.fit": ({"adata": checks.check_adata}, TaskRunner.fit),
    "TaskRunner.predict": (QUERY_ARGUMENTS, TaskRunner.predict),
    "TaskRunner.encode": (QUERY_ARGUMENTS, TaskRunner.encode),
    "TaskRunner.save": ({"path": checks.check_path}, TaskRunner.save),
    "TaskRunner.load": (
        {"path": checks.check_path, "device": checks.check_device},
        TaskRunner.load,
    ),
    "training=": (SETTING_CHECKS, None),
}
CASES = [(entry, name) for entry, (table, _) in ENTRY_POINTS.items() for name in table]


def _parameters(func: Callable) -> set[str]:
    return set(inspect.signature(func).parameters) - {"self", "cls"}


@pytest.mark.parametrize("entry", [e for e, (_, f) in ENTRY_POINTS.items() if f is not None])
def test_every_parameter_of_every_entry_point_has_a_check(entry):
    table, func = ENTRY_POINTS[entry]
    assert _parameters(func) == set(table), f"{entry}: parameters and checks differ"


def test_every_training_setting_has_a_check():
    assert set(SETTING_CHECKS) == TRAINING_KEYS
    assert set(checks.TRAINING_SETTINGS) <= set(checks.TRAINER_ARGUMENTS)


def test_adapt_passes_every_argument_to_the_runner():
    named = _parameters(adapt_scgpt_annotation) - {"adata", "kwargs"}
    assert named <= set(runner_args.RUNNER_ARGUMENTS)


def test_an_argument_without_a_check_is_a_bug_not_accepted():
    with pytest.raises(RuntimeError, match=r"no argument check for \['new_option'\]"):
        checks.check_arguments({"epochs": checks.TRAINING_SETTINGS["epochs"]}, {"new_option": 1})


# ---------------------------------------------------------------------------- generators

TEXT = st.text(alphabet=string.ascii_letters + string.digits + "_-. /", min_size=1, max_size=8)
OBJECTS = st.sampled_from([object(), [1], {"a": 1}, b"x", (1, 2), np.array([1.0, 2.0])])
BOOLS = st.sampled_from([True, False, np.bool_(True), np.bool_(False)])
NOT_NUMBERS = st.one_of(st.text(max_size=4), st.none(), BOOLS, OBJECTS)
NOT_FINITE = st.sampled_from([math.nan, math.inf, -math.inf, np.float32("nan"), np.float64("inf")])


def _int_forms(n: int) -> st.SearchStrategy:
    forms: list[Any] = [n]
    if -(2**63) <= n < 2**63:
        forms.append(np.int64(n))
    if -(2**31) <= n < 2**31:
        forms.append(np.int32(n))
    if 0 <= n < 2**16:
        forms.append(np.uint16(n))
    return st.sampled_from(forms)


def _ints(lo: int | None = None, hi: int | None = None) -> st.SearchStrategy:
    return st.integers(lo, hi).flatmap(_int_forms)


def _float_forms(x: float) -> st.SearchStrategy:
    forms = [x, np.float64(x)]
    if abs(x) < 1e38:  # float32's range
        forms.append(np.float32(x))
    return st.sampled_from(forms)


def _within(value: Any, keywords: dict[str, Any]) -> bool:
    lo, hi = keywords.get("min_value"), keywords.get("max_value")
    x = float(value)
    if lo is not None and (x < lo or (x == lo and not keywords.get("min_inclusive", True))):
        return False
    return not (
        hi is not None and (x > hi or (x == hi and not keywords.get("max_inclusive", True)))
    )


def _int_values(keywords: dict[str, Any]) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    lo, hi = keywords.get("min_value"), keywords.get("max_value")
    valid = _ints(lo if lo is not None else -(10**6), hi if hi is not None else 10**12)
    outside = []
    if lo is not None:
        outside.append(_ints(None, lo - 1))
    if hi is not None:
        outside.append(_ints(hi + 1, None))
    non_integers = st.one_of(st.floats(), NOT_FINITE, st.sampled_from([2.0, np.float64(3.0)]))
    return valid, st.one_of(NOT_NUMBERS, non_integers, *outside)


def _number_values(keywords: dict[str, Any]) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    lo, hi = keywords.get("min_value"), keywords.get("max_value")
    floats = st.floats(
        min_value=lo,
        max_value=hi,
        exclude_min=lo is not None and not keywords.get("min_inclusive", True),
        exclude_max=hi is not None and not keywords.get("max_inclusive", True),
        allow_nan=False,
        allow_infinity=False,
    )
    ints = _ints(
        math.ceil(lo) if lo is not None else -1000, math.floor(hi) if hi is not None else 1000
    )
    valid = st.one_of(floats.flatmap(_float_forms), ints).filter(lambda v: _within(v, keywords))
    outside = []
    if lo is not None:
        below = st.floats(max_value=lo, allow_nan=False, allow_infinity=False)
        outside.append(below.filter(lambda v: not _within(v, keywords)))
    if hi is not None:
        above = st.floats(min_value=hi, allow_nan=False, allow_infinity=False)
        outside.append(above.filter(lambda v: not _within(v, keywords)))
    return valid, st.one_of(NOT_NUMBERS, NOT_FINITE, *outside)


def _choice_values(choices: tuple) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    others = st.one_of(st.text(max_size=6), st.integers(), st.floats(), BOOLS, st.none())
    return st.sampled_from(choices), others.filter(lambda v: v not in choices)


def _bool_values() -> tuple[st.SearchStrategy, st.SearchStrategy]:
    return BOOLS, st.one_of(_ints(0, 1), st.floats(), st.text(max_size=5), st.none(), OBJECTS)


def _optional(values: tuple) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    valid, invalid = values
    return st.one_of(st.none(), valid), invalid.filter(lambda v: v is not None)


def _small_adata() -> ad.AnnData:
    adata = ad.AnnData(np.ones((3, 2), dtype=np.float32))
    adata.obs_names = ["a", "b", "c"]
    return adata


NOT_TEXT = st.one_of(st.integers(), st.floats(), st.none(), BOOLS, OBJECTS)
TEXT_VALUES = (st.one_of(TEXT, st.text(min_size=1, max_size=5)), st.one_of(st.just(""), NOT_TEXT))
PATH_VALUES = (
    st.one_of(TEXT, TEXT.map(Path)),
    st.one_of(st.just(""), TEXT.map(lambda t: t + "\0"), NOT_TEXT),
)
SETTINGS = st.sampled_from(sorted(TRAINING_KEYS))


def _settings_of(strategy: str, check_values: Callable) -> st.SearchStrategy:
    allowed = sorted(SETTING_CHECKS if strategy is None else _allowed(strategy))
    keys = st.lists(st.sampled_from(allowed), unique=True, max_size=3)
    return keys.flatmap(
        lambda ks: st.fixed_dictionaries({k: check_values(SETTING_CHECKS[k])[0] for k in ks})
    )


def _allowed(strategy: str) -> set[str]:
    from scdlkit.foundation._training_settings import _defaults

    return set(_defaults(strategy))


def _training_values() -> tuple[st.SearchStrategy, st.SearchStrategy]:
    neural = st.sampled_from(sorted(NEURAL_STRATEGIES))
    closed = st.sampled_from(sorted(set(STRATEGIES) - set(NEURAL_STRATEGIES)))
    per_strategy = st.one_of(neural, closed).flatmap(
        lambda s: _settings_of(s, values).map(lambda d: {s: d})
    )
    valid = st.one_of(st.none(), _settings_of(None, values), per_strategy)
    bad_value = SETTINGS.flatmap(lambda k: values(SETTING_CHECKS[k])[1].map(lambda v: {k: v}))
    unknown = TEXT.filter(lambda t: t not in TRAINING_KEYS and t not in STRATEGIES)
    invalid = st.one_of(
        st.sampled_from([[("lr", 1e-3)], "lr=1e-3", 3]),
        unknown.map(lambda t: {t: 1}),
        bad_value,
        neural.map(lambda s: {s: 1e-3}),
        neural.flatmap(lambda s: unknown.map(lambda t: {s: {t: 1}})),
        closed.map(lambda s: {s: {"lr": 1e-3}}),
    )
    return valid, invalid


def _strategy_values() -> tuple[st.SearchStrategy, st.SearchStrategy]:
    names = st.lists(st.sampled_from(STRATEGIES), min_size=1, unique=True)
    valid = st.one_of(st.sampled_from(STRATEGIES), names, names.map(tuple))
    unknown = TEXT.filter(lambda t: t not in STRATEGIES)
    invalid = st.one_of(
        st.sampled_from([[], (), None, 3, {"head"}, ["head", 3]]),
        unknown.map(lambda t: ["head", t]),
        names.map(lambda n: [*n, n[0]]),
    )
    return valid, invalid


CONFIGS = st.one_of(
    st.none(), st.just({}), st.just(LoRAConfig()), st.integers(1, 64).map(lambda r: {"rank": r})
)
NOT_CONFIGS = st.one_of(st.integers(), st.text(max_size=4), st.just([("rank", 4)]), BOOLS)


def _strategy_config_values() -> tuple[st.SearchStrategy, st.SearchStrategy]:
    empty = st.dictionaries(st.sampled_from(STRATEGIES), st.sampled_from([None, {}]), max_size=2)
    lora = st.fixed_dictionaries({"lora": CONFIGS})  # configs of one method belong to it alone
    valid = st.one_of(st.none(), empty, lora)
    invalid = st.one_of(
        NOT_CONFIGS.filter(lambda v: not isinstance(v, dict)),
        st.dictionaries(st.sampled_from(STRATEGIES), NOT_CONFIGS, min_size=1, max_size=2),
        st.sampled_from([{3: {}}, {"": {}}, {None: {}}]),
    )
    return valid, invalid


def _batch_values() -> tuple[st.SearchStrategy, st.SearchStrategy]:
    item = st.one_of(TEXT, _ints(0, 100))
    valid = st.one_of(st.none(), TEXT, st.lists(item, max_size=3), st.lists(TEXT).map(np.array))
    bad_item = st.one_of(st.floats(), st.none(), BOOLS, st.just(["a"]))
    invalid = st.one_of(
        st.integers(),
        st.floats(),
        st.just({"a"}),
        st.just({"a": 1}),
        st.lists(bad_item, min_size=1, max_size=2).map(lambda xs: ["a", *xs]),
    )
    return valid, invalid


def _width_values() -> tuple[st.SearchStrategy, st.SearchStrategy]:
    widths = st.lists(_ints(1, 512), max_size=3)
    valid = st.one_of(widths, widths.map(tuple))
    bad = st.one_of(_ints(None, 0), st.floats(), BOOLS, st.none(), st.text(max_size=2))
    invalid = st.one_of(
        st.sampled_from(["256,128", 256, None, {256: 1}]),
        st.lists(bad, min_size=1, max_size=2).map(lambda xs: [64, *xs]),
    )
    return valid, invalid


def _prediction_values() -> tuple[st.SearchStrategy, st.SearchStrategy]:
    keys = ("label_codes", "labels", "probabilities", "latent")
    full = {k: np.zeros(3) for k in keys}
    partial_dicts = st.sampled_from(keys).map(lambda k: {o: v for o, v in full.items() if o != k})
    return st.sampled_from([None, full]), st.one_of(partial_dicts, NOT_CONFIGS, st.just([full]))


def _device_values() -> tuple[st.SearchStrategy, st.SearchStrategy]:
    valid = st.sampled_from(["auto", "cpu", "cpu:0", torch.device("cpu")])
    bad_text = st.sampled_from(["", "gpu", "cuda:x", "cpu:a", "auto:0", "foo"])
    return valid, st.one_of(bad_text, st.integers(), st.floats(), st.none(), BOOLS, OBJECTS)


def _custom_values() -> dict[Callable, Callable[[], tuple]]:
    """Generators of the entry points' own checks (those not built on the shared ones)."""
    return {
        checks.check_text: lambda: TEXT_VALUES,
        checks.check_optional_text: lambda: _optional(TEXT_VALUES),
        checks.check_path: lambda: PATH_VALUES,
        checks.check_optional_path: lambda: _optional(PATH_VALUES),
        checks.check_adata: lambda: (
            st.sampled_from([_small_adata(), _small_adata()[:2]]),
            st.one_of(NOT_TEXT, st.just(pd.DataFrame({"a": [1]})), st.just(np.ones((2, 2)))),
        ),
        checks.check_device: _device_values,
        checks.check_warmup: lambda: (
            st.one_of(
                _ints(0, 10**6),
                st.floats(0, 1, exclude_max=True).flatmap(_float_forms).filter(lambda v: v < 1),
            ),
            st.one_of(
                _ints(None, -1),
                st.floats(min_value=1),  # a float is a fraction: 1.0 and 2.0 are not steps
                st.floats(max_value=-1e-9),
                NOT_FINITE,
                NOT_NUMBERS,
            ),
        ),
        checks.check_module: lambda: (
            st.just(torch.nn.Linear(2, 2)),
            st.one_of(NOT_TEXT, TEXT),
        ),
        checks.check_precision: lambda: (
            st.sampled_from(["auto", "fp32", "bf16", "32-true", "bf16-mixed", 32, np.int64(32)]),
            st.one_of(st.just(""), st.floats(), st.none(), BOOLS, OBJECTS),
        ),
        # Lightning Fabric refuses a bad value in the Trainer's constructor (tested below)
        checks.check_fabric_option: lambda: (st.sampled_from(["auto"]), st.nothing()),
        runner_args.check_checkpoint: lambda: (
            st.one_of(PATH_VALUES[0], st.just(resolve_checkpoint(CHECKPOINT))),
            PATH_VALUES[1],
        ),
        runner_args.check_strategy_names: _strategy_values,
        runner_args.check_config: lambda: (CONFIGS, NOT_CONFIGS),
        runner_args.check_strategy_configs: _strategy_config_values,
        runner_args.check_batch_names: _batch_values,
        runner_args.check_predictions: _prediction_values,
        check_training_overrides: _training_values,
        check_widths: _width_values,
    }


def test_strategy_configs_accept_numpy_numbers():
    config = LoRAConfig(rank=np.int64(4), alpha=np.float64(8), dropout=np.float32(0.25))
    assert (config.rank, config.alpha, config.dropout) == (4, 8.0, 0.25)
    assert type(config.rank) is int
    assert type(config.dropout) is float
    for bad in (np.bool_(True), np.float64(4.0)):
        with pytest.raises(ValueError, match="rank must be a positive integer"):
            LoRAConfig(rank=bad)


def values(check: Callable) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """(accepted, refused) values of ``check``, read from the check itself where it is a shared
    check bound with :func:`functools.partial`."""
    if isinstance(check, partial):
        func, keywords = check.func, dict(check.keywords)
        if func is checks.check_none_or:
            return _optional(values(keywords["check"]))
        if func in (arguments.check_int, arguments.check_optional_int):
            pair = _int_values(keywords)
            return _optional(pair) if func is arguments.check_optional_int else pair
        if func in (arguments.check_number, arguments.check_optional_number):
            pair = _number_values(keywords)
            return _optional(pair) if func is arguments.check_optional_number else pair
        if func is arguments.check_choice:
            return _choice_values(tuple(keywords["choices"]))
    if check is arguments.check_bool:
        return _bool_values()
    custom = _custom_values()
    if check in custom:
        return custom[check]()
    msg = f"no generators for the check {check!r}: add them to tests/test_validators_property.py"
    raise NotImplementedError(msg)


# ------------------------------------------------------------------- the checks themselves


@pytest.mark.parametrize(("entry", "name"), CASES)
def test_every_check_has_generators(entry, name):
    valid, invalid = values(ENTRY_POINTS[entry][0][name])
    assert isinstance(valid, st.SearchStrategy)
    assert isinstance(invalid, st.SearchStrategy)


def _canonical_type_ok(check: Callable, result: Any) -> bool:
    func = check.func if isinstance(check, partial) else check
    if func is checks.check_none_or:
        return result is None or _canonical_type_ok(check.keywords["check"], result)
    if func in (arguments.check_int, arguments.check_optional_int):
        return result is None or type(result) is int
    if func in (arguments.check_number, arguments.check_optional_number):
        return result is None or type(result) is float
    if func is arguments.check_bool:
        return type(result) is bool
    return True


@pytest.mark.parametrize(("entry", "name"), CASES)
@PROPERTY
@given(data=st.data())
def test_accepted_values_pass_in_their_canonical_type(entry, name, data):
    check = ENTRY_POINTS[entry][0][name]
    value = data.draw(values(check)[0], label=name)
    result = check(name, value)
    assert _canonical_type_ok(check, result), (value, result)


@pytest.mark.parametrize(("entry", "name"), CASES)
@PROPERTY
@given(data=st.data())
def test_refused_values_raise_naming_the_argument(entry, name, data):
    check = ENTRY_POINTS[entry][0][name]
    invalid = values(check)[1]
    if invalid.is_empty:
        return  # a Lightning Fabric option: tested through the Trainer below
    value = data.draw(invalid, label=name)
    with pytest.raises((TypeError, ValueError)) as err:
        check(name, value)
    assert name in str(err.value)


# ----------------------------------------------------------- through the entry points


@contextlib.contextmanager
def _unchanged(adata: ad.AnnData) -> Iterator[None]:
    before = adata.copy()
    try:
        yield
    finally:
        assert_equal(adata, before)


def _refuse(*args: Any, **kwargs: Any) -> None:
    msg = "work started before the arguments were checked"
    raise AssertionError(msg)


@pytest.fixture
def no_work(monkeypatch):
    """Every piece of expensive work of the runners fails the test."""
    from scdlkit.foundation.models.scgpt import _card as scgpt_card

    for name in ("prepare_preflighted", "encode_cells", "encode_adata"):
        monkeypatch.setattr(runner_module, name, _refuse)
    monkeypatch.setattr(scgpt_card, "load_state_dict_file", _refuse)  # the card reads weights
    monkeypatch.setattr(runner_module, "load_runner", _refuse)
    monkeypatch.setattr(runner_module, "save_runner", _refuse)
    monkeypatch.setattr(trainer_module, "Fabric", _refuse)
    monkeypatch.setattr(_task_runner, "read_expression", _refuse)
    monkeypatch.setattr(_task_runner, "read_runner_folder", _refuse)
    monkeypatch.setattr(_task_runner, "write_runner_folder", _refuse)


@pytest.fixture(scope="module")
def cells(_pbmc_raw):
    """A few labelled cells, without the slots that would make each copy slow."""
    part = _pbmc_raw[:20, :50]
    return ad.AnnData(part.X.copy(), obs=part.obs[["bulk_labels"]].copy(), var=part.var[[]].copy())


def _fake_fitted(runner: Any) -> Any:
    """A runner that passes the fitted check; anything past the argument checks fails."""
    runner._fitted = True
    return runner


def _call(entry: str, name: str, value: Any, adata: ad.AnnData) -> None:
    """``entry`` with ``name=value`` and the other arguments valid."""
    runner = partial(ScGPTAnnotationRunner, label_key="bulk_labels", checkpoint=CHECKPOINT)
    task = partial(TaskRunner, model="mlp", label_key="bulk_labels")
    calls = {
        "ScGPTAnnotationRunner": lambda kw: adapt_scgpt_annotation(
            adata, **{"label_key": "bulk_labels", "checkpoint": CHECKPOINT, **kw}
        ),
        "ScGPTAnnotationRunner.fit": lambda kw: runner().fit(**kw),
        "ScGPTAnnotationRunner.predict": lambda kw: _fake_fitted(runner()).predict(
            **{"adata": adata, **kw}
        ),
        "ScGPTAnnotationRunner.annotate_adata": lambda kw: _fake_fitted(runner()).annotate_adata(
            **{"adata": adata, **kw}
        ),
        "ScGPTAnnotationRunner.save": lambda kw: _fake_fitted(runner()).save(**kw),
        "ScGPTAnnotationRunner.load": lambda kw: ScGPTAnnotationRunner.load(
            **{"path": "runner", **kw}
        ),
        "Trainer": lambda kw: Trainer(**{"model": torch.nn.Linear(2, 2), **kw}),
        "TaskRunner": lambda kw: TaskRunner(**{"model": "mlp", "label_key": "bulk_labels", **kw}),
        "TaskRunner.fit": lambda kw: task().fit(**kw),
        "TaskRunner.predict": lambda kw: _fake_fitted(task()).predict(**{"adata": adata, **kw}),
        "TaskRunner.encode": lambda kw: _fake_fitted(task()).encode(**{"adata": adata, **kw}),
        "TaskRunner.save": lambda kw: _fake_fitted(task()).save(**kw),
        "TaskRunner.load": lambda kw: TaskRunner.load(**{"path": "runner", **kw}),
        "training=": lambda kw: adapt_scgpt_annotation(
            adata, label_key="bulk_labels", checkpoint=CHECKPOINT, training=kw
        ),
    }
    calls[entry]({name: value})


ENTRY_CASES = [(e, n) for e, n in CASES if ENTRY_POINTS[e][0][n] is not checks.check_fabric_option]


@pytest.mark.parametrize(("entry", "name"), ENTRY_CASES)
@THROUGH
@given(data=st.data())
def test_entry_points_refuse_before_any_work_and_leave_the_anndata_unchanged(
    entry, name, data, no_work, cells
):
    value = data.draw(values(ENTRY_POINTS[entry][0][name])[1], label=name)
    adata = cells.copy()
    with _unchanged(adata), pytest.raises((TypeError, ValueError)) as err:
        _call(entry, name, value, adata)
    assert name in str(err.value)


#: Other arguments an accepted value needs (a choice that asks for a partner argument).
CONTEXT: dict[tuple[str, str], Callable[[Any], dict[str, Any]]] = {
    ("ScGPTAnnotationRunner", "strategy_configs"): lambda v: {"strategies": STRATEGIES},
    ("ScGPTAnnotationRunner", "lora_config"): lambda v: {"strategies": STRATEGIES},
    ("ScGPTAnnotationRunner", "split_by"): lambda v: {"batch_key": "batch"},
    ("ScGPTAnnotationRunner", "val_size"): lambda v: {
        "test_size": 0.0,
        "calibration_size": 0.0,
        "strategies": ("head",),
    },
    ("ScGPTAnnotationRunner", "test_size"): lambda v: {
        "val_size": 0.0,
        "calibration_size": 0.0,
        "strategies": ("head",),
    },
    ("ScGPTAnnotationRunner", "calibration_size"): lambda v: {
        "val_size": 0.0,
        "test_size": 0.0,
        "strategies": ("head",),
    },
    ("ScGPTAnnotationRunner", "calibration_batches"): lambda v: {"batch_key": "batch"},
    ("ScGPTAnnotationRunner", "random_state"): lambda v: {"n_repeats": 1},
    ("ScGPTAnnotationRunner", "n_repeats"): lambda v: {"random_state": 0},
    ("TaskRunner", "task"): lambda v: {"model": "autoencoder" if v == "representation" else "mlp"},
    ("TaskRunner", "label_key"): lambda v: {"model": "mlp" if v else "autoencoder"},
    ("TaskRunner", "val_size"): lambda v: {"test_size": 0.0},
    ("TaskRunner", "test_size"): lambda v: {"val_size": 0.0},
    ("TaskRunner", "class_weight"): lambda v: {"model": "autoencoder" if v is None else "mlp"},
    ("TaskRunner", "model"): lambda v: {"label_key": "bulk_labels" if v == "mlp" else None},
}
CONSTRUCTORS = {
    "ScGPTAnnotationRunner": lambda kw: ScGPTAnnotationRunner(**{"label_key": "bulk_labels", **kw}),
    "Trainer": lambda kw: Trainer(**{"model": torch.nn.Linear(2, 2), "progress": False, **kw}),
    "TaskRunner": lambda kw: TaskRunner(**{"model": "mlp", "label_key": "bulk_labels", **kw}),
}


@pytest.mark.parametrize(("entry", "name"), [c for c in CASES if c[0] in CONSTRUCTORS])
@THROUGH
@given(data=st.data())
def test_constructors_accept_every_accepted_value(entry, name, data):
    value = data.draw(values(ENTRY_POINTS[entry][0][name])[0], label=name)
    context = CONTEXT.get((entry, name), lambda v: {})(value)
    made = CONSTRUCTORS[entry]({**context, name: value})
    assert made is not None


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("accelerator", "nope", ValueError),
        ("devices", -3, TypeError),
        ("strategy", "nope", ValueError),
    ],
)
def test_lightning_fabric_options_are_refused_when_the_trainer_is_built(option, value, error):
    with pytest.raises(error, match=option):
        Trainer(torch.nn.Linear(2, 2), **{option: value})


def test_a_wrong_type_is_a_type_error_and_a_value_error():
    """As these arguments raised ValueError before their types were checked, a wrong type is
    both, so existing ``except ValueError`` (and the command line's exit code 2) still hold."""
    with pytest.raises(TypeError, match="n_repeats must be an integer") as err:
        ScGPTAnnotationRunner(label_key="bulk_labels", n_repeats="2")
    assert isinstance(err.value, ValueError)
