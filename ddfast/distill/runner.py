"""Run a distillation method end to end: data, pre-trained pool, iterations with checkpoints and
validation-based checkpoint choice, final evaluation against the random-real baseline, outputs.

Files in ``out_dir``: ``checkpoint.pt`` (rewritten atomically every ``checkpoint_every``
iterations; a rerun with the same settings resumes from it), and at the end ``synthetic.pt`` (the
set chosen on the validation split, decoded as networks train on it), ``synthetic.png`` (the stored
images) and ``results.json``.

Under torchrun the processes share each iteration (``Method.distributed``); rank 0 alone checks the
output folder, validates, writes the checkpoints and outputs, and evaluates; a resumed run's
checkpoint reaches the other ranks from rank 0.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from pathlib import Path

import torch

from . import checkpoint, distributed
from .allocator import keep_freed_memory
from .cmi_regularizer import CMIRegularizer
from .config import DistillConfig
from .method import Context, RealSampler, method_class
from .mim_regularizer import MIMRegularizer
from .outputs import save_grid, save_synthetic
from .preflight import CHECKPOINT, FORMAT, RESTART, check_distributed, check_draws, check_out, check_settings, resolve_device
from .progress import bar, logger
from .settings import to_dict
from .training.data import RealData, dataset_info, load, whiten
from .training.evaluate import evaluate, evaluate_with_baseline
from .training.pretrain import pretrained_pool
from .training.seeding import derive_seed, seeded

CHECKPOINT_SECONDS = 300  # also checkpoint at least this often
SPLIT_SEED = 0  # the validation split (and pre-trained pools) are shared by runs of every seed


def load_data(config: DistillConfig, root=None, download: bool = False, *, cache_dir: str | os.PathLike | None = None,
              quiet: bool = True) -> RealData:
    """The run's real data: train / validation / test split as the settings say, ZCA-whitened when they say so
    (image folders decode once into ``cache_dir``)."""
    data = load(config.dataset, root, val_per_class=config.val_per_class, seed=SPLIT_SEED, train_per_class=config.train_per_class,
                test_per_class=config.test_per_class, download=download, image_size=config.image_size, cache=cache_dir, quiet=quiet)
    return whiten(data, config.zca) if config.zca is not None else data


def check_start(config: DistillConfig, out_dir: str | os.PathLike, *, device: str | torch.device | None = None, restart: bool = False,
                stop_after: int | None = None) -> tuple[torch.device, dict | None]:
    """Everything ``run`` checks before any work: the device, the settings (and that they run under
    torchrun when started there), ``stop_after``, the output folder and its checkpoint. Returns the
    device and the checkpoint to resume from (None: none; always None on ranks other than 0)."""
    world = distributed.world()
    device = world.device(resolve_device(device))
    check_settings(config)
    check_distributed(config, world)
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after (--stop-after) must be an integer >= 1, got {stop_after!r}")
    info = dataset_info(config.dataset, config.image_size)
    image_shape = (info.num_classes * config.ipc, info.channels, info.image_size, info.image_size)
    if not world.leads:
        return device, None
    return device, check_out(Path(out_dir), to_dict(config), image_shape, restart=restart)


def data_key(config: DistillConfig) -> dict:
    """What identifies the real training split of ``config`` (for caches)."""
    key = {"dataset": config.dataset, "val_per_class": config.val_per_class, "train_per_class": config.train_per_class, "split_seed": SPLIT_SEED}
    extra = {name: getattr(config, name) for name in ("image_size", "zca") if getattr(config, name) is not None}
    return {**key, **extra}


def pretrain(config: DistillConfig, data: RealData, *, cache_dir: str | os.PathLike | None = None,
             quiet: bool = False, cached_only: bool = False) -> dict[str, list[torch.nn.Module]]:
    """The regularisers' pools of pre-trained networks for ``config`` (trained once, then cached), by name ("cmi", "mim");
    ``cached_only``: loaded from the cache only (``FileNotFoundError`` where one is missing)."""
    specs = {name: reg.pretrain for name, reg in (("cmi", config.cmi), ("mim", config.mim)) if reg is not None}
    if not specs:
        raise ValueError("the settings have no regulariser (cmi and mim are None), so there is no pool to pre-train")
    return {name: pretrained_pool(spec, data, data_key(config), cache=cache_dir, quiet=quiet, cached_only=cached_only)
            for name, spec in specs.items()}


def regularizers(config: DistillConfig, data: RealData, *, cache_dir: str | os.PathLike | None = None, quiet: bool = False,
                 world: distributed.World = distributed.World()) -> list:
    """The regularisers ``config`` asks for, with their pre-trained networks, sharing ``world``'s work.

    In a distributed ``world`` rank 0 trains (or loads) the pools into the cache first, and the other
    ranks load them from there once it has: every process uses the same networks.
    """
    if config.cmi is None and config.mim is None:
        return []
    if world.distributed:
        if world.leads:
            pretrain(config, data, cache_dir=cache_dir, quiet=quiet)
        world.barrier("waiting for rank 0 to pre-train the regularisers' networks")
    pools = pretrain(config, data, cache_dir=cache_dir, quiet=quiet or world.distributed, cached_only=world.distributed)
    regs = []
    if config.cmi is not None:
        regs.append(CMIRegularizer(pools["cmi"], config.cmi, data.info.num_classes, data.train, world=world))
    if config.mim is not None:
        regs.append(MIMRegularizer(pools["mim"], config.mim, data, seed=config.seed, world=world))
    return regs


def run(
    config: DistillConfig,
    out_dir: str | os.PathLike,
    *,
    data_root: str | os.PathLike | None = None,
    download: bool = False,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    quiet: bool = False,
    restart: bool = False,
    stop_after: int | None = None,
    final: bool = True,
) -> dict:
    """Distill with ``config``, writing to ``out_dir``; returns the results (also in results.json).

    ``restart`` ignores an existing checkpoint. ``stop_after`` stops (checkpointed) once that many
    iterations are done, as a kill would. ``final=False`` skips the test-set evaluation (sweeps).
    The process keeps freed memory from then on (``allocator.keep_freed_memory``, glibc): CPU steps
    reuse their buffers instead of mapping and zeroing them again.
    """
    session: dict[str, dict[str, float]] = {}  # this call's timings; distill / select accumulate in progress
    out = Path(out_dir)
    device, state = check_start(config, out, device=device, restart=restart, stop_after=stop_after)
    keep_freed_memory()
    world = distributed.world()
    with world.group(device):
        return _run(config, out, world, device, state, session, data_root=data_root, download=download, cache_dir=cache_dir,
                    quiet=quiet or not world.leads, stop_after=stop_after, final=final)


def _run(config: DistillConfig, out: Path, world: distributed.World, device: torch.device, state: dict | None, session: dict, *,
         data_root, download: bool, cache_dir, quiet: bool, stop_after: int | None, final: bool) -> dict:
    """``run`` once its checks have passed, in ``world``'s process group."""
    log = logger(quiet)
    method_cls = method_class(config.method)
    with timed(session, "data"):
        data = load_data(config, data_root, download, cache_dir=cache_dir, quiet=quiet).to(device)
    check_draws(config, int(torch.bincount(data.train.labels, minlength=data.info.num_classes).min()), f"{data.info.name}'s training split")
    generator = torch.Generator().manual_seed(derive_seed(config.seed, "init"))
    synthetic = method_cls.initial_synthetic(config, data, generator)
    with timed(session, "pretrain"):
        regs = regularizers(config, data, cache_dir=cache_dir, quiet=quiet, world=world)
    with timed(session, "prepare"):  # e.g. MTT's expert buffer, trained here when missing
        method = method_cls(Context(config, data, synthetic, RealSampler(data), regs, data_key(config), cache_dir, quiet, world))
    settings = to_dict(config)
    progress = {"iteration": 0, "history": [], "selection": [], "best": None, "seconds": {}}
    state = world.broadcast(state, "sharing the checkpoint to resume from")
    if state is not None:
        with torch.no_grad():
            synthetic.images.copy_(state["images"].to(device))
        try:
            method.load_state_dict(state["method"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # saved by another version of the method
            raise ValueError(f"{out / CHECKPOINT}: the method's saved state does not fit ({type(exc).__name__}: {exc}); {RESTART}") from None
        progress = state["progress"]
        log(f"resuming from {out / CHECKPOINT} at iteration {progress['iteration']}")

    def save_checkpoint():
        if world.leads:
            checkpoint.save({"format": FORMAT, "settings": settings, "images": synthetic.images.detach().cpu(),
                             "method": method.state_dict(), "progress": progress}, out / CHECKPOINT)

    if not _iterate(config, method, data, progress, save_checkpoint, stop_after, log, quiet):
        return {"status": "stopped", "iteration": progress["iteration"], "checkpoint": str(out / CHECKPOINT)}
    if not world.leads:
        return {"status": "done", "iteration": progress["iteration"], "rank": world.rank}

    best = progress["best"]
    stored = best["images"].to(device)
    images, labels = method.decode(stored)
    save_synthetic(out / "synthetic.pt", images, labels, data.info, settings, iteration=best["iteration"], eval_lr=best["eval_lr"])
    save_grid(out / "synthetic.png", data.zca.invert(stored) if data.zca is not None else stored, data.info, per_row=config.ipc)
    results = {
        "status": "done",
        "settings": settings,
        "environment": _environment(device),
        "iterations": progress["iteration"],
        "loss": {"first": progress["history"][0], "last": progress["history"][-1], "history": progress["history"]},
        "selection": progress["selection"],
        "chosen_iteration": best["iteration"],
        "chosen_val_accuracy": best["val_accuracy"],
        "compile_seconds": method.compile_seconds,  # this process's, inside the distill time
    }
    if final:
        with timed(session, "evaluate"):
            results["evaluation"] = ev = evaluate_with_baseline(images, labels, data, config.evaluation, seed=config.seed, lr=best["eval_lr"],
                                                                baseline_per_class=config.ipc, progress=not quiet)
        log(f"test accuracy: distilled {100 * ev['synthetic']['test_mean']:.2f} +- {100 * ev['synthetic']['test_std']:.2f}, "
            f"random real {100 * ev['random_real']['test_mean']:.2f} +- {100 * ev['random_real']['test_std']:.2f} "
            f"(improvement {100 * ev['improvement']:+.2f} points)")
    results["seconds"] = {**session, **progress["seconds"]}
    checkpoint.save_json(results, out / "results.json")
    return results


def _iterate(config: DistillConfig, method, data: RealData, progress: dict, save_checkpoint, stop_after, log, quiet: bool) -> bool:
    """Run the remaining iterations with validation and checkpoints; False when stopped by ``stop_after``."""
    last_save, first = time.perf_counter(), progress["iteration"]
    with bar(config.iterations, f"{config.method} {config.dataset} ipc {config.ipc}", enabled=not quiet,
             initial=progress["iteration"]) as progress_bar:
        while progress["iteration"] < config.iterations:
            iteration = progress["iteration"]
            with timed(progress["seconds"], "distill"), seeded(derive_seed(config.seed, "iteration", iteration), data.train.images.device):
                logs = method.step(iteration)
            if not math.isfinite(logs["loss"]):
                raise FloatingPointError(f"loss became {logs['loss']} at iteration {iteration}; the last checkpoint holds the last good state")
            if iteration == first and method.compile_seconds:
                log(f"compiled the network calls in {method.compile_seconds:.1f} s (once per input shape; speed.compile=false skips it)")
            progress["history"].append(logs)
            progress["iteration"] = done = iteration + 1
            progress_bar.update(1)
            progress_bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()})
            selected = done == config.iterations or (config.select_every and done % config.select_every == 0)
            if selected and method.ctx.world.leads:
                with timed(progress["seconds"], "select"):
                    _select(progress, method, data, config, quiet)
                log(f"iteration {done}: validation accuracy {progress['selection'][-1]['val_accuracy']:.4f}")
            stopping = stop_after is not None and done >= stop_after
            if selected or stopping or done % config.checkpoint_every == 0 or time.perf_counter() - last_save > CHECKPOINT_SECONDS:
                save_checkpoint()
                last_save = time.perf_counter()
            if stopping and done < config.iterations:
                return False
    return True


@contextlib.contextmanager
def timed(record: dict, name: str):
    """Add the block's wall-clock and process CPU time (all threads) to ``record[name]``, in seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        entry = record.setdefault(name, {"wall": 0.0, "cpu": 0.0})
        entry["wall"] += time.perf_counter() - wall
        entry["cpu"] += time.process_time() - cpu


def _select(progress: dict, method, data: RealData, config: DistillConfig, quiet: bool) -> None:
    """Validate the current synthetic set; keep it as the best if its validation accuracy is the highest so far."""
    synthetic = method.ctx.synthetic
    eval_lr = method.eval_lr()
    with torch.no_grad():
        images, labels = method.decode(synthetic.images)
    accuracy = evaluate(images, labels, data, config.evaluation, seed=config.seed, lr=eval_lr, test=False,
                        models=config.select_models, progress=not quiet)
    record = {"iteration": progress["iteration"], "val_accuracy": accuracy.val_mean, "lr": accuracy.lr}
    progress["selection"].append(record)
    best = progress["best"]
    if best is None or record["val_accuracy"] > best["val_accuracy"]:
        progress["best"] = {**record, "eval_lr": eval_lr, "images": synthetic.images.detach().cpu().clone()}


def _environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"torch": torch.__version__, "device": str(device), "device_name": name, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


