"""Ensembles out: labelled CF files in the source's conventions, streamed, resumable after
SIGKILL, sharded under torchrun, gap filling, and clear errors before any work."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from geodiff import checkpoint as ckpt
from geodiff.ensemble import generate_ensemble
from geodiff.ensemble import sample_items as _SAMPLE_ITEMS
from geodiff.gapfill import fill_gaps
from geodiff.pipeline import load_model
from geodiff.train import train
from tests.toy import toy_level_file, toy_predictor_file, toy_recipe

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = {"time": None}  # filled by the fixture with held-out times


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ens")
    recipe = toy_recipe(tmp, training={"steps": 6, "checkpoint_every": 6})
    result = train(recipe, tmp / "run", progress=False)
    source = xr.open_dataset(tmp / "toy.nc")
    held_out = source.isel(time=[5, 15, 25])  # years 1905, 1915, 1925
    return {"run": result.run_dir, "source": source, "held_out": held_out, "tmp": tmp}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_in_memory_ensemble_is_labelled_in_source_conventions(trained):
    ds = generate_ensemble(trained["run"], 3, trained["held_out"], seed=1, progress=False)
    src = trained["source"]
    assert ds["tas"].dims == ("member", "time", "latitude", "longitude")
    np.testing.assert_array_equal(ds["latitude"].values, src["latitude"].values)  # descending
    np.testing.assert_array_equal(ds["longitude"].values, src["longitude"].values)  # -180..180
    np.testing.assert_array_equal(ds["time"].values, trained["held_out"]["time"].values)
    assert ds["member"].attrs["standard_name"] == "realization"
    assert ds["tas"].attrs["units"] == "K"
    assert ds["tas"].attrs["standard_name"] == "air_temperature"
    for key in ("Conventions", "history", "source", "geodiff_checkpoint_sha256",
                "geodiff_sampler", "geodiff_steps", "geodiff_seed"):
        assert key in ds.attrs, key
    assert ds.attrs["Conventions"] == "CF-1.10"
    # land (NaN in every source field) is NaN again, sea is finite and physical
    land = src["tas"].isnull().all("time")
    assert bool(ds["tas"].where(land).isnull().all())
    sea = ds["tas"].where(~land)
    assert float(sea.min()) > 200 and float(sea.max()) < 350


def test_ddpm_model_samples_explicit_timesteps(tmp_path, trained):
    recipe = toy_recipe(tmp_path, diffusion={"parameterization": "ddpm", "timesteps": 100},
                        training={"steps": 4, "checkpoint_every": 4},
                        sampling={"sampler": "ddim", "steps": 5})
    run = train(recipe, tmp_path / "run", progress=False).run_dir
    held = xr.open_dataset(tmp_path / "toy.nc").isel(time=[5])
    # sigma_grid's evenly spaced subset, given explicitly (ascending): the same members
    even = torch.linspace(99, 0, 5, dtype=torch.float64).round().long().tolist()
    a = generate_ensemble(run, 2, held, seed=3, progress=False)
    b = generate_ensemble(run, 2, held, seed=3, timesteps=even[::-1], progress=False)
    np.testing.assert_array_equal(a["tas"].values, b["tas"].values)
    assert "geodiff_timesteps" not in a.attrs
    assert list(b.attrs["geodiff_timesteps"]) == even and b.attrs["geodiff_steps"] == 5
    # another subset (here from the recipe, as sampling.timesteps) gives other members,
    # written to a file with its provenance
    model = load_model(run)
    model = dataclasses.replace(model, recipe=model.recipe.override(
        ["sampling.timesteps=[99, 60, 30, 10, 2]"]))
    out = generate_ensemble(model, 2, held, seed=3, out=tmp_path / "q.nc", progress=False)
    with xr.open_dataset(out) as q:
        assert list(q.attrs["geodiff_timesteps"]) == [99, 60, 30, 10, 2]
        assert q.attrs["geodiff_steps"] == 5
        assert np.isfinite(q["tas"].values).any()
        assert not np.array_equal(q["tas"].values, a["tas"].values, equal_nan=True)
    # refused before any work, with nothing written
    bad = tmp_path / "bad.nc"
    with pytest.raises(ValueError, match=r"timesteps \[100\] are outside the schedule's 0 .. 99"):
        generate_ensemble(run, 2, held, timesteps=[100, 5], out=bad, progress=False)
    with pytest.raises(ValueError, match="steps=3 disagrees with the 2 timesteps"):
        generate_ensemble(run, 2, held, steps=3, timesteps=[50, 0], out=bad, progress=False)
    with pytest.raises(ValueError, match="EDM-parameterised"):
        generate_ensemble(trained["run"], 2, held, sampler="ddim", timesteps=[5, 0], out=bad,
                          progress=False)
    assert not bad.exists()


def test_member_is_identical_whatever_ensemble_and_batch_size(trained):
    """Same batch size: bit-identical whatever the ensemble size.  Another batch size changes
    only the BLAS summation order inside the network: equal to float32 round-off."""
    a = generate_ensemble(trained["run"], 4, trained["held_out"], seed=7, batch_size=3,
                          progress=False)
    b = generate_ensemble(trained["run"], 2, trained["held_out"], seed=7, batch_size=3,
                          progress=False)
    np.testing.assert_array_equal(a["tas"].isel(member=[0, 1]).values, b["tas"].values)
    d = generate_ensemble(trained["run"], 2, trained["held_out"], seed=7, batch_size=1,
                          progress=False)
    np.testing.assert_allclose(d["tas"].values, b["tas"].values, rtol=1e-6, equal_nan=True)
    c = generate_ensemble(trained["run"], 2, trained["held_out"], seed=8, progress=False)
    assert not np.allclose(c["tas"].values, b["tas"].values, equal_nan=True)


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_file_output_equals_in_memory_and_is_atomic(trained, tmp_path, suffix):
    # other batch sizes on both sides; fixed network chunks (compute_batch) make the members
    # bit-identical whatever the batch (without them they agree to float32 round-off only)
    out = tmp_path / f"ens{suffix}"
    mem = generate_ensemble(trained["run"], 3, trained["held_out"], seed=2, compute_batch=2,
                            progress=False)
    path = generate_ensemble(trained["run"], 3, trained["held_out"], seed=2, out=out,
                             batch_size=2, compute_batch=2, progress=False)
    assert path == out and out.exists()
    assert not list(tmp_path.glob("*.partial*"))
    disk = xr.open_zarr(out) if suffix == ".zarr" else xr.open_dataset(out)
    np.testing.assert_array_equal(disk["tas"].values, mem["tas"].values)
    assert disk["tas"].attrs["units"] == "K"
    assert disk.attrs["geodiff_seed"] == 2
    if suffix == ".nc":
        enc = disk["tas"].encoding
        assert enc["zlib"] and enc["chunksizes"][0] == 1


def test_generation_killed_midway_resumes_to_identical_file(trained, tmp_path):
    """SIGKILL a `geodiff generate` once some members are on disk; running the same command
    again continues from them and produces the uninterrupted result exactly."""
    held = trained["held_out"]
    cond = tmp_path / "cond.nc"
    held.to_netcdf(cond)
    out = tmp_path / "ens.nc"
    cmd = [sys.executable, "-m", "geodiff", "generate", str(trained["run"]), "--members", "24",
           "--batch-size", "3", "--seed", "3", "--conditions", str(cond), "--out", str(out),
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ledger = out.with_name("ens.nc.partial.progress-r0.json")
    deadline = time.time() + 300
    while not ledger.exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the final name must not appear before completion"
    assert out.with_name("ens.nc.partial").exists()
    again = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    ref_out = tmp_path / "ref.nc"
    ref_cmd = [*cmd[:-3], str(ref_out), "--device", "cpu"]
    ref = subprocess.run(ref_cmd, env=_env(), cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    np.testing.assert_array_equal(xr.open_dataset(out)["tas"].values,
                                  xr.open_dataset(ref_out)["tas"].values)


def test_torchrun_two_ranks_write_one_zarr_identical_to_single_process(trained, tmp_path):
    held = trained["held_out"]
    cond = tmp_path / "cond.nc"
    held.to_netcdf(cond)
    out = tmp_path / "ens.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=29518", "-m", "geodiff", "generate", str(trained["run"]),
           "--members", "5", "--batch-size", "3", "--seed", "4", "--conditions", str(cond),
           "--out", str(out), "--device", "cpu"]
    res = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    single = subprocess.run([sys.executable, *cmd[5:-3], str(tmp_path / "one.zarr"), "--device",
                             "cpu"], env=_env(), cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    np.testing.assert_array_equal(xr.open_zarr(out)["tas"].values,
                                  xr.open_zarr(tmp_path / "one.zarr")["tas"].values)


def test_gap_filling_keeps_observed_pixels_and_land(trained):
    obs = trained["held_out"].isel(time=[0, 1]).copy(deep=True)
    rng = np.random.default_rng(0)
    gaps = rng.random(obs["tas"].shape) < 0.3
    obs["tas"] = obs["tas"].where(~gaps)
    filled = fill_gaps(trained["run"], obs, members=3, steps=3, resample=2, progress=False)
    assert filled["tas"].dims == ("member", "time", "latitude", "longitude")
    assert filled["member"].attrs["standard_name"] == "realization"
    assert filled["tas"].attrs["units"] == "K"
    seen = obs["tas"].notnull()
    np.testing.assert_array_equal(filled["tas"].where(seen).isel(member=0).values,
                                  obs["tas"].where(seen).values)
    land = trained["source"]["tas"].isnull().all("time")
    assert bool(filled["tas"].where(land).isnull().all())
    holes = (~seen) & (~land)
    assert bool(filled["tas"].where(holes).notnull().sum() == 3 * int(holes.sum()))
    # members differ in the gaps, agree on observed pixels
    spread = filled["tas"].std("member")
    assert float(spread.where(holes).mean()) > 0
    assert float(spread.where(seen).max()) == 0


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        ({"members": 0}, ValueError, "members=0"),
        ({"sampler": "euler"}, ValueError, "choose one of"),
        ({"compute_batch": 0}, ValueError, "compute_batch=0 must be >= 1"),
        ({"conditions": {"time": ["2500-06-01"]}}, ValueError, "year"),
    ],
)
def test_bad_requests_fail_before_any_work(trained, tmp_path, kwargs, exc, fragment):
    args = {"members": 2, "conditions": trained["held_out"], **kwargs}
    if isinstance(args["conditions"], dict):
        import cftime

        args["conditions"] = {"time": [cftime.Datetime360Day(2500, 6, 1)]}
    with pytest.raises(exc, match=fragment):
        generate_ensemble(trained["run"], args.pop("members"), args.pop("conditions"),
                          out=tmp_path / "x.nc", progress=False, **args)
    assert not list(tmp_path.iterdir())


def test_existing_output_is_refused_unless_overwrite(trained, tmp_path):
    out = tmp_path / "ens.nc"
    out.write_text("not an ensemble")
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_ensemble(trained["run"], 1, trained["held_out"], out=out, progress=False)
    assert out.read_text() == "not an ensemble"
    generate_ensemble(trained["run"], 1, trained["held_out"], out=out, overwrite=True,
                      progress=False)
    assert xr.open_dataset(out).sizes["member"] == 1


def test_unconditional_request_on_conditional_model_is_explained(trained):
    with pytest.raises(ValueError, match="pass conditions"):
        generate_ensemble(trained["run"], 1, None, progress=False)


def test_checkpoint_alone_is_enough(trained, tmp_path):
    """Generation reads only the checkpoint: the training data can be gone."""
    model = load_model(ckpt.latest_checkpoint(trained["run"]))
    assert model.channel_names == ["tas"]
    ds = generate_ensemble(model, 1, {"time": trained["held_out"]["time"].values[:1]},
                           progress=False)
    assert ds.sizes["member"] == 1 and ds.sizes["time"] == 1


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_written_files_pass_the_cf_check(trained, tmp_path, suffix):
    from geodiff.cfcheck import cf_problems

    out = generate_ensemble(trained["run"], 2, trained["held_out"], out=tmp_path / f"e{suffix}",
                            progress=False)
    assert cf_problems(out) == []


def test_cf_check_flags_broken_files(trained, tmp_path):
    from geodiff.cfcheck import cf_problems

    out = generate_ensemble(trained["run"], 2, trained["held_out"], out=tmp_path / "e.nc",
                            progress=False)
    raw = xr.open_dataset(out, decode_cf=False).load()
    raw.attrs["Conventions"] = "none"
    raw["member"].attrs.pop("standard_name")
    lat = raw["latitude"].values.copy()
    lat[[0, 1]] = lat[[1, 0]]
    raw = raw.assign_coords(latitude=("latitude", lat, raw["latitude"].attrs))
    del raw["tas"].attrs["units"]
    raw["tas"].attrs["grid_mapping"] = "latitude_longitude"  # as iris files say: no such var
    raw["latitude"].attrs["bounds"] = "latitude_bnds"
    problems = cf_problems(raw)
    for fragment in ("Conventions", "realization", "not strictly monotonic", "no units",
                     "grid_mapping attribute names missing variable 'latitude_longitude'",
                     "bounds attribute names missing variable 'latitude_bnds'"):
        assert any(fragment in p for p in problems), (fragment, problems)


def _guidable(model):
    """The model with a recipe that claims condition dropout, so that guidance is allowed:
    these tests check batching of the guided network calls, not what guidance does."""
    cond = dataclasses.replace(model.recipe.conditioning, dropout=0.1)
    return dataclasses.replace(model, recipe=dataclasses.replace(model.recipe,
                                                                 conditioning=cond))


def test_compute_batch_makes_members_identical_whatever_batch_size(trained):
    model = _guidable(load_model(trained["run"]))
    sc = model.recipe.sampling
    fixed = dataclasses.replace(model, recipe=dataclasses.replace(
        model.recipe, sampling=dataclasses.replace(sc, compute_batch=4)))
    shapes = []
    hook = fixed.denoiser.register_forward_hook(lambda m, a, out: shapes.append(len(out)))
    runs = {b: generate_ensemble(fixed, 3, trained["held_out"], seed=3, batch_size=b,
                                 guidance=1.5, progress=False)["tas"].values for b in (1, 2, 9)}
    hook.remove()
    assert set(shapes) == {4}  # every network call sees exactly compute_batch samples
    np.testing.assert_array_equal(runs[1], runs[9])
    np.testing.assert_array_equal(runs[2], runs[9])
    free = generate_ensemble(model, 3, trained["held_out"], seed=3, batch_size=9, guidance=1.5,
                             progress=False)["tas"].values
    np.testing.assert_allclose(free, runs[9], rtol=1e-5, equal_nan=True)


def test_fixed_batch_evaluates_exact_chunks_in_order():
    from geodiff.ensemble import fixed_batch

    seen = []

    def net(x, sigma, cond, drop=None):
        seen.append(x.shape[0])
        return x * sigma[:, None] + cond

    x, sigma, cond = torch.arange(7.0)[:, None], torch.arange(7.0) + 1, torch.ones(7, 1)
    out = fixed_batch(net, 3)(x, sigma, cond, None)
    assert seen == [3, 3, 3]
    assert torch.equal(out, net(x, sigma, cond))
    assert fixed_batch(net, None) is net


def test_gap_filling_honours_compute_batch(trained):
    obs = trained["held_out"].isel(time=[0, 1]).copy(deep=True)
    obs["tas"] = obs["tas"].where(np.random.default_rng(1).random(obs["tas"].shape) > 0.3)
    model = load_model(trained["run"])
    shapes = []
    hook = model.denoiser.register_forward_hook(lambda m, a, out: shapes.append(len(out)))
    runs = [fill_gaps(model, obs, members=3, steps=2, resample=1, batch_size=b,
                      compute_batch=4, progress=False)["tas"].values for b in (1, 5)]
    hook.remove()
    assert set(shapes) == {4}
    np.testing.assert_array_equal(runs[0], runs[1])


def test_guidance_needs_a_model_trained_with_condition_dropout(trained, tmp_path):
    with pytest.raises(ValueError, match="trained with conditioning.dropout=0"):
        generate_ensemble(trained["run"], 2, trained["held_out"], guidance=2.0,
                          out=tmp_path / "g.nc", progress=False)
    assert not list(tmp_path.iterdir())


class Killed(Exception):
    """Stands for the process being killed mid-run."""


def _count_items(monkeypatch, fail_after=None):
    """Patch ensemble.sample_items to record how many (cell, member) items each call draws
    (and to be killed after ``fail_after`` calls)."""
    import geodiff.ensemble as ens_mod

    calls = []

    def counted(model, items, *args, **kwargs):
        if fail_after is not None and len(calls) == fail_after:
            raise Killed
        calls.append(len(items))
        return _SAMPLE_ITEMS(model, items, *args, **kwargs)

    monkeypatch.setattr(ens_mod, "sample_items", counted)
    return calls


def test_file_output_draws_each_member_once(trained, tmp_path, monkeypatch):
    calls = _count_items(monkeypatch)
    generate_ensemble(trained["run"], 4, trained["held_out"], batch_size=3, progress=False)
    in_memory = sum(calls)
    calls.clear()
    generate_ensemble(trained["run"], 4, trained["held_out"], batch_size=3,
                      out=tmp_path / "e.zarr", progress=False)
    assert sum(calls) == in_memory == 4 * 3  # no member drawn again for the file's layout


def test_resume_is_keyed_on_the_checkpoint_not_on_the_path_typed(trained, tmp_path,
                                                                    monkeypatch):
    run = Path(trained["run"])
    monkeypatch.chdir(run.parent)
    out = tmp_path / "e.nc"
    _count_items(monkeypatch, fail_after=2)  # killed after 2 of 6 one-member blocks
    with pytest.raises(Killed):
        generate_ensemble(run.name, 6, trained["held_out"], batch_size=3, out=out,
                          progress=False)
    calls = _count_items(monkeypatch)
    generate_ensemble(run.resolve(), 6, trained["held_out"], batch_size=3, out=out,
                      progress=False)
    assert sum(calls) == 4 * 3  # the 2 members on disk were kept, 4 drawn
    with xr.open_dataset(out) as ds:
        assert ds.attrs["geodiff_checkpoint"] == str(ckpt.latest_checkpoint(run).resolve())
        ref = generate_ensemble(run, 6, trained["held_out"], batch_size=3, progress=False)
        np.testing.assert_array_equal(ds["tas"].values, ref["tas"].values)


def test_file_template_allocates_nothing_of_the_ensembles_size():
    import tracemalloc

    from geodiff.ensemble import _template

    first = xr.Dataset({"tas": (("member", "time", "lat", "lon"),
                                np.zeros((1, 4, 16, 32), np.float32))},
                       coords={"member": [0], "time": np.arange(4)})
    tracemalloc.start()
    template = _template(first, 4000)  # 4000 members: 33 MB as float32
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert template["tas"].shape == (4000, 4, 16, 32) and template["tas"].chunks[0][0] == 1
    assert peak < 2_000_000, peak


def test_generated_variables_keep_only_attributes_that_describe_them(trained):
    model = load_model(trained["run"])
    source_attrs = {"units": "K", "standard_name": "air_temperature", "long_name": "t",
                    "grid_mapping": "latitude_longitude", "source": "Met Office UM",
                    "ukmo__um_stash_source": "m01s03i236", "valid_max": 400.0}
    model = dataclasses.replace(model, meta={**model.meta, "var_attrs": {"tas": source_attrs}})
    held = trained["held_out"].copy()
    held["time"].attrs["bounds"] = "time_bnds"  # the conditions' bounds are not written
    ds = generate_ensemble(model, 1, held, progress=False)
    assert ds["tas"].attrs == {"units": "K", "standard_name": "air_temperature",
                               "long_name": "t"}
    assert "bounds" not in ds["time"].attrs


# ---------------------------------------------------------------------------------------
# variables with vertical levels


@pytest.fixture(scope="module")
def levels_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("levels")
    source = toy_level_file(tmp / "lev.nc")
    recipe = toy_recipe(tmp, data=source, training={"steps": 2, "checkpoint_every": 2})
    recipe = recipe.override(["data.variables=[ta]"])
    run = train(recipe, tmp / "run", progress=False).run_dir
    return {"run": run, "recipe": recipe, "source": xr.open_dataset(source), "tmp": tmp}


def test_levels_are_unstacked_into_the_source_level_dimension(levels_run):
    """Training items (scaled channels ta@850, ta@500) through to_dataset give back the
    source's fields in physical units on its level axis; channels never valid (850 hPa below
    ground) are NaN at that level only."""
    from geodiff.ensemble import condition_cells, to_dataset
    from geodiff.pipeline import prepare_data

    model = load_model(levels_run["run"])
    assert model.channel_names == ["ta@850", "ta@500"] and model.valid.shape == (2, 8, 16)
    bundle = prepare_data(levels_run["recipe"])
    idx = [0, 7]
    times = bundle.splits["train"]["time"].values[idx]
    x = torch.stack([model.padding.crop(bundle.train[i]["x"]) for i in idx]).numpy()
    cells = condition_cells(model, {"time": times})
    back = to_dataset(model, x[None], [0], cells)  # (member, time, plev, lat, lon)
    src = levels_run["source"]
    assert back["ta"].dims == ("member", "time", "plev", "lat", "lon")
    assert back["plev"].dtype == src["plev"].dtype == np.float32
    np.testing.assert_array_equal(back["plev"].values, [850.0, 500.0])
    assert back["plev"].attrs == src["plev"].attrs
    np.testing.assert_array_equal(back["lat"].values, src["lat"].values)  # descending
    truth = src["ta"].sel(time=times)
    np.testing.assert_allclose(back["ta"].isel(member=0).values, truth.values, rtol=1e-6,
                               atol=1e-4)
    assert back["ta"].attrs["units"] == "K"


def test_ensemble_of_a_variable_with_levels(levels_run, tmp_path):
    src = levels_run["source"]
    held = src.isel(time=[5, 15])
    out = generate_ensemble(levels_run["run"], 2, held, seed=0, out=tmp_path / "e.nc",
                            progress=False)
    with xr.open_dataset(out) as ds:
        assert ds["ta"].dims == ("member", "time", "plev", "lat", "lon")
        assert ds["plev"].dtype == np.float32 and ds["plev"].attrs == src["plev"].attrs
        np.testing.assert_array_equal(ds["plev"].values, src["plev"].values)
        np.testing.assert_array_equal(ds["time"].values, held["time"].values)
        assert ds["ta"].attrs["units"] == "K"
        below_ground = src["ta"].isnull().all("time")  # (plev, lat, lon): 850 hPa block only
        assert int(below_ground.sum()) == 8
        np.testing.assert_array_equal(ds["ta"].isnull().values,
                                      np.broadcast_to(below_ground.values, ds["ta"].shape))


def test_gap_filling_a_variable_with_levels(levels_run):
    obs = levels_run["source"].isel(time=[5]).copy(deep=True)
    obs = obs.sortby("lat").assign_coords(lon=(((obs["lon"] + 180) % 360) - 180))
    obs = obs.sortby("lon")  # another lat order and longitude convention than the source
    gaps = np.random.default_rng(0).random(obs["ta"].shape) < 0.3
    obs["ta"] = obs["ta"].where(~gaps)
    filled = fill_gaps(levels_run["run"], obs, members=2, steps=2, resample=1, progress=False)
    src = levels_run["source"]
    assert filled["ta"].dims == ("member", "time", "plev", "lat", "lon")
    np.testing.assert_array_equal(filled["lon"].values, src["lon"].values)  # model's 0..360
    truth = src["ta"].isel(time=[5])
    seen = truth.where(xr.DataArray(~gaps, dims=obs["ta"].dims, coords=obs["ta"].coords)
                       ).notnull()
    np.testing.assert_array_equal(filled["ta"].isel(member=0).where(seen).values,
                                  truth.where(seen).values)
    below_ground = src["ta"].isnull().all("time")
    assert bool(filled["ta"].where(below_ground).isnull().all())
    holes = ~seen & ~below_ground
    assert int(filled["ta"].where(holes).notnull().sum()) == 2 * int(holes.sum()) > 0


def _without_meta_keys(run: Path, dest: Path, keys: tuple[str, ...]) -> Path:
    """A copy of the latest checkpoint of ``run`` whose meta.json lacks ``keys`` (as an
    older geodiff wrote it)."""
    import json
    import shutil

    path = shutil.copytree(ckpt.latest_checkpoint(run), dest)
    meta = json.loads((path / "meta.json").read_text())
    for key in keys:
        meta.pop(key)
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_checkpoints_without_level_and_field_records(trained, levels_run, tmp_path):
    keys = ("levels", "field_names", "condition_channels")
    old = _without_meta_keys(trained["run"], tmp_path / "old", keys)
    held = trained["held_out"].isel(time=[0])
    a = generate_ensemble(old, 2, held, seed=1, progress=False)
    b = generate_ensemble(trained["run"], 2, held, seed=1, progress=False)
    np.testing.assert_array_equal(a["tas"].values, b["tas"].values)
    old_levels = _without_meta_keys(levels_run["run"], tmp_path / "old_levels", keys)
    with pytest.raises(ValueError, match=r"channels \['ta@850', 'ta@500'\] are not one per "
                                         r"variable \['ta'\].*train it again"):
        load_model(old_levels)


# ---------------------------------------------------------------------------------------
# time-varying condition fields and static fields


@pytest.fixture(scope="module")
def predictor_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predictor")
    source = toy_predictor_file(tmp / "toy.nc")
    recipe = toy_recipe(tmp, data=source, training={"steps": 2, "checkpoint_every": 2},
                        conditioning={"fields": ["pr"], "static_fields": ["orog"]})
    run = train(recipe, tmp / "run", progress=False).run_dir
    return {"run": run, "recipe": recipe, "source": xr.open_dataset(source).load(),
            "tmp": tmp}


def test_each_cell_is_generated_from_its_own_condition_field(predictor_run):
    """The network sees each item's own cell's predictor; changing the predictor of one
    requested cell changes that cell's members and no other's, and the same predictors and
    seed give the same members (generation is deterministic, so any difference is the
    predictor's doing: a model trained 2 steps barely reacts to its inputs yet)."""
    from geodiff.ensemble import condition_cells, condition_fields

    model = load_model(predictor_run["run"])
    assert model.condition_fields == ("pr",)
    assert model.meta["field_names"][-2:] == ["orog", "pr"]
    assert model.fields.shape[0] == len(model.meta["field_names"]) - 1  # pr given per cell
    held = predictor_run["source"].isel(time=[5, 15])
    seen = []
    hook = model.denoiser.register_forward_pre_hook(lambda m, args: seen.append(args[2]))
    a = generate_ensemble(model, 2, held, seed=0, batch_size=4, progress=False)
    hook.remove()
    own = condition_fields(model, held, condition_cells(model, held))[:, 0]  # (2, lat, lon)
    first = model.padding.crop(seen[0][:, -1]).numpy()  # items (cell, member): 00 10 01 11
    for item, cell in enumerate([0, 1, 0, 1]):
        np.testing.assert_array_equal(first[item], own[cell])
    assert not np.array_equal(own[0], own[1])
    again = generate_ensemble(model, 2, held.copy(deep=True), seed=0, progress=False)
    np.testing.assert_array_equal(a["tas"].values, again["tas"].values)
    other = held.copy(deep=True)
    other["pr"][1] = other["pr"][1] * 3.0 + 5.0  # only the second cell's predictor
    b = generate_ensemble(model, 2, other, seed=0, progress=False)
    np.testing.assert_array_equal(a["tas"].isel(time=0).values, b["tas"].isel(time=0).values)
    assert not np.array_equal(a["tas"].isel(time=1).values, b["tas"].isel(time=1).values,
                              equal_nan=True)
    assert a["tas"].dims == ("member", "time", "latitude", "longitude")
    assert "pr" not in a.data_vars and "orog" not in a.data_vars


def test_condition_fields_are_scaled_and_padded_exactly_as_in_training(predictor_run):
    from geodiff.ensemble import condition_cells, condition_fields, network_fields
    from geodiff.pipeline import prepare_data

    model = load_model(predictor_run["run"])
    bundle = prepare_data(predictor_run["recipe"])
    i = 11
    time = bundle.splits["train"]["time"].values[i]
    cond = predictor_run["source"][["pr"]].sel(time=[time])
    # latitude ascending and longitude 0..360 (the source: descending, -180..180)
    cond = cond.sortby("latitude").assign_coords(longitude=cond["longitude"] % 360)
    cond = cond.sortby("longitude")
    cells = condition_cells(model, cond)
    fields = network_fields(model, condition_fields(model, cond, cells), [0])[0]
    assert torch.equal(fields, bundle.train[i]["fields"])  # coords, mask, orog, pr


def test_condition_fields_missing_from_the_request_are_refused_before_any_work(
        predictor_run, tmp_path):
    run, held = predictor_run["run"], predictor_run["source"].isel(time=[5])
    out = tmp_path / "e.nc"
    with pytest.raises(ValueError, match=r"condition fields \['pr'\] \(conditioning.fields\)"
                                         r".*pass an xarray Dataset"):
        generate_ensemble(run, 2, {"time": held["time"].values}, out=out, progress=False)
    with pytest.raises(ValueError, match=r"variable\(s\) \['pr'\] the model needs are not in "
                                         r"conditions"):
        generate_ensemble(run, 2, held[["tas"]], out=out, progress=False)
    shifted = held.assign_coords(latitude=held["latitude"] + 1.0)
    with pytest.raises(ValueError, match="conditions are not on the data grid"):
        generate_ensemble(run, 2, shifted, out=out, progress=False)
    assert not list(tmp_path.iterdir())


def test_cli_generate_reads_condition_fields_from_the_conditions_file(predictor_run,
                                                                       tmp_path):
    from geodiff.cli import main

    held = predictor_run["source"].isel(time=[5, 15])
    held[["pr"]].to_netcdf(tmp_path / "cond.nc")
    out = tmp_path / "e.nc"
    assert main(["generate", str(predictor_run["run"]), "--members", "2", "--seed", "4",
                 "--conditions", str(tmp_path / "cond.nc"), "--out", str(out),
                 "--device", "cpu"]) == 0
    ref = generate_ensemble(predictor_run["run"], 2, held, seed=4, progress=False)
    with xr.open_dataset(out) as ds:
        np.testing.assert_array_equal(ds["tas"].values, ref["tas"].values)


def test_gap_filling_with_condition_fields(predictor_run):
    """The observed Dataset carries the predictor of each field; the network sees it."""
    from geodiff.ensemble import condition_cells, condition_fields

    model = load_model(predictor_run["run"])
    obs = predictor_run["source"].isel(time=[5, 25]).copy(deep=True)
    obs["tas"] = obs["tas"].where(np.random.default_rng(2).random(obs["tas"].shape) > 0.3)
    seen_fields = []
    hook = model.denoiser.register_forward_pre_hook(lambda m, a: seen_fields.append(a[2]))
    filled = fill_gaps(model, obs, members=1, steps=2, resample=1, progress=False)
    hook.remove()
    own = condition_fields(model, obs, condition_cells(model, obs))[:, 0]  # (2, lat, lon)
    np.testing.assert_array_equal(model.padding.crop(seen_fields[0][:, -1]).numpy(), own)
    seen = obs["tas"].notnull()
    np.testing.assert_array_equal(filled["tas"].isel(member=0).where(seen).values,
                                  obs["tas"].where(seen).values)
    with pytest.raises(ValueError, match=r"\['pr'\] the model needs are not in observed fields"):
        fill_gaps(predictor_run["run"], obs[["tas"]], members=1, steps=1, progress=False)


def test_gap_filling_resumes_only_for_the_same_observations(trained, tmp_path, monkeypatch):
    """A killed fill_gaps run is resumed by the same call, but a call with other observed
    values for the same cells is another ensemble: it must not keep the members on disk."""
    import geodiff.sampling as sampling_mod

    real = sampling_mod.inpaint
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        if counted.fail_after is not None and len(calls) > counted.fail_after:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling_mod, "inpaint", counted)
    obs = trained["held_out"].isel(time=[0]).copy(deep=True)
    obs["tas"] = obs["tas"].where(np.random.default_rng(1).random(obs["tas"].shape) > 0.3)
    out = tmp_path / "filled.nc"
    kw = {"members": 3, "steps": 2, "resample": 1, "batch_size": 1, "progress": False}
    counted.fail_after = 2  # killed after 2 of 3 one-member blocks
    with pytest.raises(Killed):
        fill_gaps(trained["run"], obs, out=out, **kw)
    counted.fail_after = None
    calls.clear()
    fill_gaps(trained["run"], obs, out=out, **kw)
    assert len(calls) == 1  # same observations: the 2 members on disk are kept
    out.unlink()
    counted.fail_after = 2
    calls.clear()
    with pytest.raises(Killed):
        fill_gaps(trained["run"], obs, out=out, **kw)
    warmer = obs.copy(deep=True)
    warmer["tas"] = warmer["tas"] + 1.0
    counted.fail_after = None
    calls.clear()
    fill_gaps(trained["run"], warmer, out=out, **kw)
    assert len(calls) == 3  # other observations: every member drawn again
    with xr.open_dataset(out) as ds:
        seen = warmer["tas"].notnull()
        for m in range(3):
            np.testing.assert_array_equal(ds["tas"].isel(member=m).where(seen).values,
                                          warmer["tas"].where(seen).values)


def test_times_given_as_text_are_dates_of_the_models_calendar(trained):
    """{"time": ["1905-06-01", ...]} (what JSON --conditions gives) generates for the same
    cells, bit for bit, as the decoded 360_day times; a date the calendar lacks is refused
    naming it."""
    ref = generate_ensemble(trained["run"], 2, trained["held_out"].isel(time=[0, 1]),
                            progress=False)
    text = generate_ensemble(trained["run"], 2, {"time": ["1905-06-01", "1915-06-01"]},
                             progress=False)
    np.testing.assert_array_equal(text["tas"].values, ref["tas"].values)
    assert list(text["time"].values) == list(ref["time"].values)
    assert text["time"].values[0].calendar == "360_day"
    feb30 = generate_ensemble(trained["run"], 1, {"time": ["1905-02-30"]}, progress=False)
    assert feb30["time"].values[0].day == 30
    with pytest.raises(ValueError, match=r"'1905-02-31' is not a date of the model's "
                                         r"'360_day' calendar"):
        generate_ensemble(trained["run"], 1, {"time": ["1905-02-31"]}, progress=False)


def test_text_times_need_a_recorded_calendar(trained, tmp_path):
    """A model of 360_day data without day_of_year records the calendar too; a checkpoint
    whose spec predates the recording (version 1, no day_of_year) refuses text times instead
    of guessing the standard calendar."""
    import json
    import shutil

    from geodiff.samples import ConditionSpec

    run = Path(trained["run"])
    meta_path = ckpt.latest_checkpoint(run) / "meta.json"
    meta = json.loads(meta_path.read_text())
    spec = meta["cond_spec"]
    assert spec["calendar"] == "360_day" and not spec["day_of_year"] and spec["version"] == 2
    old = {k: v for k, v in spec.items() if k != "version"} | {"calendar": "standard"}
    assert ConditionSpec.from_dict(old).calendar is None
    legacy = tmp_path / "legacy"
    shutil.copytree(run, legacy)
    legacy_meta = ckpt.latest_checkpoint(legacy) / "meta.json"
    legacy_meta.write_text(json.dumps(meta | {"cond_spec": old}))
    with pytest.raises(ValueError, match="does not record the calendar of its training "
                                         "times"):
        generate_ensemble(legacy, 1, {"time": ["1905-06-01"]}, progress=False)


def test_gap_filling_members_default_to_the_recipe(trained):
    obs = trained["held_out"].isel(time=[0]).copy(deep=True)
    obs["tas"] = obs["tas"].where(np.random.default_rng(2).random(obs["tas"].shape) > 0.3)
    filled = fill_gaps(trained["run"], obs, steps=2, resample=1, progress=False)
    assert filled.sizes["member"] == load_model(trained["run"]).recipe.sampling.members == 3
    for key in ("members", "steps", "resample", "batch_size"):  # 0 is not "the default"
        with pytest.raises(ValueError, match=f"{key}=0 must be a positive integer"):
            fill_gaps(trained["run"], obs, **{key: 0}, out=trained["tmp"] / "never.nc")
        assert not list(trained["tmp"].glob("never.nc*"))
