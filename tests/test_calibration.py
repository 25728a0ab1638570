"""Observers, streaming histograms and the calibration table."""

import json

import numpy as np
import pytest

from vitc.compiler.calib.calibration import (CalibrationTable, Observer, ObserverConfig, TensorObserver, calibrate)
from vitc.compiler.errors import CalibrationDataError


def _observe(chunks):
    ob = TensorObserver()
    for c in chunks:
        ob.update(c)
    return ob


def test_percentile_matches_numpy_within_a_bin():
    rng = np.random.default_rng(0)
    data = rng.standard_normal(200_000).astype(np.float32)
    ob = _observe(np.array_split(data, 10))
    got = ob.amax(ObserverConfig(Observer.PERCENTILE, 99.9))
    want = np.percentile(np.abs(data), 99.9)
    bin_w = ob.hmax / 2048
    assert abs(got - want) <= 2 * bin_w


def test_minmax_is_exact_and_range_grows_while_streaming():
    ob = _observe([np.array([0.1, -0.2], np.float32), np.array([3.0], np.float32), np.array([-50.0], np.float32)])
    assert ob.amax(ObserverConfig(Observer.MINMAX)) == 50.0
    assert ob.hist.sum() == 4 and ob.hmax >= 50.0
    assert ob.min == -50.0 and ob.max == 3.0


def test_entropy_clips_heavy_tails():
    rng = np.random.default_rng(1)
    data = np.concatenate([rng.standard_normal(100_000), [80.0, -90.0]]).astype(np.float32)
    t = _observe([data]).amax(ObserverConfig(Observer.ENTROPY))
    assert 2.0 < t < 60.0, t  # below the lone outliers, above the bulk


def test_mse_trades_clipping_against_rounding():
    rng = np.random.default_rng(1)
    # a long but thin tail: clipping it costs less squared error than the coarser grid it would force
    data = np.concatenate([rng.standard_normal(100_000), rng.uniform(-40, 40, 3)]).astype(np.float32)
    ob = _observe([data])
    t = ob.amax(ObserverConfig(Observer.MSE))
    assert t <= ob.amax(ObserverConfig(Observer.MINMAX))
    # two huge outliers: their clipping error dominates, so MSE keeps (almost) the full range
    big = _observe([np.concatenate([data[:100_000], [80.0, -90.0]]).astype(np.float32)])
    assert big.amax(ObserverConfig(Observer.MSE)) > 60.0


def test_per_channel_absmax_on_last_axis():
    x = np.zeros((2, 5, 3), np.float32)
    x[1, 4, 2] = -7.0
    x[0, 0, 0] = 2.0
    ob = _observe([x])
    np.testing.assert_array_equal(ob.channel_absmax, [2.0, 0.0, 7.0])


def test_nan_in_activations_is_a_clear_error():
    with pytest.raises(CalibrationDataError, match="NaN"):
        _observe([np.array([1.0, np.nan], np.float32)])


def test_calibrate_table_roundtrip_and_reservoir():
    feeds = [{"x": np.full((1, 4), v, np.float32)} for v in (1.0, -3.0, 2.0)]
    res = {}
    table = calibrate(lambda f: {"t": f["x"] * 2}, ["t"], feeds, ObserverConfig(Observer.MINMAX), model_digest="abc",
                      reservoir=res, keep=2)
    assert table.samples == 3 and table.ranges["t"].amax == 6.0
    assert len(res["t"]) == 2
    again = CalibrationTable.from_json(json.loads(table.dumps()))
    assert again.ranges["t"].amax == 6.0 and again.model_digest == "abc"


def test_calibrate_empty_data_is_an_error():
    with pytest.raises(CalibrationDataError, match="empty"):
        calibrate(lambda f: {}, ["t"], [], ObserverConfig(), model_digest="x")
