"""Training end to end on a tiny real NetCDF: checkpoints, exact resume after SIGKILL,
2-process DDP vs one process, NaN loss handling, grid mismatch on resume."""

from __future__ import annotations

import json
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
from geodiff.train import NonFiniteLossError, Trainer, batch_indices, lr_factor, train
from tests.toy import recipe_path, toy_field_file, toy_predictor_file, toy_recipe

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _weights(run: Path, which: str = "model") -> dict[str, torch.Tensor]:
    return ckpt.load_weights(ckpt.latest_checkpoint(run), which)


def test_train_writes_checkpoints_metrics_and_meta(tmp_path):
    recipe = toy_recipe(tmp_path)
    result = train(recipe, tmp_path / "run", progress=False)
    assert result.steps == 8
    done = ckpt.list_checkpoints(tmp_path / "run")
    assert [p.name for p in done] == ["step_0000004", "step_0000008"]
    meta = ckpt.load_meta(done[-1])
    assert meta["variables"] == ["tas"] and meta["step"] == 8
    assert meta["grid"]["lat_descending"] is True
    assert 0.1 < meta["spec"]["sigma_data"] < 1.0
    state = torch.load(done[-1] / "state.pt", weights_only=True)
    assert state["step"] == 8
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "vlb_bits_per_dim" in lines[-1] and lines[-1]["vlb_bits_per_dim"] == pytest.approx(
        result.vlb_bits_per_dim)
    # dequantised NLL on 256 bins of [-1, 1]: a few bits/dim, finite and positive
    assert 0 < result.vlb_bits_per_dim < 20
    lines = lines[:-1]
    assert [r["step"] for r in lines] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) for r in lines)
    assert "val_loss" in lines[3] and np.isfinite(lines[3]["val_loss"])
    # EMA differs from the raw weights after training
    raw, ema = _weights(tmp_path / "run", "model"), _weights(tmp_path / "run", "ema")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    recipe = toy_recipe(tmp_path, training={"checkpoint_every": 2, "keep_last": 2})
    train(recipe, tmp_path / "run", progress=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == [
        "step_0000006", "step_0000008"]


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    recipe = toy_recipe(tmp_path, training={"steps": 2, "checkpoint_every": 2})
    train(recipe, tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(recipe, tmp_path / "run", progress=False)


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """A run killed with SIGKILL after its first checkpoint and resumed ends with exactly the
    weights of an uninterrupted run (CPU, same seeds)."""
    steps = 24
    toy_recipe(tmp_path, training={"steps": steps, "checkpoint_every": 4})
    rpath = recipe_path(tmp_path)
    cmd = [sys.executable, "-m", "geodiff", "train", str(rpath), "--device", "cpu"]
    ref = subprocess.run([*cmd, "--out", str(tmp_path / "ref")], env=_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.list_checkpoints(tmp_path / "killed") and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = ckpt.latest_checkpoint(tmp_path / "killed")
    assert last is not None and int(last.name.split("_")[1]) < steps, "kill came too late"
    resumed = subprocess.run([*cmd, "--out", str(tmp_path / "killed"), "--resume"], env=_env(),
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea, eb = _weights(tmp_path / "ref", "ema"), _weights(tmp_path / "killed", "ema")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_ddp_two_processes_match_one_process(tmp_path):
    """torchrun with 2 gloo processes (global batch 4 = 2 x 2) against one process with batch
    4: same samples and noise by construction, so the gradients agree to float32 round-off of
    the all-reduce.  Adam's update lr * m / (sqrt(v) + eps) amplifies that round-off for
    near-zero gradient components, but never beyond a fraction of one step: we require
    |difference| < 0.1 lr after 6 steps, while a different seed moves weights by ~lr."""
    recipe = toy_recipe(tmp_path, training={"steps": 6, "checkpoint_every": 6})
    rpath = recipe_path(tmp_path)
    single = train(recipe, tmp_path / "single", progress=False)
    assert single.steps == 6
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=29517", "-m", "geodiff", "train", str(rpath), "--out",
           str(tmp_path / "ddp"), "--device", "cpu"]
    out = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    lr = recipe.training.lr
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 0.1 * lr, worst

    def logged(run, key):
        return [json.loads(line)[key] for line in (tmp_path / run / "metrics.jsonl").open()
                if key in json.loads(line)]

    # the logged losses are the global batch's, not rank 0's half (which differ by ~5 %)
    assert logged("ddp", "val_loss")[-1] == pytest.approx(logged("single", "val_loss")[-1],
                                                          rel=1e-3)
    assert logged("ddp", "loss") == pytest.approx(logged("single", "loss"), rel=1e-3)
    other = train(recipe.override(["training.seed=1"]), tmp_path / "seed1", progress=False)
    c = _weights(other.run_dir)
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > lr


def test_nonfinite_loss_stops_with_step_batch_and_checkpoint(tmp_path):
    recipe = toy_recipe(tmp_path, training={"steps": 40, "lr": 1e12, "grad_clip": 0.0,
                                            "warmup_steps": 0, "checkpoint_every": 1})
    with pytest.raises(NonFiniteLossError) as err:
        train(recipe, tmp_path / "run", progress=False)
    msg = str(err.value)
    assert "at step" in msg and "time" in msg and "step_" in msg and "on_nonfinite" in msg


def test_nonfinite_loss_can_be_skipped(tmp_path, monkeypatch):
    """A skipped step still checkpoints, validates and logs; diverged weights (every step
    non-finite) stop the run instead of being 'skipped' to the end."""
    from geodiff.train import MAX_CONSECUTIVE_SKIPS, Trainer

    recipe = toy_recipe(tmp_path, training={"steps": 8, "checkpoint_every": 4,
                                            "log_every": 100, "on_nonfinite": "skip"})
    trainer = Trainer(recipe, tmp_path / "run", progress=False)
    real = trainer.loss_on

    def bad_last_step(module, batch, gen, **kw):
        loss = real(module, batch, gen, **kw)
        return loss * float("nan") if trainer.step in (2, 7) and \
            module is trainer.train_module else loss

    monkeypatch.setattr(trainer, "loss_on", bad_last_step)
    result = trainer.fit()
    assert result.steps == 8 and result.checkpoint.name == "step_0000008"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    last = [r for r in records if r.get("step") == 8 and "lr" in r][0]
    assert last["loss"] is None and last["skipped_nonfinite"] == 2 and "val_loss" in last
    # a skipped step off the log_every grid is on record too
    third = [r for r in records if r.get("step") == 3]
    assert len(third) == 1 and third[0]["loss"] is None and third[0]["skipped_nonfinite"] == 1
    (tmp_path / "b").mkdir()
    diverging = toy_recipe(tmp_path / "b", training={"steps": 40, "lr": 1e12, "grad_clip": 0.0,
                                                     "warmup_steps": 0, "on_nonfinite": "skip"})
    with pytest.raises(NonFiniteLossError, match=f"non-finite on {MAX_CONSECUTIVE_SKIPS} "
                                                 "consecutive steps"):
        train(diverging, tmp_path / "run2", progress=False)


def test_resume_drops_the_metrics_logged_after_the_checkpoint_and_applies_the_recipe(
        tmp_path):
    from geodiff.train import Trainer, _truncate_metrics

    recipe = toy_recipe(tmp_path, training={"steps": 4, "checkpoint_every": 2})
    train(recipe, tmp_path / "run", progress=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as fh:  # as if killed after step 6 (checkpoint at 4), mid-line
        fh.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + '{"step": 6, "lo')
    longer = recipe.override(["training.steps=8", "training.weight_decay=0.05"])
    trainer = Trainer(longer, tmp_path / "run", resume=True, progress=False)
    assert trainer.step == 4
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.05]
    steps = [json.loads(line)["step"] for line in metrics.open()]
    assert max(steps) == 4 and steps == sorted(steps)
    _truncate_metrics(tmp_path / "absent.jsonl", 3)  # nothing to do, no error


def test_resume_against_other_grid_says_what_differs(tmp_path):
    recipe = toy_recipe(tmp_path, training={"steps": 2, "checkpoint_every": 2})
    train(recipe, tmp_path / "run", progress=False)
    other = toy_field_file(tmp_path / "other.nc", n_lat=12)
    moved = recipe.override([f"data.source={other}"])
    with pytest.raises(ValueError, match="lat: checkpoint has 8 points"):
        Trainer(moved, tmp_path / "run", resume=True, progress=False)


def test_mask_channel_is_decided_by_the_train_split_for_val_and_generation(tmp_path):
    """One missing pixel in one training year only: validation and generation get the mask
    channel too (the network has one input more), and generation's mask marks every pixel
    valid in training as valid, not the first sample's own gaps."""
    from geodiff.ensemble import generate_ensemble
    from geodiff.pipeline import load_model, prepare_data

    src = xr.open_dataset(toy_field_file(tmp_path / "clean.nc", land=False)).load()
    src["tas"][1, 2, 5] = np.nan  # 1901: a training year (val is 1936..1939)
    src["tas"][0, 3, 4] = np.nan  # 1900: the first training sample has a gap too
    src.to_netcdf(tmp_path / "gap.nc")
    recipe = toy_recipe(tmp_path, data=tmp_path / "gap.nc",
                        training={"steps": 2, "checkpoint_every": 2, "val_every": 1})
    bundle = prepare_data(recipe)
    names = ["sin_lat", "cos_lat", "sin_lon", "cos_lon", "mask"]
    assert bundle.train.field_names == bundle.val.field_names == names
    assert bundle.spec["in_channels"] == 1 + 5
    assert bool(torch.isnan(torch.stack([bundle.val[i]["x"] for i in range(len(bundle.val))])
                            ).any()) is False
    assert torch.equal(bundle.val[0]["fields"][4], torch.ones(8, 16))  # no gap in val
    assert torch.equal(bundle.fields[4], torch.ones(8, 16))  # 8 x 16: no padding here
    first = bundle.train[0]["fields"][4]  # its own gap: latitude row 3 of 8, north first
    assert first[8 - 1 - 3, 4] == 0.0 and first.sum() == 8 * 16 - 1
    result = train(recipe, tmp_path / "run", progress=False)
    assert np.isfinite(result.val_loss)
    model = load_model(result.checkpoint, device="cpu")
    assert model.fields.shape == (5, 8, 16) and torch.equal(model.fields, bundle.fields)
    ens = generate_ensemble(model, members=1, conditions={"time": src.time.values[:1]},
                            steps=2, progress=False)
    assert ens["tas"].shape == (1, 1, 8, 16) and not bool(ens["tas"].isnull().any())


def test_condition_and_static_fields_are_opened_scaled_and_recorded(tmp_path):
    """conditioning.fields are opened with the data and scaled by its Scaler (own statistics
    of the train split), not fed raw; static fields enter standardised and, with the
    coordinate and mask channels, are stored in the checkpoint, whose fields leave out the
    time-varying ones (given per cell at generation)."""
    from geodiff.pipeline import prepare_data

    source = toy_predictor_file(tmp_path / "pred.nc")
    recipe = toy_recipe(tmp_path, data=source, training={"steps": 2, "checkpoint_every": 2},
                        conditioning={"fields": ["pr"], "static_fields": ["orog"]})
    bundle = prepare_data(recipe)
    assert bundle.scaler.variables == ("tas", "pr")
    names = ["sin_lat", "cos_lat", "sin_lon", "cos_lon", "mask", "orog", "pr"]
    assert bundle.train.field_names == names and bundle.train.condition_channels == ["pr"]
    # 8 x 16 grid: no padding. Trend anomaly / per-pixel std, standard scaling with n_std=4:
    # mean 0 and std 1/4 over the train split (raw pr: gamma(2, 1), mean 2, std 1.4)
    pr = torch.stack([bundle.train[i]["fields"][-1] for i in range(len(bundle.train))])
    assert abs(float(pr.mean())) < 1e-3 and float(pr.std()) == pytest.approx(0.25, rel=0.02)
    orog = xr.open_dataset(source)["orog"].sortby("latitude").values  # canonical: S to N
    assert bundle.fields.shape == (6, 8, 16)
    np.testing.assert_allclose(bundle.fields[5].numpy(), (orog - orog.mean()) / orog.std(),
                               rtol=1e-5, atol=1e-6)
    assert bundle.spec["in_channels"] == 1 + 7
    static_as_field = recipe.override(["conditioning.fields=[orog]",
                                       "conditioning.static_fields=[]"])
    with pytest.raises(ValueError, match=r"'orog' has dims \('lat', 'lon'\), without the "
                                         r"sample dims \['time'\]; list time-invariant"):
        prepare_data(static_as_field)
    result = train(recipe, tmp_path / "run", progress=False)
    meta = ckpt.load_meta(result.checkpoint)
    assert meta["field_names"] == names and meta["condition_channels"] == ["pr"]
    assert np.asarray(meta["fields"]).shape == (6, 8, 16)
    assert list(meta["scaler"]["variables"]) == ["tas", "pr"]


@pytest.mark.parametrize(("conditioning", "fragment"), [
    ({"fields": ["tas"]}, r"conditioning.fields = \['tas'\] is invalid.*\['tas'\] would be"),
    ({"static_fields": ["tas"]}, r"conditioning.static_fields = \['tas'\] is invalid"),
    ({"fields": ["pr"], "static_fields": ["pr"]}, r"other than conditioning.fields"),
])
def test_a_condition_field_that_is_also_generated_is_refused(tmp_path, conditioning, fragment):
    from geodiff.config import ConfigError

    with pytest.raises(ConfigError, match=fragment):
        toy_recipe(tmp_path, conditioning=conditioning)


def test_batch_order_and_lr_schedule_are_pure_functions_of_the_step():
    a = batch_indices(10, 4, seed=3, step=5)
    assert np.array_equal(a, batch_indices(10, 4, seed=3, step=5))
    epoch0 = np.concatenate([batch_indices(10, 4, 3, s) for s in range(2)])
    assert len(set(epoch0.tolist())) == 8  # no repeats within an epoch
    assert lr_factor(0, 10, 100, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, "cosine") == pytest.approx(0.1)
    assert lr_factor(50, 0, 100, "constant") == 1.0



def test_streamed_data_through_loader_workers_trains_bit_identically(tmp_path):
    # the same steps read in-process from memory, and streamed from the NetCDF file by two
    # DataLoader worker processes that prefetch: same batches, so the same weights exactly
    recipe = toy_recipe(tmp_path, training={"steps": 5, "checkpoint_every": 5})
    ref = train(recipe, tmp_path / "ref", progress=False)
    streamed = recipe.override(["data.memory_budget_gb=0", "training.num_workers=2"])
    run = train(streamed, tmp_path / "streamed", progress=False)
    assert run.steps == ref.steps == 5
    a, b = _weights(ref.run_dir), _weights(run.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run.final_loss == ref.final_loss


def test_tensorstore_reader_through_threads_trains_bit_identically(tmp_path):
    # data.reader=tensorstore streams the Zarr copy of the toy file: each batch one
    # tensorstore read, scaled per batch (this recipe's trend anomaly takes the general
    # Scaler.transform route), read ahead by two threads: same batches, same weights
    pytest.importorskip("xarray_tensorstore")
    store = tmp_path / "toy.zarr"
    recipe = toy_recipe(tmp_path, training={"steps": 5, "checkpoint_every": 5})
    xr.open_dataset(recipe.data.source).to_zarr(store, zarr_format=3, consolidated=False)
    ref = train(recipe.override([f"data.source={store}"]), tmp_path / "ref", progress=False)
    streamed = recipe.override([f"data.source={store}", "data.reader=tensorstore",
                                "data.memory_budget_gb=0", "training.num_workers=2"])
    from geodiff.pipeline import prepare_data
    bundle = prepare_data(streamed)
    assert not bundle.train.in_memory and not bundle.train.fork_safe  # the threaded path
    run = train(streamed, tmp_path / "streamed", progress=False)
    assert run.steps == ref.steps == 5
    a, b = _weights(ref.run_dir), _weights(run.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run.final_loss == ref.final_loss


def test_pole_padding_only_where_it_is_exact(tmp_path):
    """Cross-pole padding needs cell-centred rows from pole to pole, no data-layer padding
    and an even width at the coarsest level; otherwise auto falls back to zero padding and
    'yes' is refused before any training."""
    from geodiff.data import compute_padding
    from geodiff.pipeline import pole_padding_fits, prepare_data

    def fits(lat, n_lon, multiple):
        lon = np.arange(n_lon) * 360.0 / n_lon
        pad = compute_padding(len(lat), n_lon, multiple, True)
        return pole_padding_fits(np.asarray(lat), lon, True, pad, multiple)

    centred = np.linspace(-78.75, 78.75, 8)  # 22.5 deg rows, half a row from each pole
    assert fits(centred, 16, 2) == (True, "")
    assert fits(centred, 16, 4)[0]  # 16 / 4 = 4 columns at the coarsest level
    ok, why = fits(np.linspace(-90.0, 90.0, 9), 16, 2)  # rows at the poles (ERA5-style)
    assert not ok and "not cell-centred" in why
    ok, why = fits(np.linspace(-85.0, 85.0, 18), 36, 4)  # 18 x 36 padded to 20 x 36
    assert not ok and "padded to multiples of 4" in why
    assert fits(centred, 24, 4)[0]  # 24 / 4 = 6 columns: even
    ok, why = fits(centred, 24, 8)  # 24 / 8 = 3: odd
    assert not ok and "odd width 3" in why
    bundle = prepare_data(toy_recipe(tmp_path))  # the toy grid: 8 x 16, cell-centred
    assert bundle.spec["global_lat"] is True
    odd = toy_field_file(tmp_path / "odd.nc", n_lon=18)  # 18 / 2 = 9: odd coarsest width
    assert prepare_data(toy_recipe(tmp_path, data=odd)).spec["global_lat"] is False
    with pytest.raises(ValueError, match="odd width 9 at the coarsest level"):
        prepare_data(toy_recipe(tmp_path, data=odd, model={"pole_padding": "yes"}))


def test_ddpm_networks_embed_fractional_timesteps_smoothly(tmp_path):
    """DDPM samplers other than ancestral/DDIM ask for fractional timesteps (Heun, DPM-Solver++,
    gap filling): with at most 1 rad per step the features of t + 0.5 lie between those of t
    and t + 1 (Ho et al.'s embedding); at 100 rad per step they are unrelated to both."""
    from geodiff.nn import NoiseLevelEmbedding
    from geodiff.pipeline import build_denoiser, prepare_data

    recipe = toy_recipe(tmp_path, diffusion={"parameterization": "ddpm"})
    bundle = prepare_data(recipe)
    assert bundle.spec["noise_max_freq"] == 1.0
    den = build_denoiser(recipe, bundle)
    assert float(den.net.noise_embedding.freqs.max()) == pytest.approx(1.0)
    old_spec = {k: v for k, v in bundle.spec.items() if k != "noise_max_freq"}
    assert float(build_denoiser(recipe, old_spec).net.noise_embedding.freqs.max()) == \
        pytest.approx(100.0)  # checkpoints written before keep their embedding

    t = torch.arange(100.0, 900.0, 37.0)

    def mid_gap(max_freq):
        emb = NoiseLevelEmbedding(64, 8, max_freq=max_freq)
        f0, f1, fm = emb.features(t), emb.features(t + 1), emb.features(t + 0.5)
        return float(((fm - (f0 + f1) / 2).norm(dim=1) / (f1 - f0).norm(dim=1)).max())

    assert mid_gap(1.0) < 0.15 < 0.5 < mid_gap(100.0)


def test_dropout_is_a_function_of_the_step_and_leaves_the_global_rng_alone(tmp_path):
    """With dropout on, a run resumed from a checkpoint in a process whose global random
    state is elsewhere ends with the uninterrupted run's weights exactly, and training never
    moves the caller's global generator."""
    from geodiff.train import Trainer

    recipe = toy_recipe(tmp_path, model={"dropout": 0.3},
                        training={"steps": 4, "checkpoint_every": 2})
    torch.manual_seed(123)
    before = torch.get_rng_state()
    straight = train(recipe, tmp_path / "straight", progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    half = recipe.override(["training.steps=2"])
    train(half, tmp_path / "halves", progress=False)
    torch.manual_seed(999)  # another program state: must not matter
    torch.rand(17)
    resumed = Trainer(recipe, tmp_path / "halves", resume=True, progress=False).fit()
    a = ckpt.load_weights(straight.checkpoint, "model")
    b = ckpt.load_weights(resumed.checkpoint, "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and dropout is really applied: without it the same run ends elsewhere
    other = train(recipe.override(["model.dropout=0.0"]), tmp_path / "other", progress=False)
    c = ckpt.load_weights(other.checkpoint, "model")
    assert any(not torch.equal(a[k], c[k]) for k in a)
