"""Loader throughput: geodiff FieldDataset vs xbatcher, both through a torch DataLoader.

Writes a float32 ``(time, level, lat, lon)`` Zarr store (>= 2 GB, or ~200 MB with
``--quick``) into a temporary directory, one sample per chunk, reads every chunk once so
both loaders see a warm page cache, then times one shuffled pass of each loader with the
same batch size and worker count:

* geodiff: ``Scaler`` (min-max per level, fitted on the first 32 times) -> lazy
  ``transform`` -> ``FieldDataset`` streaming through dask (``memory_budget_gb=0``), so
  every batch is read, scaled, NaN-masked, padded and weighted on the fly;
* xbatcher: ``BatchGenerator(input_dims={level, lat, lon}, batch_dims={time: B})`` wrapped
  in ``xbatcher.loaders.torch.MapDataset`` (raw values, one item = one batch);
* the ceiling of any loader reading this store through zarr: raw chunks, one ``zarr`` call
  per sample, nothing else (no xarray, dask, scaling or padding);
* geodiff with ``reader="tensorstore"`` (the summary's headline): the same ``FieldDataset``
  on the store opened by ``open_dataset(path, reader="tensorstore")`` with the scaler
  applied per batch (``FieldDataset(..., scaler=)``), read by ``threaded_batches`` with as
  many threads as the others have worker processes. It is timed head to head with
  streamed xbatcher, pass for pass in alternation (``--rounds``, default 3), so both see the
  same machine load (on this shared 2-core machine xbatcher alone varied 211-285
  samples/s between runs); the ratio is the median over rounds. Last, because tensorstore
  does not survive ``fork``: xbatcher's persistent workers are forked before it starts.

Then the same with the data in memory (geodiff's ``memory_budget_gb`` large enough;
xbatcher on a loaded ``DataArray``). Prints a table and writes
``benchmarks/results/bench_loader.json`` with a top-level ``summary``:
``speed_ratio_vs_xbatcher`` and ``samples_per_s`` (streamed with the tensorstore reader),
the same for the dask reader, the zarr ceiling relative to xbatcher and geodiff relative to
it, and the in-memory figures.

Usage: ``python benchmarks/bench_loader.py [--quick] [--uncompressed] [--workers 2]
[--batch-size 16]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dask
import dask.array as dsa
import numpy as np
import torch
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from geodiff.config import ConditioningConfig, ScalingConfig  # noqa: E402
from geodiff.data import ConditionSpec, FieldDataset, collate, compute_padding  # noqa: E402
from geodiff.scaling import Scaler  # noqa: E402

SHAPES = {"full": (2560, 4, 192, 384), "quick": (170, 4, 192, 384)}
"""(time, level, lat, lon): 3.0 GB and 200 MB of float32 (about 80 % of that on disk)."""


def write_store(path: Path, shape: tuple[int, int, int, int], seed: int = 0,
                compressed: bool = True) -> int:
    """Write the synthetic store (one chunk per time step, zarr's default zstd compression
    unless ``compressed=False``); returns its size in bytes."""
    n_time, n_level, n_lat, n_lon = shape
    rng = dsa.random.default_rng(seed)
    chunks = (1, n_level, n_lat, n_lon)
    values = 250.0 + 30.0 * rng.random(shape, chunks=chunks, dtype=np.float32)
    ds = xr.Dataset(
        {"t": (("time", "level", "lat", "lon"), values.astype(np.float32), {"units": "K"})},
        coords={"time": np.arange(n_time), "level": np.linspace(1000.0, 250.0, n_level),
                "lat": np.linspace(-89.0, 89.0, n_lat),
                "lon": np.arange(n_lon) * 360.0 / n_lon})
    with dask.config.set(num_workers=2):
        ds.to_zarr(path, zarr_format=3, consolidated=False,
                   encoding={} if compressed else {"t": {"compressors": None}})
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def warm_cache(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            p.read_bytes()


def _synchronous_dask(_worker_id: int) -> None:
    """DataLoader worker init: dask's thread pool does not survive fork (it can deadlock)."""
    dask.config.set(scheduler="synchronous")


def time_loader(loader: torch.utils.data.DataLoader, batch_of,
                min_seconds: float = 4.0) -> tuple[float, int, int]:
    """Seconds, samples and batches of whole passes after a warm-up pass, repeated until
    ``min_seconds`` have elapsed (at most 50 passes)."""
    for _ in loader:
        pass
    n_samples = n_batches = 0
    t0 = time.perf_counter()
    for _ in range(50):
        for batch in loader:
            n_samples += batch_of(batch)
            n_batches += 1
        if time.perf_counter() - t0 >= min_seconds:
            break
    return time.perf_counter() - t0, n_samples, n_batches


def _loader(dataset, workers: int, **kwargs) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
        worker_init_fn=_synchronous_dask if workers else None,
        generator=torch.Generator().manual_seed(0), **kwargs)


def _setup(path: Path) -> tuple[xr.Dataset, Scaler, dict]:
    """The store (dask), its min-max scaler fitted on the first 32 times, and the
    ``FieldDataset`` arguments every geodiff run shares."""
    ds = xr.open_zarr(path, consolidated=False)
    scaler = Scaler.fit(ds.isel(time=slice(0, 32)), ScalingConfig(method="minmax"), ["t"],
                        ["time"])
    args = {"variables": ["t"], "sample_dims": ["time"], "cond_spec": ConditionSpec(),
            "cond_config": ConditioningConfig(coord_channels=True),
            "padding": compute_padding(ds.sizes["lat"], ds.sizes["lon"], 4, periodic=True)}
    return ds, scaler, args


def bench_geodiff(path: Path, batch_size: int, workers: int, budget_gb: float
                  ) -> dict[str, float]:
    ds, scaler, args = _setup(path)
    t0 = time.perf_counter()
    fd = FieldDataset(scaler.transform(ds), **args, memory_budget_gb=budget_gb)
    t_build = time.perf_counter() - t0
    loader = _loader(fd, workers, batch_size=batch_size, drop_last=True, collate_fn=collate)
    seconds, n, nb = time_loader(loader, lambda b: b["x"].shape[0])
    return {"seconds": seconds, "samples": n, "batches": nb, "samples_per_s": n / seconds,
            "in_memory": fd.in_memory, "build_s": t_build,
            "item_shape": list(fd[0]["x"].shape), "fields": fd.n_fields}


def tensorstore_loader(path: Path, batch_size: int, threads: int):
    """geodiff streaming through tensorstore: same scaling, masking and padding as
    :func:`bench_geodiff`, batches read ahead by ``threads`` threads in this process.
    Returns an iterable of shuffled passes, the build time and the dataset."""
    from geodiff.catalog import open_dataset
    from geodiff.data import threaded_batches

    _, scaler, args = _setup(path)
    t0 = time.perf_counter()
    fd = FieldDataset(open_dataset(str(path), reader="tensorstore"), **args,
                      memory_budget_gb=0.0, scaler=scaler)
    t_build = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)

    class Passes:  # one shuffled pass per iteration, like a DataLoader with drop_last
        def __iter__(self):
            perm = torch.randperm(len(fd), generator=gen).tolist()
            for start in range(0, len(perm) - batch_size + 1, batch_size):
                yield perm[start:start + batch_size]

    class Loader:
        def __iter__(self):
            return threaded_batches(fd, Passes(), threads=threads)

    return Loader(), t_build, fd


def head_to_head(path: Path, batch_size: int, workers: int, rounds: int = 3) -> dict:
    """Streamed xbatcher (``workers`` processes) and geodiff's tensorstore reader (as many
    threads) pass for pass, alternating, so that both see the same machine load: one warm-up
    pass each, then ``rounds`` timed passes each. xbatcher's persistent workers are forked
    before tensorstore starts its threads (it does not survive ``fork``)."""
    xb_loader, xb_build, _ = xbatcher_loader(path, batch_size, workers)
    for _ in xb_loader:  # forks the workers, warms up
        pass
    ts_loader, ts_build, fd = tensorstore_loader(path, batch_size, max(1, workers))
    for _ in ts_loader:
        pass
    rates: dict[str, list[float]] = {"xbatcher": [], "tensorstore": []}
    for _ in range(rounds):
        for name, loader, batch_of in (("xbatcher", xb_loader, lambda b: b.shape[0]),
                                       ("tensorstore", ts_loader, lambda b: b["x"].shape[0])):
            t0, n = time.perf_counter(), 0
            for batch in loader:
                n += batch_of(batch)
            rates[name].append(n / (time.perf_counter() - t0))
    ratios = [t / x for t, x in zip(rates["tensorstore"], rates["xbatcher"], strict=True)]
    return {"rounds": rounds, "xbatcher_samples_per_s": rates["xbatcher"],
            "tensorstore_samples_per_s": rates["tensorstore"], "ratios": ratios,
            "median_ratio": statistics.median(ratios), "xbatcher_build_s": xb_build,
            "tensorstore_build_s": ts_build, "threads": max(1, workers),
            "item_shape": list(fd[0]["x"].shape)}


def xbatcher_loader(path: Path, batch_size: int, workers: int, load: bool = False):
    """xbatcher's BatchGenerator over the store in a DataLoader; with the build time and the
    batch shape."""
    import xbatcher
    from xbatcher.loaders.torch import MapDataset

    t0 = time.perf_counter()
    da = xr.open_zarr(path, consolidated=False)["t"]
    if load:
        da = da.load()
    t_build = time.perf_counter() - t0
    gen = xbatcher.BatchGenerator(
        da, input_dims={"level": da.sizes["level"], "lat": da.sizes["lat"],
                        "lon": da.sizes["lon"]}, batch_dims={"time": batch_size})
    return _loader(MapDataset(gen), workers, batch_size=None), t_build, list(gen[0].shape)


def bench_xbatcher(path: Path, batch_size: int, workers: int, load: bool = False
                   ) -> dict[str, float]:
    loader, t_build, shape = xbatcher_loader(path, batch_size, workers, load)
    seconds, n, nb = time_loader(loader, lambda b: b.shape[0])
    return {"seconds": seconds, "samples": n, "batches": nb, "samples_per_s": n / seconds,
            "build_s": t_build, "in_memory": load, "batch_shape": shape}


class _ZarrChunks(torch.utils.data.Dataset):
    """Ceiling of any Zarr-based loader: raw chunks read with zarr itself (no xarray, no
    dask, no scaling, no padding) into a shared-memory batch, one ``zarr`` call per sample."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        self._array = None
        self._len = xr.open_zarr(path, consolidated=False).sizes["time"]

    def __len__(self) -> int:
        return self._len

    def __getitems__(self, indices):
        import zarr

        if self._array is None:  # opened in the worker (zarr's event loop does not fork)
            self._array = zarr.open_array(self.path / self.name, mode="r")
        from geodiff.data import _batch_tensor

        x = _batch_tensor((len(indices), *self._array.shape[1:]))
        for j, i in enumerate(indices):
            x.numpy()[j] = self._array[int(i)]
        return [x[j] for j in range(len(indices))]


def bench_zarr_ceiling(path: Path, batch_size: int, workers: int) -> dict[str, float]:
    from geodiff.data import collate

    loader = _loader(_ZarrChunks(path, "t"), workers, batch_size=batch_size, drop_last=True,
                     collate_fn=lambda items: collate([{"x": t} for t in items])["x"])
    seconds, n, nb = time_loader(loader, lambda b: b.shape[0])
    return {"seconds": seconds, "samples": n, "batches": nb, "samples_per_s": n / seconds,
            "build_s": 0.0, "in_memory": False}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 MB store instead of 3 GB")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating timed passes of xbatcher and geodiff-tensorstore")
    parser.add_argument("--uncompressed", action="store_true",
                        help="write the store without compression (decompression-free reads)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results"
                        / "bench_loader.json")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    shape = SHAPES[mode]
    with tempfile.TemporaryDirectory(prefix="geodiff-bench-") as tmp:
        path = Path(tmp) / "fields.zarr"
        t0 = time.perf_counter()
        n_bytes = write_store(path, shape, compressed=not args.uncompressed)
        t_write = time.perf_counter() - t0
        warm_cache(path)
        runs = {
            "geodiff_streamed": bench_geodiff(path, args.batch_size, args.workers, 0.0),
            "xbatcher_streamed": bench_xbatcher(path, args.batch_size, args.workers),
            "zarr_chunks_ceiling": bench_zarr_ceiling(path, args.batch_size, args.workers),
            "geodiff_in_memory": bench_geodiff(path, args.batch_size, args.workers, 1e3),
            "xbatcher_in_memory": bench_xbatcher(path, args.batch_size, args.workers, True),
        }
        # last: once tensorstore's threads run, this process must not fork any more
        duel = head_to_head(path, args.batch_size, args.workers, args.rounds)
        runs["geodiff_streamed_tensorstore"] = {
            "samples_per_s": statistics.median(duel["tensorstore_samples_per_s"]),
            "build_s": duel["tensorstore_build_s"], "in_memory": False,
            "threads": duel["threads"], "item_shape": duel["item_shape"]}
        runs["xbatcher_streamed_head_to_head"] = {
            "samples_per_s": statistics.median(duel["xbatcher_samples_per_s"]),
            "build_s": duel["xbatcher_build_s"], "in_memory": False}
    summary = summarize(runs, duel)
    result = {
        "summary": summary,
        "details": {
            "mode": mode, "compressed": not args.uncompressed,
            "store_shape": dict(zip(("time", "level", "lat", "lon"), shape)),
            "raw_bytes": 4 * int(np.prod(shape)), "store_bytes": n_bytes, "write_s": t_write,
            "batch_size": args.batch_size, "workers": args.workers, **runs,
            "head_to_head": duel,
            "timing": "second shuffled pass of a persistent-worker DataLoader, warm page cache",
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "xarray": xr.__version__, "dask": dask.__version__,
                         "xbatcher": _version("xbatcher"), "zarr": _version("zarr")},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        },
    }
    print(f"store {shape} float32: {4 * np.prod(shape) / 1e9:.2f} GB raw, "
          f"{n_bytes / 1e9:.2f} GB on disk; batch {args.batch_size}, {args.workers} workers")
    print(f"{'loader':30s} {'samples/s':>10s} {'samples':>8s} {'seconds':>8s} {'load s':>7s}")
    for name, r in runs.items():
        print(f"{name:30s} {r['samples_per_s']:10.1f} {r.get('samples', 0):8d} "
              f"{r.get('seconds', 0.0):8.2f} {r['build_s']:7.2f}")
    print("head to head, per round: xbatcher "
          + ", ".join(f"{v:.0f}" for v in duel["xbatcher_samples_per_s"]) + "; tensorstore "
          + ", ".join(f"{v:.0f}" for v in duel["tensorstore_samples_per_s"])
          + " samples/s; ratios " + ", ".join(f"{v:.2f}" for v in duel["ratios"]))
    for key, value in summary.items():
        print(f"{key}: {value:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def summarize(runs: dict[str, dict], duel: dict) -> dict[str, float]:
    """The JSON ``summary`` from the per-loader results and the head-to-head rounds."""
    rate = {k: r["samples_per_s"] for k, r in runs.items()}
    return {
        "speed_ratio_vs_xbatcher": duel["median_ratio"],
        "samples_per_s": rate["geodiff_streamed_tensorstore"],
        "speed_ratio_vs_xbatcher_min_round": min(duel["ratios"]),
        "dask_reader_speed_ratio_vs_xbatcher":
            rate["geodiff_streamed"] / rate["xbatcher_streamed"],
        "dask_reader_samples_per_s": rate["geodiff_streamed"],
        "zarr_ceiling_ratio_vs_xbatcher":
            rate["zarr_chunks_ceiling"] / rate["xbatcher_streamed"],
        "speed_ratio_vs_zarr_ceiling":
            rate["geodiff_streamed_tensorstore"] / rate["zarr_chunks_ceiling"],
        "dask_reader_speed_ratio_vs_zarr_ceiling":
            rate["geodiff_streamed"] / rate["zarr_chunks_ceiling"],
        "speed_ratio_in_memory_vs_xbatcher_in_memory":
            rate["geodiff_in_memory"] / rate["xbatcher_in_memory"],
        "speed_ratio_in_memory_vs_xbatcher_streamed":
            rate["geodiff_in_memory"] / rate["xbatcher_streamed"],
        "samples_per_s_in_memory": rate["geodiff_in_memory"],
        "in_memory_load_s": runs["geodiff_in_memory"]["build_s"],
    }


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
