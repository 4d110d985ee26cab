"""The training loop: data -> scaled tensors -> preconditioned UNet -> checkpoints.

Exact resume
------------
Every random number of optimizer step ``k`` comes from a generator seeded with
``(seed, k)``: the batch order of an epoch from ``(seed, epoch)``, the noise levels and
noise of the *global* batch from ``(seed, k)`` (each DDP rank slices its rows).  Nothing
random therefore depends on how many steps ran in this process, so a run killed at any
point and resumed from its last checkpoint reproduces the uninterrupted run bit for bit on
CPU, and a 2-process DDP run sees the same samples and noise as one process with the same
global batch.  Dropout, which can only draw from torch's default generators, draws from
them reseeded with ``(seed, k, rank)`` for the forward pass of step ``k`` and restored
afterwards (:func:`dropout_rng`): its masks too are a function of the step, on CPU and
CUDA alike, with nothing to checkpoint, and the caller's global random state is untouched.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from geodiff import checkpoint as ckpt
from geodiff.config import Recipe
from geodiff.pipeline import DataBundle, Objective, build_denoiser, draw_noise, prepare_data
from geodiff.runtime import Dist, autocast, barrier, init_distributed, resolve_device, uses_bf16

_SEED_STRIDE = 1_000_003


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf (message names the step, the batch and the last checkpoint)."""


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    steps: int
    final_loss: float
    val_loss: float | None
    seconds: float
    vlb_bits_per_dim: float | None = None


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of every random number drawn at optimizer step ``step``."""
    return torch.Generator().manual_seed(seed * _SEED_STRIDE + step)


@contextmanager
def dropout_rng(seed: int, step: int, rank: int, device: torch.device) -> Iterator[None]:
    """Run the block with the default generators of the CPU and ``device`` seeded from
    ``(seed, step, rank)``, and restore their states afterwards.

    ``nn.Dropout`` takes no generator, so this is how its masks become a pure function of
    the step (exact resume on any device, a different mask on every DDP rank) without
    consuming or disturbing the global random state of the program that called train.
    """
    state = int(np.random.SeedSequence([seed, step, rank, 0xD50]).generate_state(
        1, np.uint64)[0] >> 1)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.default_generator.manual_seed(state)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(state)
        yield


def batch_indices(n: int, batch: int, seed: int, step: int) -> np.ndarray:
    """Sample indices of the global batch of ``step`` (epoch-wise permutations, drop-last)."""
    per_epoch = max(n // batch, 1)
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    if n < batch:  # tiny data sets: sample with replacement from the permutation
        return np.resize(perm, batch)
    return perm[pos * batch:(pos + 1) * batch]


class _StepBatches(torch.utils.data.Sampler):
    """Batch sampler: the indices of the global batch of each step in ``[start, stop)``."""

    def __init__(self, n: int, batch: int, seed: int, start: int, stop: int) -> None:
        self.n, self.batch, self.seed, self.start, self.stop = n, batch, seed, start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield batch_indices(self.n, self.batch, self.seed, step).tolist()

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up then cosine decay to 10 % (or constant) of the base learning rate."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay(halflife_steps: float) -> float:
    """Per-step EMA decay for a half-life in steps: 0.5 ** (1 / half-life)."""
    return 0.5 ** (1.0 / halflife_steps)


class Trainer:
    """Train one recipe into ``run_dir`` (resumable, DDP-aware under torchrun)."""

    def __init__(self, recipe: Recipe, run_dir: str | Path, *, device: str | None = None,
                 resume: bool = False, progress: bool = True, data: DataBundle | None = None):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.device = resolve_device(device)
        self.dist: Dist = init_distributed(self.device)
        self.progress = progress and self.dist.is_main
        tc = recipe.training
        if tc.batch_size % self.dist.world:
            raise ValueError(f"training.batch_size={tc.batch_size} must be divisible by the "
                             f"number of processes ({self.dist.world}) under torchrun")
        # refused before the data are prepared and the networks built
        existing = ckpt.latest_checkpoint(self.run_dir)
        if existing is not None and not resume:
            raise FileExistsError(
                f"run_dir={str(self.run_dir)!r} already holds checkpoints ({existing.name}); "
                "pass --resume to continue it or choose another --out")
        uses_bf16(self.device, tc.amp)  # amp='bf16' without bf16: refused here
        self.data = data if data is not None else prepare_data(recipe)
        with torch.random.fork_rng(devices=[]):  # the initial weights: (seed), on the CPU
            torch.manual_seed(tc.seed)  # nn.Module init draws from the default generator
            self.denoiser = build_denoiser(recipe, self.data)
            self.ema = build_denoiser(recipe, self.data)
        self.denoiser, self.ema = self.denoiser.to(self.device), self.ema.to(self.device)
        self.ema.load_state_dict(self.denoiser.state_dict())
        self.ema.requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(self.denoiser.parameters(), lr=tc.lr,
                                           weight_decay=tc.weight_decay)
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.ema_objective = Objective(self.ema, recipe)
        self.train_module: torch.nn.Module = Objective(self.denoiser, recipe)
        if self.dist.enabled:
            self.train_module = DistributedDataParallel(
                self.train_module, device_ids=[self.device.index]
                if self.device.type == "cuda" else None)
        if tc.compile:
            self.train_module = torch.compile(self.train_module)
        if resume and existing is not None:
            self._restore(existing)

    # -- state --------------------------------------------------------------------------
    def _restore(self, path: Path) -> None:
        meta = ckpt.load_meta(path)
        self.data.check_compatible(meta)
        self.denoiser.load_state_dict(ckpt.load_weights(path, "model"))
        self.ema.load_state_dict(ckpt.load_weights(path, "ema"))
        state = ckpt.load_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the recipe's value, as recipe.yaml says
            group["weight_decay"] = self.recipe.training.weight_decay
        self.step = int(state["step"])
        self.last_checkpoint = path
        if self.dist.is_main:
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)

    def _save(self) -> Path:
        path = ckpt.step_dir(self.run_dir, self.step)
        if self.dist.is_main:
            state = {"optimizer": self.optimizer.state_dict(), "step": self.step}
            meta = self.data.meta(self.recipe)
            meta["sigma_data"] = float(getattr(self.denoiser, "sigma_data", 0.0) or 0.0)
            path = ckpt.save_checkpoint(self.run_dir, self.step, model=self.denoiser,
                                        ema=self.ema, state=state, meta=meta,
                                        keep_last=self.recipe.training.keep_last)
        barrier(self.dist)
        self.last_checkpoint = path
        return path

    # -- one step -----------------------------------------------------------------------
    def _batch(self, step: int, indices: np.ndarray | None = None,
               dataset=None) -> dict[str, torch.Tensor]:
        """The batch of ``indices`` (default: the training batch of ``step``), read in one go
        (one dask computation when streamed) and batched without copies."""
        from geodiff.data import collate

        dataset = dataset if dataset is not None else self.data.train
        tc = self.recipe.training
        if indices is None:
            indices = batch_indices(len(dataset), tc.batch_size, tc.seed, step)
        return collate(dataset.__getitems__([int(i) for i in indices]))

    def _training_batches(self, start: int):
        """``(indices, batch)`` of every step from ``start``: read in this process, or with
        ``training.num_workers > 0`` by DataLoader worker processes that prefetch the next
        batches while this one trains (by as many threads for data that cannot be forked,
        ``data.reader: tensorstore``). The batches are the same either way (the step's
        indices come from :func:`batch_indices`, the reads are deterministic)."""
        from geodiff.data import collate, threaded_batches

        tc, train = self.recipe.training, self.data.train
        steps = _StepBatches(len(train), tc.batch_size, tc.seed, start, tc.steps)
        if tc.num_workers == 0:
            for indices in steps:
                yield np.asarray(indices), self._batch(0, indices)
            return
        if not train.fork_safe:  # tensorstore reader: threads instead of worker processes
            for batch in threaded_batches(train, steps, threads=tc.num_workers):
                yield batch["index"].numpy(), batch
            return
        # (FieldDataset computes dask synchronously inside workers: no pool across fork)
        # its own generator for the workers' base seed, not the caller's global one
        loader = torch.utils.data.DataLoader(train, batch_sampler=steps, collate_fn=collate,
                                             num_workers=tc.num_workers, prefetch_factor=2,
                                             generator=torch.Generator().manual_seed(tc.seed))
        for batch in loader:
            yield batch["index"].numpy(), batch

    def loss_on(self, module: torch.nn.Module, batch: dict[str, torch.Tensor],
                gen: torch.Generator, *, sliced: bool = True) -> torch.Tensor:
        """Loss of the global batch ``batch``.

        With ``sliced`` (training) this rank evaluates its slice of the rows, scaled by
        ``world * (its weight sum) / (the batch's weight sum)``, so that the gradients DDP
        averages over the ranks are those of the global batch's weighted loss also when the
        samples' gaps differ (1 when every sample has the same weights). Without it (the
        validation loss) every rank evaluates the whole batch.
        """
        noise_level, noise = draw_noise(self.recipe, batch["x"].shape, gen)
        cond_drop = self._cond_drop(gen, batch["x"].shape[0])
        world = self.dist.world if sliced else 1
        rows = slice(self.dist.rank if sliced else 0, None, world)
        dev = self.device
        local = {k: v[rows].to(dev) for k, v in batch.items()}
        with autocast(dev, self.recipe.training.amp):
            loss = module(local["x"], local["weight"], local["fields"], local["cond"],
                          noise_level[rows].to(dev), noise[rows].to(dev), cond_drop[rows].to(dev))
        if world > 1:
            w = batch["weight"]
            if not self.recipe.diffusion.lat_weighted:
                w = (w > 0).to(w.dtype)
            w = torch.broadcast_to(w, batch["x"].shape).double()
            loss = loss * float(world * w[rows].sum() / w.sum())
        return loss

    def _cond_drop(self, gen: torch.Generator, n: int) -> torch.Tensor:
        p = self.recipe.conditioning.dropout
        return torch.rand(n, generator=gen) < p

    @torch.no_grad()
    def _update_ema(self, decay: float) -> None:
        for p_ema, p in zip(self.ema.parameters(), self.denoiser.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - decay)
        for b_ema, b in zip(self.ema.buffers(), self.denoiser.buffers()):
            b_ema.copy_(b)

    @torch.no_grad()
    def validation_loss(self, max_batches: int = 8) -> float | None:
        """EMA-model loss on the validation split with fixed noise (seed -1), or None."""
        val = self.data.val
        if val is None or len(val) == 0:
            return None
        tc = self.recipe.training
        total, count = 0.0, 0
        for b in range(min(max_batches, math.ceil(len(val) / tc.batch_size))):
            idx = np.arange(b * tc.batch_size, min(len(val), (b + 1) * tc.batch_size))
            batch = self._batch(0, idx, dataset=val)
            loss = self.loss_on(self.ema_objective, batch, step_generator(tc.seed + 7919, b),
                                sliced=False)
            total += float(loss) * len(idx)
            count += len(idx)
        return total / count

    @torch.no_grad()
    def variational_bound(self, n_fields: int = 16, timesteps: int = 32) -> float:
        """Variational bound of the EMA model in bits/dim (Ho et al. 2020, eq. 5).

        Evaluated on up to ``n_fields`` validation fields (training fields when there is no
        validation split) with the stratified estimate of ``timesteps`` terms.  For EDM models
        the bound is that of the variance-preserving process of the linear 1000-step schedule
        (sigma_t^2 = (1 - alpha_bar_t) / alpha_bar_t), with the EDM denoiser as x0-predictor.
        """
        from geodiff.diffusion import make_schedule, vlb_bits_per_dim

        dataset = self.data.val if self.data.val is not None else self.data.train
        idx = np.linspace(0, len(dataset) - 1, min(n_fields, len(dataset))).astype(int)
        batch = self._batch(0, idx, dataset=dataset)
        dev = self.device
        fields, cond = batch["fields"].to(dev), batch["cond"].to(dev)
        schedule = getattr(self.ema, "schedule", None) or make_schedule("linear", 1000)

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return self.ema(x, sigma, fields, cond)

        bits = vlb_bits_per_dim(denoise, schedule, batch["x"].to(dev),
                                generator=step_generator(self.recipe.training.seed + 104729, 0),
                                weight=batch["weight"].to(dev), timesteps=timesteps)
        return float(bits.mean())

    def _nonfinite(self, step: int, indices: np.ndarray, loss: torch.Tensor,
                   consecutive: int = 0) -> None:
        labels = [self.data.train.sample_coords(int(i)) for i in indices[:8]]
        where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                 else "no checkpoint was written yet")
        if consecutive:
            raise NonFiniteLossError(
                f"the loss was non-finite on {consecutive} consecutive steps up to step {step} "
                f"(training.on_nonfinite: skip): the weights have diverged, skipping cannot "
                f"recover. {where[0].upper()}{where[1:]}. Lower training.lr or check the data "
                "for extreme values, then resume from that checkpoint.")
        raise NonFiniteLossError(
            f"loss became {loss.detach().item()} at step {step} on a batch with samples "
            f"{labels} ...; "
            f"{where}. Lower training.lr, check the data for extreme values, or set "
            "training.on_nonfinite: skip to skip such batches.")

    def _every_rank(self, flag: bool) -> bool:
        """``flag`` and-ed over all ranks (itself in a single process)."""
        if not self.dist.enabled:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item())

    def _mean_over_ranks(self, loss: torch.Tensor) -> float:
        """The global batch's loss from the ranks' scaled slice losses (their mean)."""
        if not self.dist.enabled:
            return float(loss)
        t = loss.detach().float().reshape(1).clone()
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.dist.world

    # -- loop ---------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        tc = self.recipe.training
        decay = ema_decay(tc.ema_halflife_steps)
        metrics = (self.run_dir / "metrics.jsonl") if self.dist.is_main else None
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_text(self.run_dir / "recipe.yaml", self.recipe.to_yaml())
        bar = _progress(tc.steps, self.step, self.progress)
        t0 = time.perf_counter()
        last_loss = float("nan")
        val_loss: float | None = None
        skipped = consecutive = 0
        self.denoiser.train()
        batches = self._training_batches(self.step)
        while self.step < tc.steps:
            step = self.step
            gen = step_generator(tc.seed, step)
            indices, batch = next(batches)
            for group in self.optimizer.param_groups:
                group["lr"] = tc.lr * lr_factor(step, tc.warmup_steps, tc.steps, tc.lr_schedule)
            with dropout_rng(tc.seed, step, self.dist.rank, self.device):
                loss = self.loss_on(self.train_module, batch, gen)
            # every rank takes the same decision (a rank skipping backward alone would leave
            # the others waiting in DDP's gradient all-reduce)
            finite = self._every_rank(bool(torch.isfinite(loss)))
            if not finite:
                if tc.on_nonfinite == "stop":
                    self._nonfinite(step, indices, loss)
                skipped += 1
                consecutive += 1
                if consecutive >= MAX_CONSECUTIVE_SKIPS:
                    self._nonfinite(step, indices, loss, consecutive)
            else:
                consecutive = 0
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.denoiser.parameters(), tc.grad_clip)
                self.optimizer.step()
                self._update_ema(0.0 if step < tc.ema_warmup_steps else decay)
                last_loss = self._mean_over_ranks(loss.detach())
            self.step += 1
            elapsed = time.perf_counter() - t0
            record: dict[str, Any] = {"step": self.step,
                                      "loss": last_loss if finite else None,
                                      "lr": self.optimizer.param_groups[0]["lr"],
                                      "elapsed_s": round(elapsed, 3)}
            if not finite:
                record["skipped_nonfinite"] = skipped
            if self.step % tc.val_every == 0 or self.step == tc.steps:
                val_loss = self.validation_loss()
                record["val_loss"] = val_loss
            if metrics is not None and (self.step % tc.log_every == 0 or "val_loss" in record
                                        or not finite):  # every skipped step is on record
                _append_jsonl(metrics, record)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}",
                            samples_s=f"{tc.batch_size * bar.n / max(elapsed, 1e-9):.1f}")
            out_of_time = tc.max_time_s is not None and elapsed >= tc.max_time_s
            if tc.max_time_s is not None:  # every rank, every step: all stop at the same step
                out_of_time = not self._every_rank(not out_of_time)
            if self.step % tc.checkpoint_every == 0 or self.step == tc.steps or out_of_time:
                self._save()
            if out_of_time:
                bar.write(f"training.max_time_s={tc.max_time_s} reached at step {self.step}")
                break
        bar.close()
        if skipped and self.progress:
            print(f"training.on_nonfinite=skip: {skipped} step(s) had a non-finite loss and "
                  "were skipped (see metrics.jsonl, skipped_nonfinite)", flush=True)
        seconds = time.perf_counter() - t0
        if self.last_checkpoint is None or ckpt.latest_checkpoint(self.run_dir) is None:
            self._save()
        bits = None
        if self.dist.is_main:
            bits = self.variational_bound()
            _append_jsonl(self.run_dir / "metrics.jsonl",
                          {"step": self.step, "vlb_bits_per_dim": bits})
            if self.progress:
                print(f"variational bound (EMA, {'val' if self.data.val else 'train'} fields): "
                      f"{bits:.3f} bits/dim", flush=True)
        return TrainResult(self.run_dir, self.last_checkpoint, self.step, last_loss, val_loss,
                           seconds, bits)


def train(recipe: Recipe, run_dir: str | Path | None = None, *, device: str | None = None,
          resume: bool = False, progress: bool = True) -> TrainResult:
    """Train ``recipe``; checkpoints go to ``run_dir`` (default ``<output.dir>/run``)."""
    run_dir = Path(run_dir) if run_dir is not None else Path(recipe.output.dir) / "run"
    return Trainer(recipe, run_dir, device=device, resume=resume, progress=progress).fit()


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step",
                dynamic_ncols=True)


MAX_CONSECUTIVE_SKIPS = 10
"""``on_nonfinite: skip`` gives up after this many non-finite steps in a row."""


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of ``metrics.jsonl`` up to ``step`` (a resumed run logs the steps after
    its checkpoint again) and drop a line torn by a kill; rewritten atomically."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line)
    _write_text(path, "".join(f"{line}\n" for line in keep))


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "batch_indices", "ema_decay",
           "lr_factor", "step_generator", "train"]
