"""Recipe parsing: one-to-one YAML mapping, clear errors with key paths, overrides."""

from __future__ import annotations

import pytest
import yaml

from geodiff.config import (
    ConfigError,
    Recipe,
    bundled_recipes,
    load_recipe,
    recipe_from_dict,
)

MINIMAL = {"name": "t", "data": {"source": "x.nc", "variables": ["tas"]}}


def test_minimal_recipe_gets_documented_defaults():
    r = recipe_from_dict(MINIMAL)
    assert isinstance(r, Recipe)
    assert r.data.variables == ("tas",)
    assert r.diffusion.parameterization == "edm"
    assert r.training.batch_size == 32


def test_round_trip_through_yaml_is_exact():
    r = load_recipe("quickstart")
    again = recipe_from_dict(yaml.safe_load(r.to_yaml()))
    assert again == r


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"training": {"stepz": 3}}, "training.stepz"),
        ({"training": {"steps": "many"}}, "training.steps = 'many' must be an integer"),
        ({"training": {"steps": 0}}, "training.steps = 0 is invalid: expected >= 1"),
        ({"diffusion": {"parameterization": "vp"}}, "choose one of ['edm', 'ddpm']"),
        ({"model": {"channels": [30, 60]}}, "divisible by groups=8"),
        ({"model": {"attention_levels": [5]}}, "level indices in 0..2"),
        ({"split": {"kind": "year_modulo", "remainder": 12}}, "split.remainder = 12"),
        ({"scaling": {"quantiles": [0.9, 0.1]}}, "scaling.quantiles"),
        ({"bogus": {}}, "unknown key(s) ['bogus']"),
        ({"sampling": {"sampler": "ddim", "timesteps": []}},
         "sampling.timesteps = [] is invalid: expected a non-empty list"),
        ({"sampling": {"sampler": "ddim", "timesteps": [50, 50, 0]}}, "each timestep once"),
        ({"sampling": {"sampler": "heun", "timesteps": [50, 0]}},
         "sampling.sampler = 'heun' is invalid: expected ddpm or ddim"),
        ({"sampling": {"sampler": "ddim", "timesteps": [50, 0]}},
         "null unless diffusion.parameterization is ddpm"),
        ({"sampling": {"sampler": "ddim", "timesteps": [100, 0]},
          "diffusion": {"parameterization": "ddpm", "timesteps": 100}},
         "timesteps below diffusion.timesteps (100)"),
        ({"model": {"groups": 0}}, "model.groups = 0 is invalid: expected >= 1"),
        ({"model": {"attention_heads": 3}}, "dividing the widths [256] of the attention"),
        ({"model": {"attention_heads": 0}}, "model.attention_heads = 0 is invalid"),
        ({"training": {"lr": float("inf")}}, "training.lr = inf must be a finite number"),
        ({"diffusion": {"p_mean": float("nan")}}, "diffusion.p_mean = nan must be a finite"),
        ({"training": {"max_time_s": -5}}, "training.max_time_s = -5.0 is invalid"),
        ({"training": {"weight_decay": -1}}, "training.weight_decay = -1.0 is invalid"),
        ({"training": {"lr": "fast"}}, "training.lr = 'fast' must be a number"),
        ({"sampling": {"guidance": 3.0}}, "1 unless conditioning.dropout > 0"),
        ({"diffusion": {"parameterization": "ddpm", "timesteps": 20}},
         "diffusion.timesteps = 20 is invalid: expected > 20 with schedule: linear"),
        ({"diffusion": {"parameterization": "ddpm", "timesteps": 50},
          "sampling": {"sampler": "ddpm", "steps": 60}},
         "sampling.steps = 60 is invalid: expected <= diffusion.timesteps (50)"),
        ({"training": {"ema_warmup_steps": -1}}, "training.ema_warmup_steps = -1 is invalid"),
        ({"split": {"kind": "fraction", "test_fraction": 0.95, "val_fraction": 0.1}},
         "val_fraction + test_fraction < 1"),
    ],
)
def test_bad_values_name_the_key_and_the_rule(patch, fragment):
    data = {**MINIMAL, **patch}
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(data)
    assert fragment in str(err.value)


def test_settings_a_choice_does_not_use_are_not_checked():
    """A split kind, schedule or sampler that ignores a setting does not refuse its value."""
    r = recipe_from_dict({**MINIMAL, "split": {"kind": "time_ranges", "test_fraction": 0.95,
                                               "modulo": 1, "train": ["1860", "1900"]}})
    assert r.split.test_fraction == 0.95
    recipe_from_dict({**MINIMAL, "diffusion": {"parameterization": "ddpm", "timesteps": 10,
                                               "schedule": "cosine"}})
    recipe_from_dict({**MINIMAL, "diffusion": {"timesteps": 10},  # edm: no timesteps used
                      "sampling": {"sampler": "heun", "steps": 60}})


def test_sampling_timesteps_on_a_ddpm_recipe():
    r = recipe_from_dict({**MINIMAL, "diffusion": {"parameterization": "ddpm"},
                          "sampling": {"sampler": "ddim", "timesteps": [999, 500, 0]}})
    assert r.sampling.timesteps == (999, 500, 0)
    assert recipe_from_dict(MINIMAL).sampling.timesteps is None


def test_yaml_1_1_readings_of_numbers_and_dates_are_what_the_user_meant():
    # PyYAML reads 1e-4 (no dot) as a string and an unquoted 1860-01-01 as a date
    r = recipe_from_dict(yaml.safe_load(
        "name: t\ndata: {source: x.nc, variables: [tas]}\ntraining: {lr: 1e-4}\n"
        "split: {kind: time_ranges, train: [1860-01-01, 1999-12-30]}\n"
        "sampling: {rho: .inf}\n"))
    assert r.training.lr == 1e-4
    assert r.split.train == ("1860-01-01", "1999-12-30")
    assert r.sampling.rho == float("inf")  # .inf means log-uniform levels there
    guided = recipe_from_dict({**MINIMAL, "conditioning": {"dropout": 0.1},
                               "sampling": {"guidance": 3.0}})
    assert guided.sampling.guidance == 3.0


def test_missing_required_key():
    with pytest.raises(ConfigError, match="missing required key 'data.variables'"):
        recipe_from_dict({"name": "t", "data": {"source": "x.nc"}})


def test_overrides_parse_yaml_values_and_validate():
    r = recipe_from_dict(MINIMAL).override(["training.steps=7", "model.channels=[16, 32, 64]",
                                            "diffusion.sigma_data=0.5"])
    assert r.training.steps == 7
    assert r.model.channels == (16, 32, 64)
    assert r.diffusion.sigma_data == 0.5
    with pytest.raises(ConfigError, match="training.lr = -1.0 is invalid"):
        r.override(["training.lr=-1"])
    with pytest.raises(ConfigError, match="not a section"):
        r.override(["nosuch.key=1"])


def test_bare_off_is_the_string_off_not_false():
    # YAML 1.1 (PyYAML) reads `amp: off` as False; the recipe still means the option "off"
    r = recipe_from_dict(yaml.safe_load("name: t\ndata: {source: x.nc, variables: [tas]}\n"
                                        "training: {amp: off}\n"))
    assert r.training.amp == "off"
    assert recipe_from_dict(MINIMAL).override(["training.amp=off"]).training.amp == "off"
    with pytest.raises(ConfigError, match="training.amp = True is not allowed"):
        recipe_from_dict(MINIMAL).override(["training.amp=on"])  # no "on" option


def test_trend_anomaly_requires_year_conditioning():
    data = {**MINIMAL, "scaling": {"anomaly": "trend"}}
    with pytest.raises(ConfigError, match="conditioning.year: true"):
        recipe_from_dict(data)


def test_all_bundled_recipes_validate():
    names = bundled_recipes()
    assert "quickstart" in names
    for name in names:
        assert load_recipe(name).name


def test_unknown_recipe_lists_bundled_ones():
    with pytest.raises(ConfigError, match="bundled recipes are"):
        load_recipe("no-such-recipe")
