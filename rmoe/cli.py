"""The ``rmoe`` command: Lightning's CLI over YAML configs, with clear errors.

LightningCLI (``parser_mode="omegaconf"``) derives from the type hints and docstrings of ``MoeLMModule``,
``TextDataModule`` and ``Trainer``: fit/validate/test, ``--config`` files merged in order, ``key=value`` overrides,
``${...}`` interpolation, type and unknown-key errors, ``--print_config``, each run's resolved ``config.yaml``, resume.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rmoe.errors import RmoeError
from rmoe.runs import run_folder_of_checkpoint

_DOTLIST = re.compile(r"^[A-Za-z_][\w.]*=")
_UNKNOWN = (
    re.compile(r"Group '(?P<group>[\w.]+)' does not accept option '(?P<key>[\w.]+)'"),
    re.compile(r"unrecognized arguments: --(?P<key>[\w.]+)"),
    re.compile(r"Key '(?P<key>[\w.]+)' is not expected"),
)


class RmoeArgumentParser(LightningArgumentParser):
    """Reports a bad key or value in one paragraph (with the nearest valid keys) and exits 2, without the usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        message = " ".join(message.split())
        for pattern in _UNKNOWN:
            match = pattern.search(message)
            if match:
                group = match.groupdict().get("group")
                key = f"{group}.{match['key']}" if group else match["key"]
                message = f"unknown key {key!r}. {_valid_keys_hint(parser, key)}"
                break
        else:
            message = _type_error_message(message) or message
        prog = parser.prog.replace(" [options]", "")
        print(f"rmoe: error: {message} (see `{prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


_PARSER_KEY = re.compile(r'Parser key "(?P<key>[\w.]+)"')
_TYPE_ERROR = re.compile(r"Expected a <class '(?P<type>\w+)'>\. Got value: (?P<value>\S+)")


def _type_error_message(message: str) -> str | None:
    """jsonargparse's nested type error (``Parser key "model.optim": ... Parser key "lr": Expected a <class
    'float'>. Got value: inf``) as one sentence naming the whole key."""
    keys, wrong = _PARSER_KEY.findall(message), _TYPE_ERROR.search(message)
    if not keys or wrong is None:
        return None
    key = keys[0] if len(keys) == 1 else f"{keys[0]}.{keys[-1]}"
    kind = {"float": "a finite number", "int": "an integer", "bool": "true or false", "str": "a string"}.get(
        wrong["type"], f"a {wrong['type']}"
    )
    return f"{key}={wrong['value']} is invalid; expected {kind}."


def _valid_keys_hint(parser: Any, key: str) -> str:
    known = sorted({s.lstrip("-") for a in parser._actions for s in a.option_strings if s.startswith("--")})
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = [
        k[len(prefix) :] for k in known if prefix and k.startswith(prefix) and not re.search(r"[.+]", k[len(prefix) :])
    ]
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"Did you mean {' or '.join(repr(k) for k in close)}? " if close else ""
    if siblings:
        hint += f"Valid keys under {prefix[:-1]!r}: {', '.join(siblings)}."
    return hint


DESCRIPTION = (
    "Train and evaluate Mixture-of-Experts LMs from YAML (fit, validate, test; see README.md). "
    "Offline routing analysis of a checkpoint: rmoe analyze --help; a text's routing: rmoe inspect --help. "
    "Text generation: rmoe generate --help; "
    "to and from transformers: rmoe export --help, rmoe import --help. "
    "Experiments over a grid of configs: rmoe sweep --help; their results table and plots: rmoe report --help."
)


_MISSING = object()


def _override_keys(args: Any, group: str) -> list[str]:
    """The ``<group>.*`` keys set on the command line (``--group.a.b=v`` or ``--group.a.b v``)."""
    if not isinstance(args, list):
        return []
    return [a[2:].partition("=")[0] for a in args if isinstance(a, str) and a.startswith(f"--{group}.")]


def _lookup(config: Any, key: str) -> Any:
    """``config[key]`` for a dotted key through namespaces and dicts (``_MISSING`` if absent)."""
    node = config
    for part in key.split("."):
        node = node.get(part, _MISSING) if isinstance(node, dict) else getattr(node, part, _MISSING)
        if node is _MISSING:
            return _MISSING
    return node


def _assign(config: Any, key: str, value: Any) -> None:
    parent, _, last = key.rpartition(".")
    node = _lookup(config, parent) if parent else config
    if isinstance(node, dict):
        node[last] = value
    elif node is not _MISSING and node is not None:
        setattr(node, last, value)


class RmoeCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test (no ``predict``: the module defines no prediction)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        self._model_overrides = _override_keys(args, "model")
        self._data_overrides = _override_keys(args, "data")

    def _parse_ckpt_path(self) -> None:
        """``fit --ckpt``: the given config runs, once :func:`rmoe.training.resume.check_resume_config` accepts it.
        ``validate`` / ``test``: Lightning fills the model's config from the checkpoint's hyperparameters; a
        ``model.*`` key given on the command line wins over them (e.g. ``model.arch.router_options.eval_routing``)."""
        from rmoe.checkpoints import read_checkpoint

        subcommand = self.config.get("subcommand")
        given = {}
        if subcommand:
            given = {key: _lookup(self.config[subcommand], key) for key in self._model_overrides}
            ckpt_path = self.config[subcommand].get("ckpt_path")
            special = ckpt_path in ("last", "best", "hpc") or str(ckpt_path).startswith("registry")
            if ckpt_path and not special:  # before Lightning's own torch.load of it: one message per fault
                checkpoint = read_checkpoint(ckpt_path, "--ckpt")
                if subcommand == "fit":  # resume: the config given is the run's from here on (resume.py)
                    from rmoe.training.resume import check_resume_config

                    check_resume_config(self.config[subcommand], checkpoint, ckpt_path)
                    return
        super()._parse_ckpt_path()
        for key, value in given.items():
            if value is not _MISSING:
                _assign(self.config[subcommand], key, value)

    def _set_seed(self) -> None:
        if self.config.get("subcommand"):  # the ranges first: Lightning seeds numpy, which refuses -1 with a traceback
            check_values(self.config[self.config["subcommand"]])
        super()._set_seed()

    def add_arguments_to_parser(self, parser: Any) -> None:
        # the tokenizer decides the vocabulary: copy it into the model config at instantiation
        parser.link_arguments("data.vocab_size", "model.arch.vocab_size", apply_on="instantiate")
        parser.add_argument(
            "--checkpoint_every_minutes",
            type=float,
            default=15.0,
            help="fit: write last.ckpt at the first step boundary after every this many minutes of training "
            "(0: only where the ModelCheckpoint callbacks say), so a killed run loses at most this much.",
        )

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer, with rmoe's progress bar, model summary and run callbacks unless the config has its own."""
        from lightning.pytorch.callbacks import ModelSummary, ProgressBar

        from rmoe.checkpoints import AtomicCheckpointIO
        from rmoe.training.callbacks import FitSummary, MoeModelSummary, RunStatus, StepProgressBar
        from rmoe.training.versions import claim_log_versions

        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = trainer_config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if trainer_config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            callbacks.append(StepProgressBar())
        if trainer_config.get("enable_model_summary") is not False and not any(
            isinstance(c, ModelSummary) for c in callbacks
        ):
            callbacks.append(MoeModelSummary())
        if self.subcommand == "fit":
            callbacks += [*self._fit_safety_callbacks(), FitSummary()]
        callbacks.append(RunStatus())
        extra: dict[str, Any] = {}
        plugins = trainer_config.get("plugins")
        if _atomic_io_applies(trainer_config.get("strategy", "auto"), plugins):
            extra["plugins"] = [*(plugins or []), AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**{**kwargs, **extra, "callbacks": callbacks})
        if self.subcommand is not None:  # before the run folder exists: a run that cannot start writes nothing
            self._check_device_and_precision(trainer)
        if self.subcommand == "fit":
            self._check_step_memory(trainer)
        if self.subcommand is not None:  # a CLI built with run=False (tests, notebooks) writes no run folder
            self._claimed_dirs = claim_log_versions(trainer.loggers)
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            self._give_back_claimed_folders(subcommand)
            raise

    def _give_back_claimed_folders(self, subcommand: str) -> None:
        """Remove the run folder claimed by a command that failed before it did anything (``fit`` before its first
        optimiser step, ``validate`` / ``test`` at all), so no half-written folder looks like a run."""
        import shutil

        trainer = getattr(self, "trainer", None)
        if trainer is None or not getattr(self, "_claimed_dirs", None):
            return
        if subcommand == "fit" and trainer.global_step > 0:
            return
        for folder in self._claimed_dirs:
            if not any(folder.glob("checkpoints/*.ckpt")):
                shutil.rmtree(folder, ignore_errors=True)
                print(f"rmoe: removed {folder}: the {subcommand} failed before it did anything", file=sys.stderr)

    def _fit_safety_callbacks(self) -> list[Any]:
        """Every ``rmoe fit`` stops in order on a signal and writes ``last.ckpt`` every ``checkpoint_every_minutes``."""
        from rmoe.training.interrupt import Interruption

        minutes = float(self.config[self.subcommand].get("checkpoint_every_minutes") or 0)
        if minutes < 0:
            raise RmoeError(f"checkpoint_every_minutes={minutes:g} must be >= 0 (0: no time-based checkpoint).")
        return [Interruption(every_minutes=minutes)]

    def _check_device_and_precision(self, trainer: Any) -> None:
        """Refuse a precision or expert backend this machine cannot run."""
        from rmoe.training.precision import check_device_and_precision, compute_dtype

        device = trainer.strategy.root_device
        requested = self.config[self.subcommand].get("trainer", {}).get("precision")
        if requested is not None and compute_dtype(requested) != compute_dtype(trainer.precision):
            raise RmoeError(
                f"trainer.precision={requested} does not run on {device.type}: Lightning would train "
                f"in {trainer.precision} instead, a different numerical path. Set trainer.precision=bf16-mixed or "
                "32-true."
            )
        from rmoe.training.strategies import ExpertParallelStrategy

        if isinstance(trainer.strategy, ExpertParallelStrategy):
            trainer.strategy.check_model(self.model.arch, compile=self.model.compile_layers)
        launcher = getattr(trainer.strategy, "launcher", None)
        if device.type == "cuda" and getattr(launcher, "_start_method", None) == "fork":
            return  # asking CUDA about the device here would break the fork that follows
        check_device_and_precision(self.model.arch, device, trainer.precision, compile=self.model.compile_layers)

    def _check_step_memory(self, trainer: Any) -> None:
        """Refuse a training step the machine cannot hold; on CPU each of ``trainer.num_devices`` runs one."""
        from rmoe.training.memory import check_step_memory

        device = trainer.strategy.root_device
        from rmoe.training.strategies import ExpertParallelStrategy

        if isinstance(trainer.strategy, ExpertParallelStrategy):
            trainer.strategy.check_model(self.model.arch, compile=self.model.compile_layers)
        launcher = getattr(trainer.strategy, "launcher", None)
        if device.type == "cuda" and getattr(launcher, "_start_method", None) == "fork":
            return  # asking CUDA for its free memory here would break the fork that follows
        check_step_memory(
            self.model.arch,
            self.datamodule.batch_size,
            self.datamodule.block_size,
            device,
            trainer.precision,
            trainer.accumulate_grad_batches,
            processes=trainer.num_devices if device.type == "cpu" else 1,
        )

    def before_instantiate_classes(self) -> None:
        """A bad ``model.init_from`` fails here, before anything is built or written (``--ckpt``: in
        :meth:`_parse_ckpt_path`)."""
        from rmoe.checkpoints import read_checkpoint

        ckpt_path = self.config.get(self.subcommand, {}).get("ckpt_path") if self.subcommand else None
        special = ckpt_path in ("last", "best", "hpc") or str(ckpt_path).startswith("registry")
        init_from = self.config.get(self.subcommand, {}).get("model", {}).get("init_from") if self.subcommand else None
        if self.subcommand == "fit" and init_from:  # checked again when loaded; here before any run folder exists
            from rmoe.inference import check_model_path

            check_model_path(init_from, "model.init_from")
        if self.subcommand == "fit" and ckpt_path and not special:
            self._continue_in_run_dir(Path(ckpt_path))
        if self.subcommand in ("validate", "test") and not ckpt_path:
            raise RmoeError(
                f"rmoe {self.subcommand} needs --ckpt: the checkpoint to evaluate (without one it would evaluate "
                "the untrained model). For example: --ckpt <run>/checkpoints/last.ckpt."
            )
        if self.subcommand in ("validate", "test") and ckpt_path and not special:
            self._data_of_checkpoint(read_checkpoint(ckpt_path, "--ckpt"))
            self._evaluate_in_run_dir(Path(ckpt_path))

    def _data_of_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Evaluate on the checkpoint's data: each :data:`CHECKPOINT_DATA_KEYS` key takes the checkpoint's value,
        with a note, unless given on the command line."""
        saved = checkpoint.get("datamodule_hyper_parameters") or {}
        data = self.config[self.subcommand].get("data")
        if data is None:
            return
        notes = []
        for key in CHECKPOINT_DATA_KEYS:
            if key not in saved or _lookup(data, key) is _MISSING or _lookup(data, key) == saved[key]:
                continue
            if f"data.{key}" in self._data_overrides:
                notes.append(f"data.{key}={_lookup(data, key)!r} as given (the model was trained with {saved[key]!r})")
            else:
                notes.append(f"data.{key}={saved[key]!r} from the checkpoint (the config says {_lookup(data, key)!r})")
                _assign(data, key, saved[key])
        if notes:
            print(f"rmoe {self.subcommand}: {'; '.join(notes)}", file=sys.stderr)

    def _tensorboard_init_args(self) -> dict[str, Any] | None:
        """The init_args of the config's TensorBoard logger with no fixed version, else None."""
        logger = self.config[self.subcommand].get("trainer", {}).get("logger")
        if (
            not logger
            or not hasattr(logger, "get")
            or not str(logger.get("class_path", "")).endswith("TensorBoardLogger")
        ):
            return None
        init_args = logger.get("init_args")
        if init_args is None or init_args.get("version") is not None:
            return None
        return init_args

    def _evaluate_in_run_dir(self, ckpt_path: Path) -> None:
        """Evaluating a run's own checkpoint writes to ``<run>/validate|test/version_<n>/``, not next to the run
        (only when the config's TensorBoard logger has no fixed version)."""
        run_dir = run_folder_of_checkpoint(ckpt_path)
        init_args = self._tensorboard_init_args()
        if run_dir is None or init_args is None:
            return
        init_args["save_dir"] = str(run_dir)
        init_args["name"] = self.subcommand
        # restoring the checkpoint's ModelCheckpoint state into an evaluation run: nothing is saved here
        warnings.filterwarnings("ignore", message="The dirpath has changed from")
        print(f"rmoe {self.subcommand}: writing to {run_dir / self.subcommand}/", file=sys.stderr)

    def _continue_in_run_dir(self, ckpt_path: Path) -> None:
        """Resuming a run's own checkpoint continues in its ``version_<k>`` (TensorBoard shows one run) when the
        config's logger writes to the run's parent with no fixed version. Each resumed part saves its config as
        ``config.resume-<n>.yaml`` beside the first part's ``config.yaml``."""
        run_dir = run_folder_of_checkpoint(ckpt_path)
        init_args = self._tensorboard_init_args()
        if run_dir is None or init_args is None:
            return
        save_dir = Path(init_args.get("save_dir") or "lightning_logs")
        if (save_dir / (init_args.get("name") or "lightning_logs")).resolve() == run_dir.parent:
            init_args["version"] = run_dir.name
            part = 1 + len(list(run_dir.glob("config.resume-*.yaml")))
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"config.resume-{part}.yaml"}


CHECKPOINT_DATA_KEYS = ("source", "train_files", "val_files", "test_files", "tokenizer", "bpe_vocab_size",
                        "block_size", "max_train_bytes", "max_eval_bytes")  # fmt: skip
"""The data a model was trained on: what ``validate`` / ``test --ckpt`` take from the checkpoint."""


_PLAIN_STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_find_unused_parameters_true",
                     "single_device")  # fmt: skip
"""Strategies that write checkpoints with a ``CheckpointIO`` plugin (FSDP writes with torch.distributed.checkpoint)."""


def _atomic_io_applies(strategy: Any, plugins: Any) -> bool:
    """Whether the trainer gets :class:`~rmoe.checkpoints.AtomicCheckpointIO`: a plain strategy, no own writer."""
    from lightning.fabric.plugins import CheckpointIO

    from rmoe.training.strategies import ExpertParallelStrategy

    plugin_list = plugins if isinstance(plugins, list) else [plugins] if plugins else []
    plain = (isinstance(strategy, str) and strategy in _PLAIN_STRATEGIES) or isinstance(
        strategy, ExpertParallelStrategy
    )
    return plain and not any(isinstance(p, CheckpointIO) for p in plugin_list)


_LIGHTNING_OPTIONS = {"--ckpt": "--ckpt_path", "--ckpt-path": "--ckpt_path", "--print-config": "--print_config"}
"""fit/validate/test: the project's spellings (as in the other subcommands) -> Lightning's."""


def normalize_args(argv: list[str]) -> list[str]:
    """Accept ``model.arch.router=gru`` for ``--model.arch.router=gru``, and ``--ckpt`` / ``--print-config`` for
    Lightning's options (whose ``--ckpt_path`` is refused: one spelling in every command)."""
    out = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if name in _LIGHTNING_OPTIONS:
            arg = _LIGHTNING_OPTIONS[name] + sep + value
        elif name == "--ckpt_path":
            raise RmoeError("--ckpt_path: rmoe spells it --ckpt (as analyze, inspect, generate and export do).")
        elif _DOTLIST.match(arg) and not arg.startswith("-"):
            arg = f"--{arg}"
        out.append(arg)
    return out


class _DropLightningChatter(logging.Filter):
    """Lightning's info lines a user of ``rmoe`` can do nothing about (see :func:`quiet_lightning`)."""

    PREFIXES = (
        # MoeModelSummary replaces Lightning's summary on purpose (instantiate_trainer)
        "Trainer already configured with model summary callbacks",
        # advertising for Lightning's cloud products (litlogger / litmodels)
        "💡 Tip:",
        # the seed is in the run's config.yaml; printed before a config error it only adds noise
        "Seed set to",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = re.sub(r"^\[rank: \d+\] ", "", str(record.getMessage()))  # rank_prefixed_message
        return not message.startswith(self.PREFIXES)


def quiet_lightning() -> None:
    """Drop :class:`_DropLightningChatter`'s lines from Lightning's loggers (idempotent)."""
    for name in (
        "lightning.pytorch.utilities.rank_zero",  # rank_zero_info of Lightning's trainer and connectors
        "lightning.fabric.utilities.rank_zero",
        "lightning.fabric.utilities.seed",  # seed_everything
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningChatter) for f in logger.filters):
            logger.addFilter(_DropLightningChatter())


def _option_value(argv: list[str], names: tuple[str, ...]) -> str | None:
    """The value of the last ``--name=value`` / ``--name value`` of ``argv`` for any of ``names``."""
    value = None
    for i, arg in enumerate(argv):
        name, sep, rest = arg.partition("=")
        if name in names:
            value = rest if sep else (argv[i + 1] if i + 1 < len(argv) else None)
    return value


def with_checkpoint_config(argv: list[str]) -> list[str]:
    """``rmoe validate|test --ckpt C`` without ``--config``: use the run's ``config.yaml``, else the data settings
    saved in the checkpoint (writing next to it); refuse without either rather than evaluate on the defaults."""
    if argv[:1] not in (["validate"], ["test"]) or any(a in ("--config", "-c") or a.startswith("--config=")
                                                       for a in argv):  # fmt: skip
        return argv
    ckpt = _option_value(argv, ("--ckpt", "--ckpt-path", "--ckpt_path"))
    if ckpt is None or ckpt in ("last", "best", "hpc") or any(a in ("-h", "--help") for a in argv):
        return argv
    from rmoe.checkpoints import read_checkpoint
    from rmoe.runs import run_dir_of_checkpoint

    run_config = run_dir_of_checkpoint(ckpt) / "config.yaml"
    if run_config.is_file():
        print(f"rmoe {argv[0]}: no --config given, using the run's {run_config}", file=sys.stderr)
        return [argv[0], "--config", str(run_config), *argv[1:]]
    import json

    data = dict(read_checkpoint(ckpt, "--ckpt").get("datamodule_hyper_parameters") or {})
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    if not data:
        raise RmoeError(
            f"rmoe {argv[0]} --ckpt {ckpt}: no --config given, no config.yaml in the checkpoint's run folder and no "
            "data settings saved in the checkpoint; pass the config it was trained with (--config <run>/config.yaml)."
        )
    print(f"rmoe {argv[0]}: no --config given, using the data settings saved in {ckpt}", file=sys.stderr)
    root = Path(ckpt).resolve().parent / argv[0]
    overrides = [f"--data.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in data.items()]
    return [argv[0], *overrides, f"--trainer.default_root_dir={root}", *argv[1:]]


_SEED_RANGE = (0, 2**32 - 1)


def check_values(config: Any) -> None:
    """Check the ranges of the top-level and trainer options Lightning does not check itself."""
    seed = config.get("seed_everything")
    if not isinstance(seed, bool) and seed is not None and not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
        raise RmoeError(f"seed_everything={seed} is invalid; expected an integer in [0, {_SEED_RANGE[1]}] (or true).")
    trainer = config.get("trainer") or {}

    def number(key: str) -> Any:
        value = trainer.get(key) if hasattr(trainer, "get") else None
        return None if value is None or isinstance(value, (str, bool)) else value

    checks = (
        ("gradient_clip_val", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 or null: no clipping)"),
        ("val_check_interval", lambda v: v > 0, "a number > 0 (steps, or a fraction of an epoch)"),
        ("accumulate_grad_batches", lambda v: v >= 1, "an integer >= 1"),
        ("log_every_n_steps", lambda v: v >= 0, "an integer >= 0"),
        ("limit_train_batches", lambda v: v >= 0, "a number >= 0"),
        ("limit_val_batches", lambda v: v >= 0, "a number >= 0"),
        ("limit_test_batches", lambda v: v >= 0, "a number >= 0"),
        ("num_sanity_val_steps", lambda v: v >= -1, "an integer >= -1"),
    )
    for key, ok, expected in checks:
        value = number(key)
        if value is not None and not ok(value):
            raise RmoeError(f"trainer.{key}={value!r} is invalid; expected {expected}.")


def check_config_files(argv: list[str]) -> None:
    """Each ``--config`` file exists, is UTF-8 text and holds a YAML mapping (else jsonargparse gives a traceback)."""
    import yaml

    for i, arg in enumerate(argv):
        name, sep, value = arg.partition("=")
        if name not in ("--config", "-c"):
            continue
        path = Path(value if sep else (argv[i + 1] if i + 1 < len(argv) else ""))
        if not path.is_file():
            raise RmoeError(f"--config {path}: no such file; expected a YAML config such as configs/base.yaml.")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise RmoeError(
                f"--config {path} is not a text file (byte {err.object[err.start]:#04x} at offset {err.start} is not "
                "UTF-8); expected a YAML config such as configs/base.yaml."
            ) from None
        except OSError as err:
            raise RmoeError(f"--config {path} cannot be read: {err.strerror or err}.") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise RmoeError(f"--config {path} is not valid YAML: {' '.join(str(err).split())}") from None
        if doc is not None and not isinstance(doc, dict):
            raise RmoeError(
                f"--config {path} holds a YAML {type(doc).__name__} ({' '.join(str(doc).split())[:40]!r}), not a "
                "mapping; expected keys such as trainer:, model:, data: (see configs/base.yaml)."
            )
        for section in ("trainer", "model", "data"):
            if isinstance(doc, dict) and section in doc and not isinstance(doc[section], dict):
                raise RmoeError(
                    f"--config {path}: {section}: is {doc[section]!r}, not a mapping; give its keys (e.g. "
                    f"{section}: {{...}}) or leave {section}: out to keep the other configs' values."
                )


def build_cli(argv: list[str], run: bool = True) -> RmoeCLI:
    """Parse ``argv`` (``rmoe`` arguments, dot-list overrides allowed) and, if ``run``, run the subcommand."""
    from rmoe.data import TextDataModule
    from rmoe.training.module import MoeLMModule

    quiet_lightning()
    argv = with_checkpoint_config(normalize_args(argv))
    check_config_files(argv)
    # `args` is how dot-list overrides reach the parser, not a mistake; the pytree note is Lightning's own.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")
    return RmoeCLI(
        MoeLMModule,
        TextDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_class=RmoeArgumentParser,
        parser_kwargs={"parser_mode": "omegaconf", "allow_abbrev": False, "prog": "rmoe", "description": DESCRIPTION},
        auto_configure_optimizers=False,
        args=argv,
        run=run,
    )


_TOOLS = {
    "analyze": "rmoe.analyze",
    "eval": "rmoe.evaluation.harness",
    "generate": "rmoe.generate",
    "export": "rmoe.interop.export",
    "import": "rmoe.interop.importer",
    "inspect": "rmoe.inspection",
    "sweep": "rmoe.sweep",
    "report": "rmoe.report",
    "routers": "rmoe.router_catalog",
}
"""Plain argparse subcommands: name -> module with ``main(argv)``, whose non-zero return is the exit code."""


def _user_error(err: BaseException | None) -> BaseException | None:
    """The :class:`RmoeError` or Lightning misconfiguration in ``err``'s chain of causes, if any."""
    while err is not None and not isinstance(err, (RmoeError, MisconfigurationException)):
        err = err.__cause__
    return err


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``rmoe`` command (and ``python -m rmoe``)."""
    try:
        args = sys.argv[1:] if argv is None else list(argv)
        if args[:1] and args[0] in _TOOLS:  # analyze / inspect / generate / ... : argparse tools, not Lightning
            import importlib

            returncode = importlib.import_module(_TOOLS[args[0]]).main(args[1:])
            if returncode:
                raise SystemExit(returncode)
        else:
            build_cli(args)
    except SIGTERMException as err:  # Lightning's stop after a signal (DDP): exit 128 + the signal, not 0
        from rmoe.training.interrupt import exit_code

        raise SystemExit(exit_code(err)) from None
    except (ValueError, MisconfigurationException) as err:  # user errors: one paragraph, no traceback
        err = _user_error(err)  # jsonargparse wraps what a nested dataclass (model.optim) raises
        if err is None:
            raise
        print(f"rmoe: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as err:  # a full disk or an unwritable folder met by a write rmoe does not wrap itself
        from rmoe.checkpoints import WRITE_ERRNOS, describe_os_error

        if err.errno not in WRITE_ERRNOS:
            raise
        where = err.filename or "a file of the run"
        print(f"rmoe: error: {' '.join(describe_os_error(err, where, 'write').split())}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
