"""Data loading: reference splits, missing-value policy, formats, windows and the error messages users see."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from specctl.core.data_dir import data_dir
from specctl.core.errors import SpecctlError
from specctl.timeseries.data import (
    SPLIT_ENDS,
    Windows,
    count_windows,
    eval_windows,
    load_series,
    resolve_data_file,
    split_bounds,
    synthetic_series,
)
from specctl.timeseries.profile import DataConfig, ExtraTrainSet, SyntheticConfig


def write_csv(path, values: np.ndarray, columns: list[str] | None = None) -> None:
    columns = columns or [f"v{j}" for j in range(values.shape[1])]
    frame = pd.DataFrame(values, columns=columns)
    frame.insert(0, "date", pd.date_range("2020-01-01", periods=len(values), freq="h"))
    frame.to_csv(path, index=False)


def ramp(rows: int, cols: int) -> np.ndarray:
    return np.arange(rows * cols, dtype=np.float64).reshape(rows, cols) % 97 + np.arange(cols)


# --- real benchmark files -------------------------------------------------------------------------


def test_etth1_reference_split_and_window_counts(data_dir):
    lookback = 672
    data = load_series(DataConfig(name="ETTh1", dir=str(data_dir), lookback=lookback), lookback + 720)
    assert data.n_vars == 7 and data.columns[-1] == "OT"
    assert (len(data.train), len(data.val), len(data.test)) == (8640, 2880 + lookback, 2880 + lookback)
    counts = [count_windows(len(data.test), lookback + h) for h in (96, 192, 336, 720)]
    assert counts == [2785, 2689, 2545, 2161]
    contexts, targets = eval_windows(data.test, lookback, 96)
    assert contexts.shape == (2785, lookback, 7) and targets.shape == (2785, 96, 7)
    # Val/test only borrow the lookback from the split before; their target rows are their own.
    assert np.array_equal(data.val[:lookback], data.train[-lookback:])
    assert np.array_equal(data.test[:lookback], data.val[-lookback:])
    assert split_bounds(17420, lookback, SPLIT_ENDS["ett-hourly"]) == [(0, 8640), (7968, 11520), (10848, 14400)]
    assert np.allclose(data.train.mean(0), 0, atol=1e-4) and np.allclose(data.train.std(0), 1, atol=1e-4)
    assert any("unused" in note for note in data.notes)


def test_ettm1_every_4_adds_etth1_and_three_shifted_copies(data_dir):
    if not (data_dir / "ETTm1.csv").is_file():
        pytest.skip(f"ETTm1.csv not in {data_dir}")
    cfg = DataConfig(name="ETTh1", dir=str(data_dir), extra_train=[ExtraTrainSet(name="ETTm1", every=4)])
    data = load_series(cfg, 672 + 720, extra_train=True)
    assert [len(a) for a in data.extra_train] == [8640] * 4  # ETTm1's train split covers ETTh1's 12 months
    # ETTm1 at phase 0 is ETTh1 row for row; the scalers differ slightly (fitted on all 15-minute rows)
    raw_h = data.train * data.std + data.mean
    assert np.corrcoef(raw_h[:, -1], data.extra_train[0][:, -1])[0, 1] > 0.9999
    assert not np.allclose(data.extra_train[0], data.extra_train[1])
    assert "data.extra_train: 28996 more training windows from 4 series" in data.notes[-1]
    assert load_series(cfg, 672 + 720).extra_train == []  # only training commands load them


def test_weather_sentinels_interpolated(data_dir):
    if not (data_dir / "weather.csv").is_file():
        pytest.skip(f"weather.csv not in {data_dir}")
    data = load_series(DataConfig(name="weather", dir=str(data_dir), lookback=96), 96 + 96)
    raw = np.concatenate([data.train, data.val, data.test]) * data.std + data.mean
    assert np.isfinite(raw).all() and raw.min() > -9000
    assert data.n_vars == 21 and len(data.train) == int(52696 * 0.7)
    (note,) = data.notes
    assert "81 missing values" in note and "OT 50" in note and "interpolation" in note


# --- missing values ---------------------------------------------------------------------------------


def test_interpolation_is_linear_with_nearest_edges(tmp_path):
    values = ramp(100, 2)
    values[[0, 10, 11], 0] = [np.nan, -9999, np.nan]
    write_csv(tmp_path / "gaps.csv", values)
    data = load_series(DataConfig(path=str(tmp_path / "gaps.csv"), lookback=4), 8)
    raw = np.concatenate([data.train, data.val[4:], data.test[4:]]) * data.std + data.mean
    clean = ramp(100, 2)
    assert raw[0, 0] == pytest.approx(clean[1, 0], rel=1e-5)
    assert raw[10:12, 0] == pytest.approx(clean[9, 0] + (clean[12, 0] - clean[9, 0]) * np.array([1, 2]) / 3, rel=1e-5)
    assert data.notes == ["gaps.csv: 3 missing values (NaN or -9999) replaced by linear interpolation: v0 3"]


def test_missing_error_policy_names_file_column_count(tmp_path):
    values = ramp(100, 2)
    values[5:9, 1] = -9999
    write_csv(tmp_path / "s.csv", values, ["a", "OT"])
    with pytest.raises(SpecctlError, match=r"s\.csv: 4 missing values .* OT 4"):
        load_series(DataConfig(path=str(tmp_path / "s.csv"), missing="error", lookback=4), 8)


def test_all_missing_column_is_an_error(tmp_path):
    values = ramp(100, 2)
    values[:, 1] = np.nan
    write_csv(tmp_path / "e.csv", values, ["a", "dead"])
    with pytest.raises(SpecctlError, match="dead have no valid value"):
        load_series(DataConfig(path=str(tmp_path / "e.csv"), lookback=4), 8)


# --- synthetic --------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_split_70_10_20():
    cfg = SyntheticConfig(n_vars=4, length=2000, seed=3)
    first = synthetic_series(cfg)
    assert first.shape == (2000, 4) and first.dtype == np.float32 and np.isfinite(first).all()
    assert np.array_equal(first, synthetic_series(cfg))
    assert not np.allclose(first, synthetic_series(cfg.model_copy(update={"seed": 4})))
    data = load_series(DataConfig(lookback=48, synthetic=cfg), 96)
    assert data.name == "synthetic" and data.columns == ["x0", "x1", "x2", "x3"]
    assert (len(data.train), len(data.val), len(data.test)) == (1400, 200 + 48, 400 + 48)


def test_synthetic_has_the_configured_period():
    series = synthetic_series(SyntheticConfig(n_vars=1, length=2400, periods=[24.0], trend=0.0, noise=0.05))[:, 0]
    spectrum = np.abs(np.fft.rfft(series - series.mean()))
    assert 2400 / spectrum.argmax() == pytest.approx(24.0)


# --- other formats ----------------------------------------------------------------------------------


def test_solar_txt_round_trip(tmp_path):
    values = ramp(300, 5)
    np.savetxt(tmp_path / "solar_AL.txt", values, delimiter=",", fmt="%.3f")
    data = load_series(DataConfig(name="solar_AL", dir=str(tmp_path), lookback=24), 48)
    assert data.name == "solar_AL" and data.columns == ["0", "1", "2", "3", "4"]
    assert np.allclose(data.test * data.std + data.mean, values[300 - 60 - 24 :], atol=1e-3)


def test_pems_npz_uses_feature_zero(tmp_path):
    rng = np.random.default_rng(0)
    cube = rng.normal(size=(400, 6, 3)).astype(np.float32)
    np.savez(tmp_path / "PEMS08.npz", data=cube)
    data = load_series(DataConfig(path=str(tmp_path / "PEMS08.npz"), lookback=12), 24)
    assert data.name == "PEMS08" and data.n_vars == 6
    assert np.allclose(data.train * data.std + data.mean, cube[:280, :, 0], atol=1e-5)


# --- file lookup --------------------------------------------------------------------------------------


def test_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECCTL_DATA_DIR", str(tmp_path / "env"))
    assert data_dir(DataConfig(dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    assert data_dir(DataConfig()) == tmp_path / "env"
    monkeypatch.delenv("SPECCTL_DATA_DIR")
    assert data_dir(DataConfig()) is None


def test_resolve_by_file_name(tmp_path):
    write_csv(tmp_path / "mine.csv", ramp(10, 1))
    assert resolve_data_file(DataConfig(name="mine", dir=str(tmp_path))) == tmp_path / "mine.csv"
    assert resolve_data_file(DataConfig(name="mine.csv", dir=str(tmp_path))) == tmp_path / "mine.csv"


# --- bad input ----------------------------------------------------------------------------------------


def test_missing_file_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("SPECCTL_DATA_DIR", raising=False)
    with pytest.raises(SpecctlError, match=r"looked in: .*ETTh1\.csv .*data\.dir.*SPECCTL_DATA_DIR"):
        load_series(DataConfig(name="ETTh1", dir=str(tmp_path)), 8)
    with pytest.raises(SpecctlError, match="no data directory is set: set data.dir .* or SPECCTL_DATA_DIR"):
        load_series(DataConfig(name="ETTh1"), 8)
    with pytest.raises(SpecctlError, match=r"data file not found: .*nope\.csv \(from data\.path\)"):
        load_series(DataConfig(path=str(tmp_path / "nope.csv")), 8)


def test_non_numeric_columns_are_named(tmp_path):
    frame = pd.DataFrame({"date": ["d"] * 50, "x": np.arange(50.0), "label": ["a"] * 50})
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(SpecctlError, match=r"t\.csv: non-numeric column\(s\) label"):
        load_series(DataConfig(path=str(tmp_path / "t.csv"), lookback=4), 8)


def test_too_few_rows_names_the_split(tmp_path):
    write_csv(tmp_path / "short.csv", ramp(100, 2))
    with pytest.raises(SpecctlError, match="the val split .* has 14 rows but a window needs 20"):
        load_series(DataConfig(path=str(tmp_path / "short.csv"), lookback=4), 20)
    with pytest.raises(SpecctlError, match="the train split has 70 rows, fewer than data.lookback 80"):
        load_series(DataConfig(path=str(tmp_path / "short.csv"), lookback=80), 8)


def test_truncated_ett_file_is_an_error(tmp_path):
    write_csv(tmp_path / "ETTh1.csv", ramp(1000, 7))
    with pytest.raises(SpecctlError, match="1000 rows, but the ETT hourly borders .* split needs 14400"):
        load_series(DataConfig(name="ETTh1", dir=str(tmp_path), lookback=4), 8)


def test_unknown_format_and_bad_npz(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(SpecctlError, match=r"unknown data format '\.parquet' \(expected \.csv, \.txt or \.npz\)"):
        load_series(DataConfig(path=str(tmp_path / "x.parquet")), 8)
    np.savez(tmp_path / "p.npz", speed=np.zeros((10, 2)))
    with pytest.raises(SpecctlError, match="has no 'data' array \\(found: speed\\)"):
        load_series(DataConfig(path=str(tmp_path / "p.npz")), 8)


def test_unparsable_file_is_one_line_error(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    for name in ("empty.csv", "broken.npz"):
        with pytest.raises(SpecctlError, match=f"{name}: cannot read as") as info:
            load_series(DataConfig(path=str(tmp_path / name)), 8)
        assert "\n" not in str(info.value)


# --- windows ------------------------------------------------------------------------------------------


def test_extra_train_phases_scaling_and_errors(tmp_path):
    write_csv(tmp_path / "main.csv", ramp(100, 3))
    write_csv(tmp_path / "more.csv", 5.0 + 2.0 * ramp(300, 3))
    extra = ExtraTrainSet(name="more", path=str(tmp_path / "more.csv"), every=3)
    cfg = DataConfig(name="main", path=str(tmp_path / "main.csv"), lookback=8, extra_train=[extra])
    data = load_series(cfg, 12, extra_train=True)
    assert [a.shape for a in data.extra_train] == [(70, 3)] * 3  # 70% of 300 rows, every 3rd row, 3 phases
    phases = np.stack(data.extra_train, axis=1).reshape(210, 3)  # interleaved back into time order
    assert np.allclose(phases.mean(0), 0, atol=1e-5) and np.allclose(phases.std(0), 1, atol=1e-5)  # own scaler
    assert data.val.shape == (10 + 8, 3) and data.test.shape == (20 + 8, 3)  # val/test are the main set's only

    write_csv(tmp_path / "wide.csv", ramp(300, 4))
    wide = cfg.model_copy(update={"extra_train": [ExtraTrainSet(name="wide", path=str(tmp_path / "wide.csv"))]})
    with pytest.raises(SpecctlError, match=r"data.extra_train\[0\] \('wide'\) has 4 variables; the main dataset has 3"):
        load_series(wide, 12, extra_train=True)
    gappy = ramp(300, 3)
    gappy[5, 1] = -9999.0
    write_csv(tmp_path / "gappy.csv", gappy)
    noted = cfg.model_copy(update={"extra_train": [ExtraTrainSet(name="gappy", path=str(tmp_path / "gappy.csv"))]})
    assert any("gappy.csv: 1 missing values" in note for note in load_series(noted, 12, extra_train=True).notes)
    sparse = cfg.model_copy(update={"extra_train": [extra.model_copy(update={"every": 20})]})
    with pytest.raises(SpecctlError, match="10 per phase at every = 20, fewer than one training window"):
        load_series(sparse, 12, extra_train=True)


def test_eval_windows_all_and_subset():
    array = np.arange(60, dtype=np.float32).reshape(30, 2)
    contexts, targets = eval_windows(array, 8, 4)
    assert contexts.shape == (19, 8, 2) and targets.shape == (19, 4, 2) and contexts.dtype == torch.float32
    assert torch.equal(targets[3, 0], torch.tensor(array[3 + 8]))
    sub_c, sub_t = eval_windows(array, 8, 4, max_windows=5)
    starts = (sub_c[:, 0, 0] / 2).long().tolist()
    assert starts == [0, 4, 9, 13, 18]  # evenly spaced, first and last included
    assert torch.equal(sub_t, targets[starts])
    assert torch.equal(eval_windows(array, 8, 4, max_windows=5)[0], sub_c)
    assert eval_windows(array, 8, 4, max_windows=100)[0].shape[0] == 19
    assert eval_windows(array, 8, 4, max_windows=1)[0][0, 0, 0] == 0
    with pytest.raises(SpecctlError, match="30 rows cannot hold one window of lookback 20 \\+ horizon 11"):
        eval_windows(array, 20, 11)


def test_windows_dataset():
    array = np.arange(20, dtype=np.float32).reshape(10, 2)
    windows = Windows(array, 4, stride=3)
    assert len(windows) == 3 and count_windows(10, 4) == 7 and count_windows(3, 4) == 0
    assert windows[1].shape == (4, 2) and windows[1][0, 0] == 6 and windows[-1][0, 0] == 12
    with pytest.raises(IndexError):
        windows[3]
    assert len(Windows(array, 4)) == 7 and len(Windows(array, 11)) == 0

