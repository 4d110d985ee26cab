"""``geodiff`` command line: thin verbs over the Python API.

Exit codes: 0 success, 1 a run failed, 2 bad input (the message says what and how to fix).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from geodiff._version import __version__


def _add_common(p: argparse.ArgumentParser, *, seed: bool = True) -> None:
    p.add_argument("--device", default="auto", type=_device,
                   help="cpu, cuda, cuda:1 ... (default auto: CUDA when available)")
    if seed:
        p.add_argument("--seed", type=_seed, default=None, help="random seed (an integer >= 0)")


def _seed(text: str) -> int:
    """A seed for ``torch.Generator.manual_seed``: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--seed {text!r}: expected an integer >= 0, e.g. "
                                         "--seed 0")
    return value


def _device(text: str) -> str:
    """``--device``: ``auto`` or a torch device string (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    if text == "auto":
        return text
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"--device {text!r} is not a device; use auto, cpu, "
                                         "cuda or cuda:N (e.g. --device cuda:0)") from None
    return text


def _positive_int(flag: str, example: int):
    """An argparse type for ``flag``: an integer >= 1 (0 would silently mean the default)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected an integer >= 1, e.g. "
                                             f"{flag} {example}")
        return value

    return parse


def _key_value(text: str) -> tuple[str, str]:
    """``--sel DIM=VALUE`` -> ``(DIM, VALUE)``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"--sel {text!r}: expected DIM=VALUE, e.g. --sel "
                                         "time=2095-06-01 or --sel scenario=A1B")
    return key.strip(), value.strip()


def _int_list(text: str) -> list[int]:
    """``"999,500,0"`` -> ``[999, 500, 0]``."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, "
                                         "e.g. 999,700,400,150,0") from None


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--members", type=_positive_int("--members", 10), default=None,
                   help="members per condition cell (default: the recipe's sampling.members)")
    p.add_argument("--sampler", default=None, help="heun, dpmpp, ddim or ddpm")
    p.add_argument("--steps", type=_positive_int("--steps", 18), default=None,
                   help="sampler steps")
    p.add_argument("--timesteps", type=_int_list, default=None,
                   help="ddpm/ddim on a DDPM model: these schedule timesteps (comma-separated, "
                        "e.g. 999,700,400,150,0) instead of --steps evenly spaced ones")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta")
    p.add_argument("--batch-size", type=_positive_int("--batch-size", 16), default=None,
                   help="samples generated together")
    p.add_argument("--compute-batch", type=_positive_int("--compute-batch", 8), default=None,
                   help="network batches of exactly this size: members bit-identical "
                        "whatever --batch-size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geodiff", description="Diffusion-model ensembles for gridded Earth-science data.")
    parser.add_argument("--version", action="version", version=f"geodiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    cat = sub.add_parser("catalog", help="list or describe datasets of the catalog")
    cat_sub = cat.add_subparsers(dest="action", metavar="ACTION", required=True)
    c_list = cat_sub.add_parser("list", help="list catalog entries")
    c_list.add_argument("--catalog", default=None, help="a user catalog YAML")
    c_show = cat_sub.add_parser("show", help="variables, dims, grid, time span, licence")
    c_show.add_argument("name")
    c_show.add_argument("--catalog", default=None, help="a user catalog YAML")

    rec = sub.add_parser("recipe", help="check recipes")
    rec_sub = rec.add_subparsers(dest="action", metavar="ACTION", required=True)
    r_val = rec_sub.add_parser("validate", help="validate a recipe and print it resolved")
    r_val.add_argument("recipe", help="recipe YAML path or bundled recipe name")
    r_val.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    rec_sub.add_parser("list", help="list the bundled recipes")

    tr = sub.add_parser("train", help="train a recipe")
    tr.add_argument("recipe", help="recipe YAML path or bundled recipe name")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe key, e.g. --set training.steps=200")
    tr.add_argument("--out", default=None, help="run directory (default <output.dir>/run)")
    tr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    tr.add_argument("--dry-run", action="store_true",
                    help="print the resolved recipe, data shapes, parameters and time per step")
    tr.add_argument("--grid", default=None, metavar="LATxLON",
                    help="grid size for --dry-run when the data cannot be opened here")
    _add_common(tr)

    gen = sub.add_parser("generate", help="generate an ensemble from a checkpoint")
    gen.add_argument("checkpoint", help="run directory or checkpoint directory")
    gen.add_argument("--out", required=True, help="ensemble file (.nc or .zarr)")
    gen.add_argument("--conditions", default=None,
                     help='JSON {dim: values}, e.g. \'{"scenario": ["A1B"], "year": [2055]}\', or '
                          "a NetCDF/Zarr path whose sample coordinates are used; a model "
                          "trained with conditioning.fields needs the file, holding those "
                          "variables for the requested cells on the model's grid")
    _add_sampling(gen)
    _add_common(gen)

    fill = sub.add_parser("fill-gaps", help="complete NaN gaps of observed fields")
    fill.add_argument("checkpoint")
    fill.add_argument("observed", help="NetCDF/Zarr with NaN gaps (and the model's "
                      "conditioning.fields, if any)")
    fill.add_argument("--out", required=True, help="ensemble of completions (.nc or .zarr)")
    fill.add_argument("--members", type=_positive_int("--members", 10), default=None,
                      help="members per field (default: the recipe's sampling.members)")
    fill.add_argument("--steps", type=_positive_int("--steps", 18), default=None,
                      help="sampler steps (default: the recipe's sampling.steps)")
    fill.add_argument("--resample", type=_positive_int("--resample", 5), default=None,
                      help="RePaint resampling jumps per step (default: the recipe's "
                           "gapfill.resample)")
    fill.add_argument("--batch-size", type=_positive_int("--batch-size", 16), default=None,
                      help="samples completed together (default: the recipe's "
                           "sampling.batch_size)")
    fill.add_argument("--compute-batch", type=_positive_int("--compute-batch", 8),
                      default=None, help="network batches of exactly this size")
    fill.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_common(fill)

    ev = sub.add_parser("evaluate", help="score an ensemble against observations")
    ev.add_argument("ensemble", help="ensemble file (.nc or .zarr)")
    ev.add_argument("--obs", required=True, help="observations (same grid and conditions)")
    ev.add_argument("--reference", default=None, help="reference ensemble (e.g. analog)")
    ev.add_argument("--out", required=True, help="report folder (scores.json, scores.md)")

    pl = sub.add_parser("plot", help="maps of an ensemble")
    pl.add_argument("ensemble", help="ensemble file (.nc or .zarr)")
    pl.add_argument("--kind", default="mean", choices=["members", "mean", "spread", "exceedance"],
                    help="members (up to 4), mean (default), spread, or exceedance "
                         "probability (needs --threshold)")
    pl.add_argument("--variable", default=None,
                    help="variable to map (default: the first with a member dimension)")
    pl.add_argument("--threshold", type=float, default=None,
                    help="for --kind exceedance, in the data's units")
    pl.add_argument("--sel", type=_key_value, action="append", default=[],
                    metavar="DIM=VALUE",
                    help="which field to map, e.g. --sel time=2095-06-01 --sel scenario=A1B "
                         "(also a coordinate along a dim, e.g. year=2055; default: the first "
                         "field of each sample dim)")
    pl.add_argument("--member", action="append", default=None, metavar="LABEL",
                    help="for --kind members: a member to show (repeat for several; default "
                         "the first four)")
    pl.add_argument("--obs", default=None,
                    help="observations (same grid): shown next to the members or the mean, "
                         "as |mean - obs| next to the spread, as a contour at --threshold")
    pl.add_argument("--out", required=True, help="PNG path")

    qs = sub.add_parser("quickstart", help="train, generate, evaluate and plot the quickstart")
    qs.add_argument("--out", default=None,
                    help="output folder (default: the recipe's output.dir)")
    qs.add_argument("--recipe", default="quickstart",
                    help="quickstart (default) or a gap-filling recipe such as ostia_gapfill")
    qs.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe key, e.g. --set training.steps=200")
    qs.add_argument("--resume", action="store_true",
                    help="continue the training from its latest checkpoint")
    _add_common(qs)
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    sets = list(getattr(args, "set", []) or [])
    if getattr(args, "seed", None) is not None:
        sets.append(f"training.seed={args.seed}")
    return sets


def _open_any(path: str):
    import xarray as xr

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path!r} does not exist")
    if p.suffix == ".zarr" or p.is_dir():
        return xr.open_zarr(p)
    return xr.open_dataset(p)


def _conditions(text: str):
    """``--conditions``: inline JSON (starts with ``{``) or a NetCDF/Zarr file of conditions."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            example = '{"year": [2050, 2060], "scenario": ["A1B"]}'
            raise ValueError(f"--conditions {text[:60]!r} is not valid JSON ({err}); e.g. "
                             f"--conditions '{example}'") from None
    if not Path(text).exists():
        raise FileNotFoundError(f"--conditions {text!r} is neither an existing file nor inline "
                                "JSON (which starts with '{'); give a NetCDF/Zarr file with the "
                                "condition coordinates or e.g. '{\"year\": [2050]}'")
    return _open_any(text)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    cmd = args.command
    if cmd is None:
        parser.print_help()
        return 2
    if cmd == "catalog":
        from geodiff import catalog

        if args.action == "list":
            for e in catalog.list_entries(args.catalog):
                net = " (needs network)" if getattr(e, "needs_network", False) else ""
                print(f"{e.name:28s} {e.description.splitlines()[0][:70]}{net}")
        else:  # "show" (argparse requires one of the two)
            print(catalog.describe(args.name, args.catalog))
        return 0
    if cmd == "recipe":
        from geodiff.config import bundled_recipes, load_recipe

        if args.action == "validate":
            recipe = load_recipe(args.recipe, args.set)
            print(recipe.to_yaml(), end="")
            print(f"# {args.recipe}: valid")
        else:  # "list"
            for name, path in bundled_recipes().items():
                print(f"{name:20s} {path}")
        return 0
    if cmd == "train":
        from geodiff.config import load_recipe

        recipe = load_recipe(args.recipe, _overrides(args))
        if args.dry_run:
            from geodiff.dryrun import dry_run

            grid = None
            if args.grid:
                try:
                    grid = tuple(int(v) for v in args.grid.lower().split("x"))
                except ValueError:
                    grid = ()
                if len(grid) != 2 or min(grid) < 1:
                    raise ValueError(f"--grid {args.grid!r} must look like 32x64 (lat x lon, "
                                     "integers >= 1)")
            print(dry_run(recipe, device=args.device, grid=grid))
            return 0
        from geodiff.train import train

        if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out!r} is an existing file; the run is a folder "
                             "(checkpoints, metrics.jsonl): give a folder path, e.g. --out run")
        result = train(recipe, args.out, device=args.device, resume=args.resume)
        print(f"trained {result.steps} steps in {result.seconds:.0f} s; "
              f"checkpoint: {result.checkpoint}")
        return 0
    if cmd == "generate":
        from geodiff.ensemble import generate_ensemble

        conditions = _conditions(args.conditions) if args.conditions else None
        out = generate_ensemble(args.checkpoint, args.members, conditions, sampler=args.sampler,
                                steps=args.steps, timesteps=args.timesteps,
                                guidance=args.guidance, eta=args.eta,
                                seed=args.seed or 0, batch_size=args.batch_size,
                                compute_batch=args.compute_batch, out=args.out,
                                overwrite=args.overwrite, device=args.device)
        print(f"wrote {out}")
        return 0
    if cmd == "fill-gaps":
        from geodiff.gapfill import fill_gaps

        out = fill_gaps(args.checkpoint, _open_any(args.observed), args.members, steps=args.steps,
                        resample=args.resample, seed=args.seed or 0, batch_size=args.batch_size,
                        compute_batch=args.compute_batch,
                        out=args.out, overwrite=args.overwrite, device=args.device)
        print(f"wrote {out}")
        return 0
    if cmd == "evaluate":
        from geodiff.analysis import evaluate

        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out!r} is an existing file; the report is a folder "
                             "(scores.json, scores.md): give a folder path, e.g. --out report")
        ref = _open_any(args.reference) if args.reference else None
        report = evaluate(_open_any(args.ensemble), _open_any(args.obs), reference=ref,
                          out_dir=args.out)
        print(json.dumps(report["summary"], indent=1))
        print(f"report: {Path(args.out) / 'scores.json'}, {Path(args.out) / 'scores.md'}")
        return 0
    if cmd == "plot":
        from geodiff.plot import plot_ensemble

        if args.member and args.kind != "members":
            raise ValueError(f"--member is for --kind members, not --kind {args.kind}")
        obs = _open_any(args.obs) if args.obs else None
        path = plot_ensemble(_open_any(args.ensemble), args.kind, args.out,
                             variable=args.variable, threshold=args.threshold, obs=obs,
                             sel=dict(args.sel), member=args.member)
        print(f"wrote {path}")
        return 0
    if cmd == "quickstart":
        from geodiff.config import load_recipe

        recipe = load_recipe(args.recipe, _overrides(args))
        out = args.out or recipe.output.dir
        if recipe.gapfill.enabled:
            from geodiff.gapfill_eval import run_gapfill_experiment

            run_gapfill_experiment(out, device=args.device, resume=args.resume, recipe=recipe)
        else:
            from geodiff.quickstart import run_quickstart

            run_quickstart(out, device=args.device, resume=args.resume, recipe=recipe)
        return 0
    parser.print_help()
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``geodiff`` console script."""
    from geodiff.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args, parser)
    except (ConfigError, ValueError, TypeError, FileNotFoundError, FileExistsError,
            KeyError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"geodiff {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except Exception as err:  # a failed run: say so with exit code 1, keep the traceback
        import traceback

        traceback.print_exc()
        print(f"geodiff {args.command}: failed: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
