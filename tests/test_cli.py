"""The ``geodiff`` command line, run as a real subprocess on small data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr

from geodiff import __version__
from tests.toy import recipe_path, toy_recipe

ROOT = Path(__file__).resolve().parents[1]


def geodiff(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "geodiff", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_help_and_version():
    out = geodiff("--help")
    assert out.returncode == 0
    for verb in ("catalog", "recipe", "train", "generate", "fill-gaps", "evaluate", "plot",
                 "quickstart"):
        assert verb in out.stdout
    ver = geodiff("--version")
    assert ver.returncode == 0 and ver.stdout.strip() == f"geodiff {__version__}"
    for verb in ("catalog", "recipe"):  # a verb without its action is bad input, like bare geodiff
        bare = geodiff(verb)
        assert bare.returncode == 2 and "required: ACTION" in bare.stderr, bare.stderr


def test_catalog_list_and_show():
    out = geodiff("catalog", "list")
    assert out.returncode == 0
    assert "iris_north_america" in out.stdout and "era5_wb2_5p625" in out.stdout
    show = geodiff("catalog", "show", "iris_north_america")
    assert show.returncode == 0
    for fragment in ("air_temperature", "scenario", "Open Government Licence", "360_day"):
        assert fragment in show.stdout, fragment


def test_unknown_catalog_entry_is_exit_2_with_close_names():
    out = geodiff("catalog", "show", "iris_north_americ")
    assert out.returncode == 2
    assert "iris_north_america" in out.stderr


def test_recipe_validate_good_and_bad(tmp_path):
    ok = geodiff("recipe", "validate", "quickstart", "--set", "training.steps=5")
    assert ok.returncode == 0 and "steps: 5" in ok.stdout
    bad = geodiff("recipe", "validate", "quickstart", "--set", "training.sampler=heun")
    assert bad.returncode == 2
    assert "training.sampler" in bad.stderr and "allowed keys" in bad.stderr


@pytest.mark.parametrize("name", ["quickstart", "ostia_gapfill", "era5_5p625"])
def test_bundled_recipes_validate(name):
    assert geodiff("recipe", "validate", name).returncode == 0


def test_dry_run_prints_shapes_parameters_and_time():
    out = geodiff("train", "quickstart", "--dry-run", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "grid (lat x lon): 37 x 49" in out.stdout
    assert "parameters:" in out.stdout and "time per step" in out.stdout


def test_dry_run_of_remote_recipe_with_given_grid():
    out = geodiff("train", "era5_5p625", "--dry-run", "--grid", "32x64",
                  "--set", "model.channels=[16,32,64]", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "32 x 64" in out.stdout


def test_train_generate_evaluate_plot_end_to_end(tmp_path):
    toy_recipe(tmp_path, training={"steps": 4, "checkpoint_every": 4})
    run = tmp_path / "run"
    tr = geodiff("train", str(recipe_path(tmp_path)), "--out", str(run), "--device", "cpu")
    assert tr.returncode == 0, tr.stderr
    source = xr.open_dataset(tmp_path / "toy.nc")
    obs = source.isel(time=[5, 15])
    obs.to_netcdf(tmp_path / "obs.nc")
    ens = tmp_path / "ens.nc"
    gen = geodiff("generate", str(run), "--members", "4", "--conditions", str(tmp_path / "obs.nc"),
                  "--out", str(ens), "--seed", "1")
    assert gen.returncode == 0, gen.stderr
    again = geodiff("generate", str(run), "--members", "4", "--conditions",
                    str(tmp_path / "obs.nc"), "--out", str(ens))
    assert again.returncode == 2 and "--overwrite" in again.stderr
    ev = geodiff("evaluate", str(ens), "--obs", str(tmp_path / "obs.nc"), "--out",
                 str(tmp_path / "report"))
    assert ev.returncode == 0, ev.stderr
    summary = json.loads((tmp_path / "report" / "scores.json").read_text())["summary"]
    assert summary["n_members"] == 4 and summary["crps_fair"] > 0
    png = tmp_path / "mean.png"
    pl = geodiff("plot", str(ens), "--kind", "mean", "--out", str(png))
    assert pl.returncode == 0, pl.stderr
    assert png.stat().st_size > 5000
    gaps = obs.copy(deep=True)
    gaps["tas"] = gaps["tas"].where(gaps["latitude"] > 0)
    gaps.to_netcdf(tmp_path / "gaps.nc")
    fill = geodiff("fill-gaps", str(run), str(tmp_path / "gaps.nc"), "--members", "2",
                   "--steps", "3", "--resample", "2", "--out", str(tmp_path / "filled.nc"))
    assert fill.returncode == 0, fill.stderr
    filled = xr.open_dataset(tmp_path / "filled.nc")
    assert filled.sizes["member"] == 2 and int(filled["tas"].isnull().sum()) < int(
        gaps["tas"].isnull().sum()) * 2


def test_generate_from_missing_checkpoint_is_exit_2(tmp_path):
    out = geodiff("generate", str(tmp_path / "nothing"), "--out", str(tmp_path / "e.nc"))
    assert out.returncode == 2
    assert "train first" in out.stderr


def test_generate_timesteps_must_be_comma_separated_integers(tmp_path):
    out = geodiff("generate", str(tmp_path / "no_run"), "--timesteps", "999,5x0",
                  "--out", str(tmp_path / "e.nc"))
    assert out.returncode == 2
    assert "'999,5x0': expected comma-separated integers" in out.stderr
    assert not (tmp_path / "e.nc").exists()


@pytest.mark.parametrize(("value", "message"), [
    ("conds_typo.nc", "--conditions 'conds_typo.nc' is neither an existing file nor inline JSON"),
    ('{"year": [2050,]}', "is not valid JSON"),
])
def test_generate_conditions_are_json_or_an_existing_file(tmp_path, capsys, value, message):
    from geodiff.cli import main
    code = main(["generate", str(tmp_path / "no_run"), "--conditions", value,
                 "--out", str(tmp_path / "e.nc")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "e.nc").exists()


def test_negative_seed_names_the_flag(tmp_path, capsys):
    from geodiff.cli import main
    with pytest.raises(SystemExit) as err:
        main(["generate", str(tmp_path / "no_run"), "--seed", "-1", "--out",
              str(tmp_path / "e.nc")])
    assert err.value.code == 2
    assert "--seed '-1': expected an integer >= 0" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["fill-gaps", "RUN", "OBS", "--steps", "0"], "--steps '0': expected an integer >= 1"),
    (["fill-gaps", "RUN", "OBS", "--steps", "-3"], "--steps '-3': expected an integer >= 1"),
    (["fill-gaps", "RUN", "OBS", "--resample", "0"], "--resample '0': expected an integer"),
    (["fill-gaps", "RUN", "OBS", "--batch-size", "-1"], "--batch-size '-1': expected an"),
    (["generate", "RUN", "--compute-batch", "0"], "--compute-batch '0': expected an"),
    (["generate", "RUN", "--members", "two"], "--members 'two': expected an integer >= 1"),
    (["generate", "RUN", "--device", "gpu"], "--device 'gpu' is not a device"),
    (["train", "quickstart", "--device", "cuda0"], "--device 'cuda0' is not a device"),
])
def test_bad_numbers_and_devices_are_refused_before_any_work(tmp_path, capsys, args, message):
    """fill-gaps took 0 as 'the recipe default' and -3 only after writing a .partial file;
    --device gpu failed inside the run (exit 1, traceback)."""
    from geodiff.cli import main
    args = [str(tmp_path / "x") if a in ("RUN", "OBS") else a for a in args]
    with pytest.raises(SystemExit) as err:
        main([*args, "--out", str(tmp_path / "e.nc")] if args[0] != "train" else args)
    assert err.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_evaluate_and_train_refuse_an_existing_file_as_out_before_work(tmp_path, capsys,
                                                                       monkeypatch):
    import importlib

    from geodiff.cli import main
    train_module = importlib.import_module("geodiff.train")  # geodiff.train is also a function
    (tmp_path / "scores.json").write_text("{}")
    code = main(["evaluate", str(tmp_path / "ens.nc"), "--obs", str(tmp_path / "obs.nc"),
                 "--out", str(tmp_path / "scores.json")])
    assert code == 2
    assert "--out '" in (err := capsys.readouterr().err) and "is an existing file" in err

    def no_data(recipe):
        raise AssertionError("the data was prepared before --out was checked")

    monkeypatch.setattr(train_module, "prepare_data", no_data)
    code = main(["train", "quickstart", "--out", str(tmp_path / "scores.json"), "--device",
                 "cpu"])
    assert code == 2
    assert "is an existing file; the run is a folder" in capsys.readouterr().err


def small_ensemble_file(path: Path) -> Path:
    """(member 3, time 3, lat 4, lon 5) with a ``year`` coordinate and CF ``time_bnds``."""
    import numpy as np
    rng = np.random.default_rng(0)
    ds = xr.Dataset(
        {"time_bnds": (("time", "bnds"), np.zeros((3, 2))),
         "tas": (("member", "time", "lat", "lon"), 280.0 + rng.normal(size=(3, 3, 4, 5)),
                 {"units": "K", "long_name": "air temperature"})},
        coords={"member": [0, 1, 2], "time": [0, 1, 2], "year": ("time", [2050, 2060, 2070]),
                "lat": [30.0, 35.0, 40.0, 45.0], "lon": [0.0, 5.0, 10.0, 15.0, 20.0]})
    ds.to_netcdf(path)
    return path


def test_plot_picks_the_field_and_members_from_the_command_line(tmp_path, capsys, monkeypatch):
    from geodiff import plot
    from geodiff.cli import main
    figs = []
    monkeypatch.setattr(plot, "_save", lambda fig, out, dpi=110: figs.append(fig) or out)
    ens = small_ensemble_file(tmp_path / "ens with space.nc")
    code = main(["plot", str(ens), "--kind", "members", "--sel", "year=2060", "--member", "2",
                 "--member", "0", "--out", str(tmp_path / "m.png")])
    assert code == 0, capsys.readouterr().err
    assert "time=1" in figs[-1]._suptitle.get_text()
    assert [ax.get_title() for ax in figs[-1].axes[:2]] == ["member 2", "member 0"]
    assert main(["plot", str(ens), "--sel", "time=2", "--out", str(tmp_path / "m.png")]) == 0
    assert "time=2" in figs[-1]._suptitle.get_text()
    assert main(["plot", str(ens), "--sel", "year=1999", "--out", str(tmp_path / "m.png")]) == 2
    assert "sel year=1999: no field" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plot", str(ens), "--sel", "year", "--out", str(tmp_path / "m.png")])
    assert "expected DIM=VALUE" in capsys.readouterr().err


def test_dry_run_with_a_grid_that_needs_padding():
    """--grid assumed pole padding everywhere: 37x49 (padded to 40x52, odd width 13 at the
    coarsest level) failed although the real data trains (zero padding across the poles)."""
    out = geodiff("train", "quickstart", "--dry-run", "--grid", "37x49", "--device", "cpu",
                  "--set", "model.channels=[8,16,32]", "--set", "model.attention_levels=[]")
    assert out.returncode == 0, out.stderr
    assert "grid (lat x lon): 37 x 49, padded to 40 x 52" in out.stdout
    bad = geodiff("train", "quickstart", "--dry-run", "--grid", "0x49")
    assert bad.returncode == 2 and "--grid '0x49' must look like 32x64" in bad.stderr
