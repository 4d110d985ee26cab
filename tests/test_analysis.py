"""Scores of geodiff.analysis: hand-computed values, reference libraries, statistics."""

from __future__ import annotations

import json

import numpy as np
import properscoring
import pytest
import scoringrules
import xarray as xr

from geodiff import analysis as an


def field(values, lat=(0.0,), lon=(0.0,), dims=("lat", "lon"), name="tas", **coords):
    """DataArray with lat/lon coordinates (and any sample coords) from nested values."""
    values = np.asarray(values, dtype=np.float64)
    c = {"lat": np.asarray(lat), "lon": np.asarray(lon), **coords}
    return xr.DataArray(values, dims=dims, coords={k: v for k, v in c.items() if k in dims},
                        name=name, attrs={"units": "K"})


def random_case(rng, m=8, shape=(3, 5, 6), obs_shift=0.0):
    """Ensemble (member, time, lat, lon) and obs (time, lat, lon) of iid normals."""
    t, ny, nx = shape
    coords = {"time": np.arange(t), "lat": np.linspace(-40, 50, ny),
              "lon": np.linspace(0, 350, nx)}
    ens = xr.DataArray(rng.normal(size=(m, t, ny, nx)), dims=("member", "time", "lat", "lon"),
                       coords=coords, name="tas", attrs={"units": "K"})
    obs = xr.DataArray(rng.normal(size=shape) + obs_shift, dims=("time", "lat", "lon"),
                       coords=coords, name="tas", attrs={"units": "K"})
    return ens, obs


# --------------------------------------------------------------------------------------
# CRPS: by hand and against properscoring / scoringrules


# M = 2, x = (1, 3), y = 2: mean|x - y| = 1; sum_{i,j}|x_i - x_j| = 2 * 2 = 4
#   fair 1 - 4 / (2*2*1) = 0;   ordinary 1 - 4 / (2*4) = 0.5
# M = 3, x = (1, 2, 4), y = 2.5: mean|x - y| = 3.5 / 3 = 7/6; pair sum 2 * (1 + 3 + 2) = 12
#   fair 7/6 - 12/12 = 1/6;     ordinary 7/6 - 12/18 = 1/2
# M = 3, x = (0, 1, 2), y = 5: mean|x - y| = 4; pair sum 2 * (1 + 2 + 1) = 8
#   fair 4 - 8/12 = 10/3;       ordinary 4 - 8/18 = 32/9
@pytest.mark.parametrize("members, y, fair, ordinary", [
    ([1.0, 3.0], 2.0, 0.0, 0.5),
    ([1.0, 2.0, 4.0], 2.5, 1 / 6, 1 / 2),
    ([2.0, 0.0, 1.0], 5.0, 10 / 3, 32 / 9),
])
def test_crps_by_hand(members, y, fair, ordinary):
    ens = field(np.reshape(members, (-1, 1, 1)), dims=("member", "lat", "lon"))
    obs = field([[y]])
    assert float(an.crps_fair(ens, obs).squeeze()) == pytest.approx(fair, abs=1e-12)
    assert float(an.crps_ensemble(ens, obs).squeeze()) == pytest.approx(ordinary, abs=1e-12)


def test_crps_two_grid_points_weighted_by_hand():
    # lat 0 and 60: cos = (1, 0.5), normalised to mean 1 -> (4/3, 2/3).
    # point 1: x=(1,3), y=2 -> fair 0;  point 2: x=(1,2,4)... M must match, so x=(0,4), y=0:
    #   mean|x-y| = 2, pair sum 8, fair 2 - 8/4 = 0 -> use y=5: mean|x-y| = 3, fair 3-2 = 1.
    ens = field([[[1.0], [0.0]], [[3.0], [4.0]]], lat=(0.0, 60.0), dims=("member", "lat", "lon"))
    obs = field([[2.0], [5.0]], lat=(0.0, 60.0))
    crps = an.crps_fair(ens, obs)
    np.testing.assert_allclose(crps.values.ravel(), [0.0, 1.0], atol=1e-12)
    # weighted mean (4/3 * 0 + 2/3 * 1) / 2 = 1/3
    assert float(an.weighted_mean(crps)) == pytest.approx(1 / 3, abs=1e-12)


@pytest.mark.parametrize("m", [1, 2, 7, 20])
def test_crps_ensemble_matches_properscoring(m):
    ens, obs = random_case(np.random.default_rng(m), m=m, obs_shift=0.5)
    expected = properscoring.crps_ensemble(obs.values, ens.transpose(..., "member").values)
    np.testing.assert_allclose(an.crps_ensemble(ens, obs).values, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("m", [2, 7, 20])
def test_crps_fair_matches_scoringrules(m):
    ens, obs = random_case(np.random.default_rng(10 + m), m=m)
    expected = scoringrules.crps_ensemble(obs.values, ens.transpose(..., "member").values,
                                          m_axis=-1, estimator="fair")
    np.testing.assert_allclose(an.crps_fair(ens, obs).values, expected, rtol=0, atol=1e-6)


def test_one_member_crps_is_absolute_error():
    ens, obs = random_case(np.random.default_rng(3), m=1)
    mae = abs(ens.isel(member=0) - obs)
    np.testing.assert_allclose(an.crps_ensemble(ens, obs).values, mae.values, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2 members"):
        an.crps_fair(ens, obs)


def test_crps_skill_and_float32_input():
    ens, obs = random_case(np.random.default_rng(4), m=6)
    ref = ens + 1.0  # a biased reference is worse
    skill = float(an.crps_skill(ens, obs, ref))
    ratio = float(an.weighted_mean(an.crps_fair(ens, obs))
                  / an.weighted_mean(an.crps_fair(ref, obs)))
    assert skill == pytest.approx(1 - ratio, abs=1e-12)
    assert 0 < skill < 1
    c32 = an.crps_fair(ens.astype(np.float32) + 280, obs.astype(np.float32) + 280)
    c64 = an.crps_fair(ens.astype(np.float32).astype(float) + 280,
                       obs.astype(np.float32).astype(float) + 280)
    np.testing.assert_allclose(c32.values, c64.values, atol=2e-5)


# --------------------------------------------------------------------------------------
# moments, weights, rank histogram, energy score, spectra by hand


def test_bias_rmse_spread_skill_by_hand():
    # lat 0 and 60 -> weights (4/3, 2/3); members (a, b) per point, obs y
    # lat 0: members (0, 2), mean 1, var 2, y 0 -> err 1
    # lat 60: members (4, 4), mean 4, var 0, y 0 -> err 4
    ens = field([[[0.0], [4.0]], [[2.0], [4.0]]], lat=(0.0, 60.0), dims=("member", "lat", "lon"))
    obs = field([[0.0], [0.0]], lat=(0.0, 60.0))
    # bias: (4/3 * 1 + 2/3 * 4) / 2 = 2;   mse: (4/3 * 1 + 2/3 * 16) / 2 = 6
    assert float(an.weighted_bias(ens, obs)) == pytest.approx(2.0)
    assert float(an.weighted_rmse(ens, obs)) == pytest.approx(np.sqrt(6.0))
    # mean var: (4/3 * 2 + 0) / 2 = 4/3; ratio sqrt(3/2) sqrt(4/3) / sqrt(6) = sqrt(1/3)
    assert float(an.spread_skill_ratio(ens, obs)) == pytest.approx(np.sqrt(1 / 3))


def test_weighted_mean_grid_then_fields_skips_nan():
    # field 0: values (1, 4) at lat (0, 60) -> (4/3*1 + 2/3*4)/2 = 2
    # field 1: values (3, NaN) -> 3 (the masked point carries no weight); mean over fields 2.5
    x = field([[[1.0], [4.0]], [[3.0], [np.nan]]], lat=(0.0, 60.0), dims=("time", "lat", "lon"),
              time=[0, 1])
    assert float(an.weighted_mean(x)) == pytest.approx(2.5)
    np.testing.assert_allclose(an.weighted_mean(x, ["lat", "lon"]).values, [2.0, 3.0])
    np.testing.assert_allclose(an.lat_weights(x).values, [4 / 3, 2 / 3])


def test_summaries_by_hand():
    ens = field(np.reshape([1.0, 2.0, 3.0, 4.0], (4, 1, 1)), dims=("member", "lat", "lon"))
    assert float(an.ensemble_mean(ens).squeeze()) == 2.5
    assert float(an.ensemble_spread(ens).squeeze()) == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert float(an.exceedance_probability(ens, 2.5).squeeze()) == 0.5
    assert float(an.exceedance_probability(ens, 1.5, below=True).squeeze()) == 0.25
    assert int(an.exceedance_count(ens, 1.5).squeeze()) == 3
    assert float(an.empirical_return_period(ens, 3.5).squeeze()) == 4.0
    assert np.isinf(float(an.empirical_return_period(ens, 9.0).squeeze()))
    q = an.ensemble_quantiles(ens, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(q.values.ravel(), [1.0, 2.5, 4.0])


def test_rank_histogram_by_hand_and_ties():
    # member values (0, 1, 2): y = 1.5 -> rank 2; y = 5 -> rank 3; y = -1 -> rank 0
    ens = field(np.broadcast_to(np.reshape([0.0, 1.0, 2.0], (3, 1, 1)), (3, 1, 3)),
                lon=(0.0, 1.0, 2.0), dims=("member", "lat", "lon"))
    obs = field([[1.5, 5.0, -1.0]], lon=(0.0, 1.0, 2.0))
    counts = an.rank_histogram(ens, obs, np.random.default_rng(0))
    np.testing.assert_array_equal(counts.values, [1, 0, 1, 1])
    # every member equal to y: the rank is uniform on 0..M; with N = 4000 ranks over 4 bins a
    # bin's relative standard error is sqrt(3/4000) = 0.027; allow 4 standard errors
    n = 4000
    ens_tied = field(np.zeros((3, 1, n)), lon=np.arange(n), dims=("member", "lat", "lon"))
    obs_tied = field(np.zeros((1, n)), lon=np.arange(n))
    tied = an.rank_histogram(ens_tied, obs_tied, np.random.default_rng(1)).values
    assert tied.sum() == n
    assert np.abs(tied / (n / 4) - 1).max() < 4 * np.sqrt(3 / n)
    again = an.rank_histogram(ens_tied, obs_tied, np.random.default_rng(1)).values
    np.testing.assert_array_equal(tied, again)  # the Generator makes ties reproducible
    with pytest.raises(TypeError, match="Generator"):
        an.rank_histogram(ens, obs, 0)


def test_energy_score_one_point_is_crps_and_matches_scoringrules():
    ens, obs = random_case(np.random.default_rng(5), m=5, shape=(4, 1, 1))
    np.testing.assert_allclose(an.energy_score(ens, obs).values.ravel(),
                               an.crps_fair(ens, obs).values.ravel(), atol=1e-12)
    ens, obs = random_case(np.random.default_rng(6), m=5, shape=(4, 3, 4))
    # ||v|| = sqrt(sum w v^2 / sum w): scale every point by sqrt(w / sum w), then plain norm
    w = an.lat_weights(obs).broadcast_like(obs.isel(time=0))
    scale = np.sqrt(w / w.sum()).values.ravel()  # (lat * lon,)
    fct = ens.transpose("time", "member", "lat", "lon").values.reshape(4, 5, -1) * scale
    y = obs.values.reshape(4, -1) * scale
    expected = scoringrules.es_ensemble(y, fct, estimator="fair")
    np.testing.assert_allclose(an.energy_score(ens, obs).values, expected, atol=1e-6)


def test_spectrum_of_a_sinusoid_and_relative_error():
    # x_j = 2 cos(2 pi 3 j / n): rfft at k = 3 is 2 * n / 2 = n -> power n^2, 0 elsewhere
    n = 16
    lon = np.arange(n) * 360.0 / n
    wave = 2 * np.cos(2 * np.pi * 3 * np.arange(n) / n)
    obs = field(np.stack([wave, wave]), lat=(10.0, 20.0), lon=lon)
    power = an.zonal_power_spectrum(obs)
    assert power.sizes["wavenumber"] == n // 2 + 1
    assert float(power.sel(wavenumber=3)) == pytest.approx(n**2)
    assert float(abs(power.drop_sel(wavenumber=3)).max()) < 1e-20
    # members = 2 x truth: power ratio exactly 4 at every wavenumber -> relative error 3
    ens_obs, obs_r = random_case(np.random.default_rng(7), m=3, shape=(2, 4, 12))
    doubled = 2 * obs_r.expand_dims(member=3)
    assert float(an.spectra_relative_error(doubled, obs_r)) == pytest.approx(3.0)
    assert float(an.spectra_relative_error(obs_r.expand_dims(member=2), obs_r)) == pytest.approx(
        0.0, abs=1e-12)


# --------------------------------------------------------------------------------------
# statistics of an exchangeable ensemble


def test_exchangeable_ensemble_is_calibrated():
    # members and obs iid N(0, 1): N = 20 fields x 20 x 50 points = 20000 independent ranks
    m, shape = 9, (20, 20, 50)
    rng = np.random.default_rng(2024)
    coords = {"time": np.arange(20), "lat": np.linspace(-30, 30, 20),
              "lon": np.linspace(0, 358, 50)}
    ens = xr.DataArray(rng.normal(size=(m, *shape)), dims=("member", "time", "lat", "lon"),
                       coords=coords)
    obs = xr.DataArray(rng.normal(size=shape), dims=("time", "lat", "lon"), coords=coords)
    n = obs.size
    counts = an.rank_histogram(ens, obs, rng)
    assert int(counts.sum()) == n and counts.sizes["rank"] == m + 1
    max_dev, tol = an.rank_histogram_flatness(counts)
    assert tol == pytest.approx(np.sqrt(m / n))
    # max over 10 bins of |z|: P(any |z| > 4) < 10 * 6.3e-5
    assert max_dev < 4 * tol
    # ratio = sqrt(A / B): relative SE ~ 0.5 sqrt(2/N + 2/((M-1) N)) = 0.0053 (weights in
    # 0.87..1 barely change N_eff); allow 5 standard errors
    assert float(an.spread_skill_ratio(ens, obs)) == pytest.approx(1.0, abs=5 * 0.0053)
    # fair CRPS is unbiased for CRPS(N(0,1), y ~ N(0,1)) = 1/sqrt(pi) = 0.564 whatever M;
    # the ordinary one with M = 2 has expectation 1.5/sqrt(pi). Per-point sd < 0.6, SE <
    # 0.6/sqrt(N) = 0.0042: 5 SE = 0.021
    two = ens.isel(member=[0, 1])
    assert float(an.weighted_mean(an.crps_fair(two, obs))) == pytest.approx(
        1 / np.sqrt(np.pi), abs=0.021)
    assert float(an.weighted_mean(an.crps_ensemble(two, obs))) == pytest.approx(
        1.5 / np.sqrt(np.pi), abs=0.021)


# --------------------------------------------------------------------------------------
# errors, coordinates, dask


def test_missing_member_dim_is_a_clear_error():
    _, obs = random_case(np.random.default_rng(8))
    for func in (an.crps_fair, an.crps_ensemble, an.spread_skill_ratio, an.evaluate):
        with pytest.raises(ValueError, match=r"no 'member' dimension.*'time', 'lat', 'lon'.*"
                                             r"rename"):
            func(obs, obs)


def test_mismatched_inputs_are_clear_errors():
    ens, obs = random_case(np.random.default_rng(9))
    with pytest.raises(ValueError, match="coordinate 'lat' differs"):
        an.evaluate(ens, obs.assign_coords(lat=obs.lat + 1.0))
    with pytest.raises(ValueError, match="different dims"):
        an.crps_skill(ens, obs, ens.isel(time=0))
    with pytest.raises(ValueError, match="size"):
        an.evaluate(ens, obs.isel(time=[0, 1]))
    with pytest.raises(ValueError, match="obs has a 'member' dimension"):
        an.rank_histogram(ens, ens, np.random.default_rng(0))
    with pytest.raises(ValueError, match="variable 'pr' not in ens"):
        an.evaluate(ens, obs, variables=["pr"])


@pytest.mark.parametrize("lat_name, lon_name, attrs", [
    ("latitude", "longitude", {}),
    ("LAT", "LON", {}),
    ("nj", "ni", {"units": ("degrees_north", "degrees_east")}),
    ("row", "col", {"standard_name": ("latitude", "longitude")}),
])
def test_lat_lon_dims_found_by_cf_attrs_or_names(lat_name, lon_name, attrs):
    da = xr.DataArray(np.zeros((2, 3, 4)), dims=("member", lat_name, lon_name),
                      coords={lat_name: [0.0, 60.0, 70.0], lon_name: np.arange(4.0)})
    for key, (lat_value, lon_value) in attrs.items():
        da[lat_name].attrs[key] = lat_value
        da[lon_name].attrs[key] = lon_value
    assert an.lat_lon_dims(da) == (lat_name, lon_name)
    assert an.sample_dims(da) == []


def test_no_latitude_is_a_clear_error():
    da = xr.DataArray(np.zeros((2, 3)), dims=("a", "b"))
    with pytest.raises(ValueError, match="no latitude dimension.*standard_name='latitude'"):
        an.lat_lon_dims(da)


def test_dask_gives_the_same_numbers_as_numpy():
    ens, obs = random_case(np.random.default_rng(11), m=6, shape=(12, 5, 8))
    ens_d = ens.chunk({"member": 2, "time": 5})
    obs_d = obs.chunk({"time": 5})
    for func in (an.crps_fair, an.crps_ensemble, an.energy_score):
        lazy = func(ens_d, obs_d)
        assert lazy.chunks is not None
        np.testing.assert_allclose(lazy.values, func(ens, obs).values, rtol=1e-12)
    for func in (an.spread_skill_ratio, an.weighted_rmse, an.weighted_bias,
                 an.spectra_relative_error):
        assert float(func(ens_d, obs_d)) == pytest.approx(float(func(ens, obs)), rel=1e-12)
    np.testing.assert_array_equal(an.rank_histogram(ens_d, obs_d, np.random.default_rng(0)),
                                  an.rank_histogram(ens, obs, np.random.default_rng(0)))
    np.testing.assert_allclose(an.ensemble_quantiles(ens_d, [0.1, 0.9]).values,
                               an.ensemble_quantiles(ens, [0.1, 0.9]).values)
    eager = an.evaluate(ens, obs, reference=ens + 0.3)["summary"]
    lazy = an.evaluate(ens_d, obs_d, reference=(ens + 0.3).chunk({"time": 4}))["summary"]
    assert lazy.keys() == eager.keys()
    for key, value in eager.items():
        if isinstance(value, float):
            assert lazy[key] == pytest.approx(value, rel=1e-10), key
        else:
            assert lazy[key] == value, key


# --------------------------------------------------------------------------------------
# evaluate report and accessor


def test_evaluate_writes_json_and_markdown(tmp_path):
    ens, obs = random_case(np.random.default_rng(12), m=5, shape=(6, 4, 10))
    ens_ds = xr.Dataset({"tas": ens, "pr": ens**2})
    obs_ds = xr.Dataset({"tas": obs, "pr": obs**2})
    report = an.evaluate(ens_ds, obs_ds, reference=ens_ds.isel(member=[0, 1, 2]) + 0.5,
                         out_dir=tmp_path / "rep", rng_seed=3)
    on_disk = json.loads((tmp_path / "rep" / "scores.json").read_text())
    summary = on_disk["summary"]
    assert set(an.SUMMARY_KEYS + an.REFERENCE_KEYS) <= set(summary)
    assert summary["variable"] == "tas" and summary["n_members"] == 5
    assert summary["n_fields"] == 6 and set(on_disk["variables"]) == {"tas", "pr"}
    s = report["summary"]
    assert summary == pytest.approx({k: v for k, v in s.items()})
    assert s["abs_bias"] == abs(s["bias"])
    assert s["rank_histogram_tolerance"] == pytest.approx(np.sqrt(5 / obs.size))
    assert s["rank_histogram_flat"] == (s["rank_histogram_max_rel_dev"]
                                        <= s["rank_histogram_tolerance"])
    assert s["crps_ratio_vs_reference"] == pytest.approx(s["crps_fair"] / s["crps_fair_reference"])
    assert s["crps_skill"] == pytest.approx(1 - s["crps_ratio_vs_reference"])
    assert s["crps_ratio_ci_low"] <= s["crps_ratio_vs_reference"] <= s["crps_ratio_ci_high"]
    assert s["crps_fair"] == pytest.approx(float(an.weighted_mean(an.crps_fair(ens, obs))))
    assert s["crps"] == pytest.approx(float(an.weighted_mean(an.crps_ensemble(ens, obs))))
    assert s["spread_skill"] == pytest.approx(float(an.spread_skill_ratio(ens, obs)))
    assert sum(on_disk["variables"]["tas"]["rank_histogram_counts"]) == obs.size
    md = (tmp_path / "rep" / "scores.md").read_text()
    assert "| crps_fair |" in md and "`pr`" in md
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["scores.json", "scores.md"]
    again = an.evaluate(ens_ds, obs_ds, reference=ens_ds.isel(member=[0, 1, 2]) + 0.5,
                        rng_seed=3)
    assert again["summary"] == s  # seeded: rank ties and bootstrap are reproducible


def test_evaluate_without_reference_and_nan_mask():
    ens, obs = random_case(np.random.default_rng(13), m=4)
    obs = obs.where(obs.lat < 30)  # a "land" band in the obs, masked in the ensemble too
    ens = ens.where(obs.notnull())
    s = an.evaluate(ens, obs)["summary"]
    assert not set(an.REFERENCE_KEYS) & set(s)
    for key in ("crps", "crps_fair", "spread_skill", "rmse", "energy_score"):
        assert np.isfinite(s[key]), key
    assert an.evaluate(ens, obs)["variables"]["tas"]["rank_histogram_counts"] != []


def test_accessor_is_registered_and_delegates():
    ens, obs = random_case(np.random.default_rng(14), m=4)
    xr.testing.assert_identical(ens.geodiff.mean(), an.ensemble_mean(ens))
    xr.testing.assert_identical(ens.geodiff.crps(obs), an.crps_fair(ens, obs))
    ds = ens.to_dataset()
    assert ds.geodiff.lat_lon_dims == ("lat", "lon")
    assert ds.geodiff.sample_dims == ["time"]
    assert ds.geodiff.evaluate(obs.to_dataset())["summary"]["n_members"] == 4


def test_float32_copy_of_the_grid_matches_without_dropping_points():
    ens, obs = random_case(np.random.default_rng(15), m=4)
    lat32 = obs.lat + 1e-7 * np.arange(obs.sizes["lat"])  # rounding-level differences
    shifted = obs.assign_coords(lat=lat32)
    for func in (an.crps_fair, an.crps_ensemble):
        np.testing.assert_allclose(func(ens, shifted).values, func(ens, obs).values)
    assert float(an.weighted_rmse(ens, shifted)) == float(an.weighted_rmse(ens, obs))
    assert an.evaluate(ens, shifted)["summary"] == an.evaluate(ens, obs)["summary"]


# --------------------------------------------------------------------------------------
# ragged ensembles, observation gaps, masked spectra, result attributes, CF auxiliaries


def test_crps_skips_nan_members_pointwise():
    ens = xr.DataArray([[1.0, 1.0], [3.0, 2.0], [np.nan, 6.0]], dims=("member", "x"))
    obs = xr.DataArray([2.0, 0.0], dims=("x",))
    # point 0: members {1, 3}, y = 2: mean|X-y| = 1, pairs |1-3| * 2 / (2*2*1) = 1 -> 0
    # point 1: members {1, 2, 6}, y = 0: 3 - (1+5+4)*2 / (2*3*2) = 3 - 20/12
    np.testing.assert_allclose(an.crps_fair(ens, obs).values, [0.0, 3.0 - 20.0 / 12.0])
    # ordinary: point 0: 1 - 4 / (2*4) = 0.5; point 1: 3 - 20 / 18
    np.testing.assert_allclose(an.crps_ensemble(ens, obs).values, [0.5, 3.0 - 20.0 / 18.0])
    one = xr.DataArray([[1.0], [np.nan]], dims=("member", "x"))
    assert np.isnan(an.crps_fair(one, obs.isel(x=[0])).values).all()  # 1 member: no fair CRPS
    assert an.crps_ensemble(one, obs.isel(x=[0])).values.tolist() == [1.0]


def test_ragged_crps_equals_the_crps_of_each_points_finite_members():
    rng = np.random.default_rng(21)
    ens, obs = random_case(rng, m=9)
    ragged = ens.where(rng.random(ens.shape) > 0.3)  # ~30 % of members missing per point
    got = an.crps_fair(ragged, obs)
    want = np.full(obs.shape, np.nan)
    for idx in np.ndindex(*obs.shape):
        x = ragged.values[(slice(None), *idx)]
        x = x[np.isfinite(x)]
        if x.size >= 2:
            want[idx] = scoringrules.crps_ensemble(obs.values[idx], x, estimator="fair")
    np.testing.assert_allclose(got.values, want, rtol=1e-10)
    lazy = an.crps_fair(ragged.chunk({"time": 1}), obs.chunk({"time": 1}))
    np.testing.assert_allclose(lazy.compute().values, want, rtol=1e-10)


def test_evaluate_pairs_reference_fields_by_label_not_position():
    rng = np.random.default_rng(22)
    ens = xr.DataArray(rng.normal(size=(6, 2, 5, 3, 4)) * rng.uniform(0.2, 3, (1, 2, 5, 1, 1)),
                       dims=("member", "scenario", "time", "lat", "lon"),
                       coords={"scenario": ["A1B", "E1"], "time": np.arange(5),
                               "lat": [0.0, 1.0, 2.0], "lon": [0.0, 1.0, 2.0, 3.0]}, name="tas")
    obs = ens.isel(member=0) + rng.normal(size=ens.shape[1:])
    ref = ens.transpose("member", "time", "scenario", "lat", "lon")  # same values, other order
    s = an.evaluate(ens, obs, reference=ref)["summary"]
    # every bootstrap resample pairs a field with itself: the interval collapses onto 1
    assert s["crps_ratio_vs_reference"] == pytest.approx(1.0, abs=1e-12)
    assert s["crps_ratio_ci_low"] == pytest.approx(1.0, abs=1e-12)
    assert s["crps_ratio_ci_high"] == pytest.approx(1.0, abs=1e-12)
    assert s["n_fields_reference"] == 10


def test_evaluate_scores_a_ragged_reference_over_its_finite_members():
    rng = np.random.default_rng(23)
    ens, obs = random_case(rng, m=6, shape=(8, 4, 5))
    ref = xr.DataArray(rng.normal(size=(5, 8, 4, 5)), dims=ens.dims, coords=ens.coords,
                       name="tas")
    ref[3:, :4] = np.nan  # the first 4 fields have only 3 members (analog-style padding)
    ref[:, 7] = np.nan  # field 7 has none: it leaves the ratio
    s = an.evaluate(ens, obs, reference=ref)["summary"]
    w = an.area_weights(obs.lat.values)[:, None]
    per_field = []
    for t in range(7):
        members = ref.values[:, t]
        members = members[np.isfinite(members[:, 0, 0])]
        crps = np.array([[scoringrules.crps_ensemble(obs.values[t, i, j], members[:, i, j],
                                                     estimator="fair")
                          for j in range(5)] for i in range(4)])
        per_field.append((crps * w).mean() / w.mean())
    assert s["n_fields_reference"] == 7
    assert s["crps_fair_reference"] == pytest.approx(np.mean(per_field), rel=1e-10)
    g = an.weighted_mean(an.crps_fair(ens, obs), ["lat", "lon"]).values[:7]
    assert s["crps_ratio_vs_reference"] == pytest.approx(g.mean() / np.mean(per_field),
                                                         rel=1e-10)
    assert s["crps_fair"] == pytest.approx(float(an.weighted_mean(an.crps_fair(ens, obs))))


def test_spread_skill_uses_the_same_points_for_spread_and_error():
    rng = np.random.default_rng(24)
    ens, obs = random_case(rng, m=5, shape=(4, 6, 8))
    ens = ens * xr.DataArray(np.linspace(0.2, 3.0, 8), dims="lon", coords={"lon": ens.lon})
    gappy = obs.where(obs.lon < 200)  # observations missing where the spread is largest
    m = 5
    var = ens.var("member", ddof=1).where(gappy.notnull())
    err2 = (ens.mean("member") - gappy) ** 2
    w = xr.DataArray(an.area_weights(obs.lat.values), dims="lat", coords={"lat": obs.lat})
    want = np.sqrt((m + 1) / m * float(var.weighted(w).mean()) / float(err2.weighted(w).mean()))
    assert float(an.spread_skill_ratio(ens, gappy)) == pytest.approx(want, rel=1e-12)
    full = float(an.spread_skill_ratio(ens, obs))
    assert float(an.spread_skill_ratio(ens, gappy)) != pytest.approx(full, rel=1e-3)


def test_spectrum_of_masked_rows_fills_with_the_row_mean_and_compares_on_one_mask():
    rng = np.random.default_rng(25)
    ens, obs = random_case(rng, m=4, shape=(3, 5, 16))
    land = xr.DataArray(np.arange(16) % 7 == 3, dims="lon", coords={"lon": obs.lon})
    sea_obs = obs.where(~land)  # every row has land: no row is NaN-free
    p = an.zonal_power_spectrum(sea_obs)
    assert np.isfinite(p.values).all()
    a = sea_obs.transpose("time", "lat", "lon").values
    filled = np.where(np.isfinite(a), a, np.nanmean(a, axis=-1, keepdims=True))
    np.testing.assert_allclose(p.values, (np.abs(np.fft.rfft(filled)) ** 2).mean((0, 1)),
                               rtol=1e-12)
    # members unmasked, truth masked: compared on the union mask, identical fields give 0
    same = obs.expand_dims(member=3).transpose("member", ...)
    assert float(an.spectra_relative_error(same, sea_obs)) == pytest.approx(0.0, abs=1e-12)
    s = an.evaluate(ens.where(~land), sea_obs)["summary"]
    assert np.isfinite(s["spectra_max_rel_error"])


def test_results_carry_their_own_units_not_the_inputs():
    ens, obs = random_case(np.random.default_rng(26), m=4)
    ens.attrs.update(standard_name="air_temperature", long_name="Air temperature")
    assert an.exceedance_probability(ens, 0.0).attrs["units"] == "1"
    assert "standard_name" not in an.exceedance_probability(ens, 0.0).attrs
    assert an.exceedance_count(ens, 0.0).attrs["units"] == "1"
    assert an.rank_histogram(ens, obs, np.random.default_rng(0)).attrs["units"] == "1"
    assert float(an.spread_skill_ratio(ens, obs)) > 0
    assert an.spread_skill_ratio(ens, obs).attrs == {"long_name": "spread-skill ratio",
                                                     "units": "1"}
    assert an.zonal_power_spectrum(ens).attrs["units"] == "K^2"
    assert an.crps_fair(ens, obs).attrs == {"long_name": "fair CRPS", "units": "K"}
    spread = an.ensemble_spread(ens)
    assert spread.attrs["standard_name"] == "air_temperature"  # still a temperature in K
    assert spread.attrs["cell_methods"] == "member: standard_deviation"
    pr = ens.assign_attrs(units="kg m-2 s-1")
    assert an.zonal_power_spectrum(pr).attrs["units"] == "(kg m-2 s-1)^2"


def test_datasets_with_cf_auxiliary_variables_are_scored_on_their_ensembles():
    ens, obs = random_case(np.random.default_rng(27), m=4)
    bnds = xr.DataArray(np.zeros((3, 2)), dims=("time", "bnds"))
    ens_ds = xr.Dataset({"tas": ens, "time_bnds": bnds})
    obs_ds = xr.Dataset({"tas": obs, "time_bnds": bnds})
    xr.testing.assert_allclose(an.crps_fair(ens_ds, obs_ds)["tas"], an.crps_fair(ens, obs))
    assert list(an.crps_fair(ens_ds, obs_ds).data_vars) == ["tas"]
    assert float(an.weighted_mean(obs_ds)["tas"]) == pytest.approx(float(an.weighted_mean(obs)))
    hist = ens_ds.geodiff.rank_histogram(obs_ds, np.random.default_rng(0))
    xr.testing.assert_equal(hist["tas"], an.rank_histogram(ens, obs, np.random.default_rng(0)))
    per_time = ens.geodiff.rank_histogram(obs, np.random.default_rng(0), dim=["lat", "lon"])
    xr.testing.assert_equal(per_time, an.rank_histogram(ens, obs, np.random.default_rng(0),
                                                        dim=["lat", "lon"]))
    assert "time" in per_time.dims and int(per_time.sum()) == int(obs.count())
    assert float(ens_ds.geodiff.spread_skill(obs_ds)["tas"]) == pytest.approx(
        float(an.spread_skill_ratio(ens, obs)))


def test_observations_may_hold_more_fields_than_the_ensemble():
    """A whole observation file (more times, another order) scores the ensemble's fields;
    a field the observations lack, or another grid, is still refused."""
    ens, obs = random_case(np.random.default_rng(31), m=4, shape=(6, 5, 6))
    part = ens.isel(time=[4, 1])
    shuffled = obs.isel(time=[5, 4, 3, 2, 1, 0])
    xr.testing.assert_equal(an.crps_fair(part, shuffled), an.crps_fair(part, obs.isel(time=[4, 1])))
    with pytest.raises(ValueError, match="dim 'time' has size"):
        an.crps_fair(ens.assign_coords(time=ens.time + 100).isel(time=[0]), obs)
    with pytest.raises(ValueError, match="coordinate 'lat' differs"):
        an.crps_fair(part, shuffled.assign_coords(lat=shuffled.lat + 1.0))
