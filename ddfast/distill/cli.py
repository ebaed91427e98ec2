"""Command line: ``ddfast distill``, ``ddfast evaluate``, ``ddfast pretrain``, ``ddfast buffer`` (also ``python -m ddfast``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from .allocator import keep_freed_memory

    parser = _parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    try:
        return args.command(args)
    except (ValueError, FileNotFoundError, TypeError, FloatingPointError) as exc:  # the user's mistakes, said in one line
        parser.exit(2, f"ddfast {args.name}: error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"ddfast {args.name}: interrupted; rerunning the same command resumes from the last checkpoint\n")


def _parser() -> argparse.ArgumentParser:
    from . import METHODS, PRESETS
    from .training.data import DATASETS

    parser = argparse.ArgumentParser(prog="ddfast", description="Dataset distillation with fused kernels.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def run_options(p: argparse.ArgumentParser, *, cache: bool = True) -> None:
        p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
        p.add_argument("--data-root", help="folder holding the datasets (default: $DDFAST_DATA_ROOT, else ../shared/data)")
        p.add_argument("--download", action="store_true", help="download the dataset if it is missing")
        if cache:
            p.add_argument("--cache-dir", help="cache of pre-trained networks and expert buffers (default: $DDFAST_CACHE_DIR, else ~/.cache/ddfast)")
        p.add_argument("--quiet", action="store_true", help="no progress bars or messages")

    def config_options(p: argparse.ArgumentParser, *, method_required: bool) -> None:
        p.add_argument("--method", required=method_required, default="dm", choices=sorted(METHODS))
        p.add_argument("--dataset", required=True, help=f"one of {sorted(DATASETS)}")
        p.add_argument("--ipc", type=int, required=method_required, default=10, help="synthetic images per class")
        p.add_argument("--preset", default="upstream", choices=PRESETS, help="hyperparameters (default: upstream)")
        p.add_argument("--reg", action="append", default=[], choices=("cmi", "mim"),
                       help="add a regulariser with the preset's weight: cmi or mim (MIM4DD); repeatable")
        p.add_argument("--cmi", action="store_true", help="the same as --reg cmi")
        p.add_argument("--cmi-weight", type=float, help="add the CMI regulariser with this weight")
        p.add_argument("--mim-weight", type=float, help="add the MIM4DD regulariser with this weight")
        p.add_argument("--iterations", type=int, help="override the preset's number of iterations")
        p.add_argument("--seed", type=int, help="override the seed (default 0)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any setting, e.g. evaluation.models=3 or options.inner_loop=5 (repeatable)")
        p.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")

    p = commands.add_parser("distill", help="distill a dataset",
                            description="Distill a dataset; rerunning the same command resumes from the checkpoint in --out.")
    config_options(p, method_required=True)
    run_options(p)
    p.add_argument("--out", help="output folder (default: runs/<method>-<dataset>-ipc<ipc>-<preset>[-cmi][-mim])")
    p.add_argument("--sweep", metavar="KEY=V1,V2,...", help="distill once per value, choose on the validation split, test only the winner")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    p.add_argument("--stop-after", type=int, metavar="N", help="stop after N iterations, checkpointed, as a kill would")
    p.set_defaults(command=_distill, name="distill")

    p = commands.add_parser("pretrain", help="train and cache the regularisers' pools of networks (CMI unless --reg says otherwise)")
    config_options(p, method_required=False)
    run_options(p)
    p.set_defaults(command=_pretrain, name="pretrain")

    p = commands.add_parser("buffer", help="train and cache MTT's expert trajectories",
                            description="Train the expert trajectories an MTT run with these settings uses; rerunning resumes. "
                                        "Processes given disjoint --shard values train disjoint experts at once.")
    config_options(p, method_required=False)
    run_options(p)
    p.add_argument("--shard", default="0/1", metavar="I/N", help="train only the experts k with k %% N == I (default 0/1: all)")
    p.set_defaults(command=_buffer, name="buffer", method="mtt")

    p = commands.add_parser("evaluate", help="evaluate a synthetic set against the random-real baseline")
    p.add_argument("synthetic", help="a synthetic.pt written by ddfast distill")
    run_options(p, cache=False)
    p.add_argument("--models", type=int, help="networks to train (default: the run's protocol)")
    p.add_argument("--epochs", type=int, help="training epochs per network")
    p.add_argument("--lrs", help="candidate learning rates, comma separated, chosen on the validation split")
    p.add_argument("--dsa", choices=("on", "off"), help="augment evaluation training with DSA")
    p.add_argument("--seed", type=int, help="seed of the networks and the random-real subset (default: the run's)")
    p.add_argument("--out", help="JSON file for the results (default: evaluation.json beside the synthetic set)")
    p.set_defaults(command=_evaluate, name="evaluate")
    return parser


def _config(args):
    from . import preset
    from .settings import override_all

    cmi, mim = args.cmi or "cmi" in args.reg, "mim" in args.reg
    cmi_weight, mim_weight = args.cmi_weight, args.mim_weight
    if args.name == "pretrain":  # the pools do not depend on the weights
        cmi = cmi or not (mim or mim_weight is not None)
        cmi_weight = 0.0 if cmi and cmi_weight is None else cmi_weight
        mim_weight = 0.0 if mim and mim_weight is None else mim_weight
    config = preset(args.method, args.dataset, args.ipc, args.preset, cmi=cmi, cmi_weight=cmi_weight, mim=mim, mim_weight=mim_weight)
    changes = [(key, value) for key, value in (("iterations", args.iterations), ("seed", args.seed)) if value is not None]
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        changes.append((key.strip(), value.strip()))
    return override_all(config, changes)


def _print_config(config) -> int:
    from .settings import to_dict

    print(json.dumps(to_dict(config), indent=2))
    return 0


def _distill(args) -> int:
    from . import run, sweep

    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {args.stop_after}")
    config = _config(args)
    if args.print_config:
        return _print_config(config)
    regs = "".join(f"-{name}" for name in ("cmi", "mim") if getattr(config, name) is not None)
    out = args.out or f"runs/{config.method}-{config.dataset}-ipc{config.ipc}-{args.preset}{regs}"
    options = dict(data_root=args.data_root, download=args.download, device=args.device, cache_dir=args.cache_dir, quiet=args.quiet,
                   restart=args.restart)
    if args.sweep:
        if args.stop_after is not None:
            raise ValueError("--stop-after cannot be combined with --sweep")
        key, sep, values = args.sweep.partition("=")
        values = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not values:
            raise ValueError(f"--sweep takes KEY=V1,V2,..., got {args.sweep!r}")
        summary = sweep(config, key.strip(), values, out, **options)
        _report(summary["evaluation"], Path(out) / "sweep.json")
        return 0
    results = run(config, out, stop_after=args.stop_after, **options)
    if results["status"] == "stopped":
        print(f"stopped after iteration {results['iteration']}; rerun the same command to resume")
        return 0
    _report(results["evaluation"], Path(out) / "results.json")
    return 0


def _checked_data(config, args):
    """The run's data on its device, loaded once the device and the settings have passed their checks."""
    from . import load_data, resolve_device
    from .preflight import check_settings

    device = resolve_device(args.device)
    check_settings(config)
    return load_data(config, args.data_root, args.download).to(device)


def _pretrain(args) -> int:
    from . import pretrain

    config = _config(args)
    if args.print_config:
        return _print_config(config)
    data = _checked_data(config, args)
    pretrain(config, data, cache_dir=args.cache_dir, quiet=args.quiet)
    return 0


def _buffer(args) -> int:
    from .mtt import MTT, expert_buffer
    from .runner import data_key
    from .training.buffers import parse_shard

    shard = parse_shard(args.shard)
    if args.method != "mtt":
        raise ValueError(f"expert buffers are for --method mtt, got {args.method!r}")
    config = _config(args)
    if args.print_config:
        return _print_config(config)
    data = _checked_data(config, args)
    folder, _ = expert_buffer(MTT.read_options(config.options), config, data, data_key(config),
                              cache_dir=args.cache_dir, shard=shard, quiet=args.quiet)
    print(f"experts of shard {shard[0]}/{shard[1]} are in {folder}")
    return 0


def _evaluate(args) -> int:
    from . import DistillConfig, checkpoint, load_data, resolve_device
    from .outputs import check_evaluation_out, load_synthetic
    from .settings import from_dict, override_all, to_dict
    from .training.evaluate import evaluate_with_baseline

    device = resolve_device(args.device)
    saved = load_synthetic(args.synthetic)
    out = Path(args.out) if args.out else Path(args.synthetic).with_name("evaluation.json")
    check_evaluation_out(out, Path(args.synthetic))
    changes = [(f"evaluation.{key}", value) for key, value in (("models", args.models), ("epochs", args.epochs), ("lrs", args.lrs), ("dsa", args.dsa))
               if value is not None]
    config = override_all(from_dict(DistillConfig, saved["settings"]), changes)
    data = load_data(config, args.data_root, args.download).to(device)
    seed = config.seed if args.seed is None else args.seed
    evaluation = evaluate_with_baseline(saved["images"], saved["labels"], data, config.evaluation, seed=seed, lr=saved.get("eval_lr"),
                                        baseline_per_class=config.ipc, progress=not args.quiet)
    checkpoint.save_json({"synthetic": str(args.synthetic), "protocol": to_dict(config.evaluation), "evaluation": evaluation}, out)
    _report(evaluation, out)
    return 0


def _report(evaluation: dict, where: Path) -> None:
    syn, rnd = evaluation["synthetic"], evaluation["random_real"]
    print(f"distilled   test accuracy {100 * syn['test_mean']:.2f} +- {100 * syn['test_std']:.2f} % (lr {syn['lr']})")
    print(f"random real test accuracy {100 * rnd['test_mean']:.2f} +- {100 * rnd['test_std']:.2f} % (lr {rnd['lr']})")
    print(f"improvement {100 * evaluation['improvement']:+.2f} points; details in {where}")
