"""Command line: ``ddfast distill``, ``ddfast evaluate``, ``ddfast pretrain``, ``ddfast buffer`` (also ``python -m ddfast``).

Under torchrun (``torchrun --nproc-per-node R -m ddfast ...``) ``buffer`` and ``distill`` split their
work over the R processes; the other commands run in one process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from .allocator import keep_freed_memory
    from .distributed import PeerFailure

    parser = _parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    try:
        _check_world(args)
        return args.command(args)
    except (ValueError, FileNotFoundError, TypeError, FloatingPointError) as exc:  # the user's mistakes, said in one line
        parser.exit(2, f"ddfast {args.name}: error: {exc}\n")
    except PeerFailure as exc:
        parser.exit(1, f"ddfast {args.name}: error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"ddfast {args.name}: interrupted; rerunning the same command resumes from the last checkpoint\n")


def _check_world(args) -> None:
    """Under torchrun (WORLD_SIZE > 1), only the commands that split their work: buffer and distill without --sweep."""
    from .distributed import world

    size = world().size
    if size > 1 and (args.name not in ("buffer", "distill") or getattr(args, "sweep", None)):
        command = "distill --sweep" if args.name == "distill" else args.name
        raise ValueError(f"under torchrun (WORLD_SIZE={size}) ddfast runs buffer and distill (--method dm); "
                         f"{command} runs in one process only: start it without torchrun")


def _parser() -> argparse.ArgumentParser:
    from . import METHODS, PRESETS
    from .training.data import DATASETS, FOLDER_PREFIX
    from .training.models import ARCH_NAMES

    parser = argparse.ArgumentParser(prog="ddfast", description="Dataset distillation with fused kernels.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
        p.add_argument("--data-root", help="folder holding the datasets (default: $DDFAST_DATA_ROOT, else ~/.cache/ddfast/data)")
        p.add_argument("--download", action="store_true", help="download the dataset if it is missing")
        p.add_argument("--cache-dir", help="cache of decoded image folders, pre-trained networks and expert buffers "
                                           "(default: $DDFAST_CACHE_DIR, else ~/.cache/ddfast)")
        p.add_argument("--quiet", action="store_true", help="no progress bars or messages")

    def config_options(p: argparse.ArgumentParser, *, method_required: bool) -> None:
        p.add_argument("--method", required=method_required, default="dm", choices=sorted(METHODS))
        p.add_argument("--dataset", required=True, help=f"one of {sorted(DATASETS)}, or {FOLDER_PREFIX}<path> "
                                                        "(a tree <path>/{train,val}/<class>/<image>); resize with --set image_size=N")
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
    p.add_argument("--shard", metavar="I/N",
                   help="train only the experts k with k %% N == I (default: all; under torchrun rank r of R trains shard r/R)")
    p.set_defaults(command=_buffer, name="buffer", method="mtt")

    p = commands.add_parser("evaluate", help="evaluate a synthetic set against the random-real baseline")
    p.add_argument("synthetic", help="a synthetic.pt written by ddfast distill")
    run_options(p)
    p.add_argument("--models", type=int, help="networks to train (default: the run's protocol)")
    p.add_argument("--epochs", type=int, help="training epochs per network")
    p.add_argument("--lrs", help="candidate learning rates, comma separated, chosen on the validation split")
    p.add_argument("--dsa", choices=("on", "off"), help="augment evaluation training with DSA")
    p.add_argument("--seed", type=int, help="seed of the networks and the random-real subset (default: the run's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the run, e.g. evaluation.batch_size=128 or test_per_class=100 (repeatable)")
    p.add_argument("--arch", nargs="+", choices=list(ARCH_NAMES), metavar="NAME",
                   help="evaluate on each of these architectures, with the same protocol: convnet, resnet18, vgg11 (instance norm) "
                        "and alexnet (no norm) as in the reference code, NAME-bn with batch norm instead; "
                        f"choices: {', '.join(ARCH_NAMES)} (default: the run's own evaluation network)")
    p.add_argument("--out", help="JSON file for the results (default: evaluation.json beside the synthetic set, "
                                 "cross-architecture.json with --arch, and a .png plot beside it)")
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
    return override_all(config, changes + _set_changes(args.set))


def _set_changes(items: list[str]) -> list[tuple[str, str]]:
    """The (key, value) pairs of ``--set KEY=VALUE`` options."""
    changes = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        changes.append((key.strip(), value.strip()))
    return changes


def _print_config(config) -> int:
    from .settings import to_dict

    print(json.dumps(to_dict(config), indent=2))
    return 0


def _distill(args) -> int:
    from . import run, sweep
    from .distributed import world
    from .training.data import label

    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {args.stop_after}")
    config = _config(args)
    if args.print_config:
        return _print_config(config)
    regs = "".join(f"-{name}" for name in ("cmi", "mim") if getattr(config, name) is not None)
    out = args.out or f"runs/{config.method}-{label(config.dataset)}-ipc{config.ipc}-{args.preset}{regs}"
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
    if not world().leads:  # under torchrun rank 0 speaks for all
        return 0
    if results["status"] == "stopped":
        print(f"stopped after iteration {results['iteration']}; rerun the same command to resume")
        return 0
    _report(results["evaluation"], Path(out) / "results.json")
    return 0


def _checked_data(config, args):
    """The run's data on its device, loaded once the device and the settings have passed their checks."""
    from . import load_data, resolve_device
    from .distributed import world
    from .preflight import check_settings

    device = world().device(resolve_device(args.device))
    check_settings(config)
    return load_data(config, args.data_root, args.download, cache_dir=args.cache_dir, quiet=args.quiet).to(device)


def _pretrain(args) -> int:
    from . import pretrain

    config = _config(args)
    if args.print_config:
        return _print_config(config)
    data = _checked_data(config, args)
    pretrain(config, data, cache_dir=args.cache_dir, quiet=args.quiet)
    return 0


def _buffer(args) -> int:
    from .distributed import world as current_world
    from .mtt import MTT, expert_buffer
    from .runner import data_key
    from .training.buffers import parse_shard

    world = current_world()
    if world.distributed and args.shard is not None:
        raise ValueError(f"--shard cannot be combined with torchrun (WORLD_SIZE={world.size}): rank r trains shard r/{world.size}")
    shard = world.shard() if world.distributed else parse_shard(args.shard or "0/1")
    if args.method != "mtt":
        raise ValueError(f"expert buffers are for --method mtt, got {args.method!r}")
    config = _config(args)
    if args.print_config:
        return _print_config(config)
    data = _checked_data(config, args)
    with world.group(data.train.images.device):
        folder, _ = expert_buffer(MTT.read_options(config.options), config, data, data_key(config),
                                  cache_dir=args.cache_dir, shard=shard, quiet=args.quiet or not world.leads)
        world.barrier("waiting for the other ranks' experts")
    if world.distributed:
        if world.leads:
            print(f"experts of shards 0/{world.size} to {world.size - 1}/{world.size} are in {folder}")
    else:
        print(f"experts of shard {shard[0]}/{shard[1]} are in {folder}")
    return 0


def _evaluate(args) -> int:
    from . import DistillConfig, checkpoint, load_data, resolve_device
    from .outputs import check_evaluation_out, load_synthetic, save_architecture_plot
    from .settings import from_dict, override_all, to_dict
    from .training.evaluate import evaluate_architectures, evaluate_with_baseline

    device = resolve_device(args.device)
    saved = load_synthetic(args.synthetic)
    synthetic = Path(args.synthetic)
    out = Path(args.out) if args.out else synthetic.with_name("cross-architecture.json" if args.arch else "evaluation.json")
    check_evaluation_out(out, synthetic)
    plot = out.with_suffix(".png")
    if args.arch and plot.resolve() == synthetic.with_suffix(".png").resolve():
        raise ValueError(f"--out {out} would put the plot over the synthetic set's picture {plot}: choose another file name")
    changes = [(f"evaluation.{key}", value) for key, value in (("models", args.models), ("epochs", args.epochs), ("lrs", args.lrs), ("dsa", args.dsa))
               if value is not None]
    config = override_all(from_dict(DistillConfig, saved["settings"]), changes + _set_changes(args.set))
    data = load_data(config, args.data_root, args.download, cache_dir=args.cache_dir, quiet=args.quiet).to(device)
    seed = config.seed if args.seed is None else args.seed
    options = dict(seed=seed, lr=saved.get("eval_lr"), baseline_per_class=config.ipc, progress=not args.quiet)
    if args.arch:
        results = evaluate_architectures(saved["images"], saved["labels"], data, config.evaluation, args.arch, **options)
        checkpoint.save_json({"synthetic": str(args.synthetic), "protocol": to_dict(config.evaluation), "architectures": args.arch,
                              "evaluation": results}, out)
        save_architecture_plot(plot, results, f"{data.info.name}, {len(saved['labels']) // data.info.num_classes} images per class")
        print(_architecture_table(results))
        print(f"details in {out}, plot in {plot}")
        return 0
    evaluation = evaluate_with_baseline(saved["images"], saved["labels"], data, config.evaluation, **options)
    checkpoint.save_json({"synthetic": str(args.synthetic), "protocol": to_dict(config.evaluation), "evaluation": evaluation}, out)
    _report(evaluation, out)
    return 0


def _architecture_table(results: dict) -> str:
    """The cross-architecture results of ``evaluate_architectures`` as a Markdown table (test accuracy, %)."""
    lines = ["| architecture | distilled (%) | random real (%) | gain (points) | lr |", "|---|---|---|---|---|"]
    for name, result in results.items():
        syn, rnd = result["synthetic"], result["random_real"]
        lines.append(f"| {name} | {100 * syn['test_mean']:.2f} +- {100 * syn['test_std']:.2f} | {100 * rnd['test_mean']:.2f} +- "
                     f"{100 * rnd['test_std']:.2f} | {100 * result['improvement']:+.2f} | {syn['lr']:g} |")
    return "\n".join(lines)


def _report(evaluation: dict, where: Path) -> None:
    syn, rnd = evaluation["synthetic"], evaluation["random_real"]
    print(f"distilled   test accuracy {100 * syn['test_mean']:.2f} +- {100 * syn['test_std']:.2f} % (lr {syn['lr']})")
    print(f"random real test accuracy {100 * rnd['test_mean']:.2f} +- {100 * rnd['test_std']:.2f} % (lr {rnd['lr']})")
    print(f"improvement {100 * evaluation['improvement']:+.2f} points; details in {where}")
