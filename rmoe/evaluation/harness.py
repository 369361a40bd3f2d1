"""``rmoe eval``: downstream tasks of EleutherAI's lm-evaluation-harness on an rmoe model.

``rmoe eval --ckpt runs/base/version_0/checkpoints/last.ckpt --tasks small --out eval/base`` scores the model
(a checkpoint or an ``rmoe export`` folder) with :class:`rmoe.evaluation.lm_eval_model.RmoeLM` and writes
lm-eval's results JSON (``results.json``) and its table (``results.md``) to ``--out``, all at once at the end:
a failed evaluation leaves nothing there. lm-eval is the optional extra ``eval``.

Task lists: names lm-eval knows (``lm_eval --tasks list``), task folders of your own (``--include-path``, lm-eval's
YAML task format, local data files), or a preset of :data:`PRESETS`.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rmoe.checkpoints import check_can_create
from rmoe.errors import RmoeError, ToolArgumentParser

PRESETS: dict[str, tuple[str, ...]] = {
    # The RMoE paper's downstream tasks (Qiu et al., arXiv 2408.06793, Sec. 4.1 and Table 3: ARC-Easy acc, HellaSwag
    # acc_norm, PIQA acc_norm, SciQ, LAMBADA acc; the shots are not stated, lm-eval's default is zero-shot; which
    # LAMBADA is not stated either: OpenAI's, the common one).
    "paper": ("arc_easy", "hellaswag", "piqa", "sciq", "lambada_openai"),
    # Minutes on a CPU for a small model: two multiple-choice tasks and a cloze task.
    "small": ("arc_easy", "piqa", "lambada_openai"),
}
"""``--tasks <preset>``: named task lists."""

MISSING_EXTRA = (
    "rmoe eval runs EleutherAI's lm-evaluation-harness, which is not installed. Install the extra with "
    "`pip install -e '.[eval]'` (it adds lm-eval and accelerate, and keeps torch as it is), then run the same "
    "command again."
)


def build_parser() -> argparse.ArgumentParser:
    """The ``rmoe eval`` argument parser (errors raise :class:`RmoeError`)."""
    parser = ToolArgumentParser(prog="rmoe eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint (<run>/checkpoints/*.ckpt) or an export folder")
    parser.add_argument(
        "--tasks", required=True, help=f"comma-separated lm-eval task names, or a preset: {', '.join(PRESETS)}"
    )
    parser.add_argument("--num-fewshot", type=int, default=None, metavar="N", help="few-shot examples (default 0)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="at most N examples per task")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="rows per forward pass (default 8)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--include-path", default=None, metavar="DIR", help="a folder of your own lm-eval task YAMLs")
    parser.add_argument("--seed", type=int, default=1234, help="lm-eval's seeds (few-shot sampling), default 1234")
    parser.add_argument(
        "--bootstrap-iters",
        type=int,
        default=0,
        metavar="N",
        help="bootstrap resamples for the standard error of perplexity-like metrics (default 0: none; lm-eval forks "
        "a process pool for them, which can hang beside torch's threads); accuracies get theirs analytically",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="where results.json and results.md go")
    return parser


def expand_tasks(spec: str) -> list[str]:
    """``--tasks``: presets expanded, duplicates dropped, order kept."""
    names: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        for name in PRESETS.get(item, (item,)):
            if name and name not in names:
                names.append(name)
    if not names:
        raise RmoeError(f"--tasks {spec!r}: no task named; e.g. --tasks small, or --tasks arc_easy,piqa.")
    return names


def check_options(args: argparse.Namespace) -> None:
    for option, value, minimum in (("--limit", args.limit, 1), ("--num-fewshot", args.num_fewshot, 0),
                                   ("--batch-size", args.batch_size, 1),
                                   ("--bootstrap-iters", args.bootstrap_iters, 0)):  # fmt: skip
        if value is not None and value < minimum:
            raise RmoeError(f"{option} {value}: expected an integer >= {minimum}.")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise RmoeError(
            f"--include-path {args.include_path}: no such folder (expected a folder of lm-eval task YAMLs)."
        )


@functools.cache
def task_manager(include_path: str | None) -> Any:
    """lm-eval's ``TaskManager`` (it indexes thousands of task YAMLs: seconds), once per folder and process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def load_tasks(names: list[str], include_path: str | None) -> tuple[Any, dict[str, Any]]:
    """lm-eval's task manager and task dict, refusing an unknown task or one whose data cannot be read here."""
    from lm_eval.tasks import get_task_dict

    manager = task_manager(None if include_path is None else str(Path(include_path).resolve()))
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise RmoeError(
                f"--tasks: unknown task {name!r}{hint}. `lm_eval --tasks list` lists lm-eval's tasks; a task of your "
                f"own goes in a folder given with --include-path; presets: {', '.join(PRESETS)}."
            )
    tasks: dict[str, Any] = {}
    for name in names:
        try:
            tasks.update(get_task_dict([name], manager))
        except Exception as err:  # datasets' offline, hub and file errors differ by version: name the task
            raise RmoeError(
                f"--tasks: the data of task {name!r} is not available here ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:300]}). Download it once where the Hugging Face Hub can be reached "
                "(it is cached), or use a task with local data files (--include-path)."
            ) from None
    return manager, tasks


def evaluate(
    ckpt: str,
    tasks: list[str],
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    include_path: str | None = None,
    seed: int = 1234,
    bootstrap_iters: int = 0,
    log_samples: bool = False,
) -> dict[str, Any]:
    """lm-eval's results dict for ``tasks`` on the model at ``ckpt`` (what ``rmoe eval`` writes)."""
    import lm_eval

    from rmoe.evaluation.lm_eval_model import RmoeLM
    from rmoe.inference import load_model

    manager, task_dict = load_tasks(tasks, include_path)
    model = RmoeLM(load_model(ckpt, device=device), batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=list(task_dict.values()),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    results["config"]["model"] = f"rmoe:{ckpt}"
    return results


def main(argv: list[str]) -> None:
    """``rmoe eval ...``; raises RmoeError for bad input (the ``rmoe`` entry point prints it, exit 2)."""
    args = build_parser().parse_args(argv)
    if importlib.util.find_spec("lm_eval") is None:
        raise RmoeError(MISSING_EXTRA)
    check_options(args)
    names = expand_tasks(args.tasks)
    out = check_can_create(args.out, "--out")
    if out.is_dir() and any(out.iterdir()):
        raise RmoeError(f"--out {out} is not empty; give a new folder (nothing is overwritten).")
    started = time.monotonic()
    results = evaluate(
        args.ckpt,
        names,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        include_path=args.include_path,
        seed=args.seed,
        bootstrap_iters=args.bootstrap_iters,
    )
    from lm_eval.utils import handle_non_serializable, make_table

    table = make_table(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:  # written next to --out, moved in whole: an evaluation that fails leaves nothing half-written
        (staging / "results.json").write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
        (staging / "results.md").write_text(table + "\n")
        out.mkdir(exist_ok=True)
        for path in staging.iterdir():
            path.replace(out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(table)
    print(f"rmoe eval: {len(names)} task(s) in {time.monotonic() - started:.0f} s; wrote results.json and results.md "
          f"to {out}")  # fmt: skip
