"""Choose one setting on the validation split: distill once per value, keep the best, test only it."""

from __future__ import annotations

import os
from pathlib import Path

from . import checkpoint, distributed
from .config import DistillConfig
from .runner import check_start, run
from .settings import override


def sweep(config: DistillConfig, path: str, values, out_dir: str | os.PathLike, **run_options) -> dict:
    """Run ``config`` with the setting at dotted ``path`` set to each of ``values`` (in ``out_dir/<path>=<value>``).

    Candidates are compared by the validation accuracy of their chosen checkpoint; only the winner
    is evaluated on the test set (with the random-real baseline). Writes ``out_dir/sweep.json``.
    ``run_options`` go to ``run`` (``restart`` restarts the candidates, not the winner's final evaluation).
    """
    if distributed.world().distributed:
        raise ValueError("a sweep runs in one process only: start it without torchrun")
    values = list(values)
    if not values:
        raise ValueError(f"sweep over {path!r} needs at least one value")
    if len(set(map(str, values))) < len(values):
        raise ValueError(f"sweep over {path!r} lists a value twice: {values}")
    out = Path(out_dir)
    checkpoint.check_writable_folder(out)
    plan = []
    for value in values:  # every candidate is checked before the first one runs
        try:
            candidate = override(config, path, value)
        except ValueError as exc:
            raise ValueError(f"sweep value {path}={value}: {exc}") from None
        folder = out / f"{path}={value}"
        check_start(candidate, folder, device=run_options.get("device"), restart=run_options.get("restart", False))
        plan.append((value, candidate, folder))
    candidates = []
    for value, candidate, folder in plan:
        result = run(candidate, folder, final=False, **run_options)
        candidates.append({"value": value, "val_accuracy": result["chosen_val_accuracy"], "chosen_iteration": result["chosen_iteration"],
                           "out": str(folder)})
    best = max(candidates, key=lambda c: c["val_accuracy"])
    final = run(override(config, path, best["value"]), best["out"], **{**run_options, "restart": False})  # resumes at its end
    summary = {"path": path, "candidates": candidates, "chosen": best, "evaluation": final["evaluation"], "seconds": final["seconds"]}
    checkpoint.save_json(summary, out / "sweep.json")
    return summary
