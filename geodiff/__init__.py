"""geodiff: denoising-diffusion ensembles for Earth-science gridded data.

xarray in (``open_dataset``), a lat-lon-aware diffusion model in the middle (``train``),
labelled CF NetCDF/Zarr ensembles out (``generate_ensemble``, ``fill_gaps``), and
probabilistic verification and maps (``geodiff.analysis``, ``geodiff.plot``).
Heavy pieces are imported on first use, so ``import geodiff`` stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from geodiff._version import __version__

_LAZY = {
    "open_dataset": ("geodiff.catalog", "open_dataset"),
    "load_recipe": ("geodiff.config", "load_recipe"),
    "Recipe": ("geodiff.config", "Recipe"),
    "Scaler": ("geodiff.scaling", "Scaler"),
    "train": ("geodiff.train", "train"),
    "Trainer": ("geodiff.train", "Trainer"),
    "load_model": ("geodiff.pipeline", "load_model"),
    "prepare_data": ("geodiff.pipeline", "prepare_data"),
    "generate_ensemble": ("geodiff.ensemble", "generate_ensemble"),
    "fill_gaps": ("geodiff.gapfill", "fill_gaps"),
    "evaluate": ("geodiff.analysis", "evaluate"),
    "run_quickstart": ("geodiff.quickstart", "run_quickstart"),
    "LatLonUNet": ("geodiff.unet", "LatLonUNet"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'geodiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
