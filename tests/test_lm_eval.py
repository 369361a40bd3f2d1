"""``rmoe eval``: lm-evaluation-harness on rmoe's model, offline, against lm-eval's own ``hf`` model on the export.

The tasks are written here in lm-eval's YAML task format with local JSON data (no hub): a multiple-choice task,
a cloze task (loglikelihood), a perplexity task (rolling loglikelihood) and a generation task. A quick checkpoint
is scored through ``rmoe eval`` and, after ``rmoe export``, through ``lm_eval``'s ``hf`` model (transformers, remote
code for a non-native router): the same log-likelihood per request (to float tolerance), the same greedy flags,
generations and scores. Batching and padding give what batch size 1 gives.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from tiny import BASE_CONFIGS, tiny_overrides

from rmoe.cli import main

pytest.importorskip("lm_eval")

# whole runs of lm-eval over a trained and exported model: out of the inner loop
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

QUESTIONS = [
    ("The quick brown fox jumps over the lazy", ["dog", "cat", "box"], 0),
    ("Pack my box with five dozen liquor", ["jugs", "vows", "zebras"], 0),
    ("Sphinx of black quartz, judge my", ["vow", "fox", "dog"], 0),
    ("How vexingly quick daft zebras", ["jump", "pack", "judge"], 0),
    ("The lazy dog sleeps under the", ["box", "quartz", "tree"], 2),
]
TASKS = {
    "rmoe_mc": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    },
    "rmoe_cloze": {
        "output_type": "loglikelihood",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{' ' + choices[label]}}",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
    },
    "rmoe_ppl": {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{question}} {{choices[label]}}.",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
    },
    "rmoe_gen": {
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{' ' + choices[label]}}",
        "generation_kwargs": {"until": ["."], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    },
}
NAMES = ",".join(TASKS)


def write_tasks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in QUESTIONS))
    for name, spec in TASKS.items():
        doc = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
               "test_split": "test", **spec, "metadata": {"version": 1.0}}  # fmt: skip
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder


def quick_checkpoint(root: Path, name: str, *extra: str) -> tuple[Path, Path]:
    """A few training steps (context 64) and the export of their last checkpoint."""
    args = [*BASE_CONFIGS, *tiny_overrides(root), "data.block_size=64", "data.num_workers=0", "trainer.max_steps=6",
            "trainer.val_check_interval=6", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
            f"trainer.logger.init_args.save_dir={root / 'runs'}", f"trainer.logger.init_args.name={name}",
            f"data.cache_dir={root / 'cache' / name}", *extra]  # fmt: skip
    main(["fit", *args])
    ckpt, export = root / f"runs/{name}/version_0/checkpoints/last.ckpt", root / f"exported_{name}"
    main(["export", "--ckpt", str(ckpt), "--out", str(export)])
    return ckpt, export


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module) -> dict[str, Path]:
    """A byte-tokenizer checkpoint, its export and the local tasks; the BPE pair is made on first use."""
    root = tmp_path_factory.mktemp("lm_eval")
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("TOKENIZERS_PARALLELISM", "false")  # no tokenizer threads before a fork
    paths = {"root": root, "tasks": write_tasks(root / "tasks")}
    paths["byte"], paths["byte_export"] = quick_checkpoint(root, "byte")
    return paths


VARIANTS = {  # made on first use: a BPE tokenizer; a router transformers has no class for (remote code)
    "bpe": ("data.tokenizer=bpe", "data.bpe_vocab_size=300"),
    "gru": ("model.arch.router=gru",),
}


def with_variant(setup: dict[str, Path], which: str) -> dict[str, Path]:
    if which in VARIANTS and which not in setup:
        setup[which], setup[f"{which}_export"] = quick_checkpoint(setup["root"], which, *VARIANTS[which])
    return setup


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def ours(setup: dict[str, Path], which: str, batch_size: int = 4) -> dict:
    from rmoe.evaluation.harness import evaluate

    return evaluate(str(setup[which]), list(TASKS), batch_size=batch_size, include_path=str(setup["tasks"]),
                    log_samples=True)  # fmt: skip


def hf(setup: dict[str, Path], which: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = {"pretrained": str(setup[f"{which}_export"]), "trust_remote_code": True, "dtype": "float32",
            "device": "cpu"}  # fmt: skip
    return lm_eval.simple_evaluate(model="hf", model_args=args, tasks=list(TASKS), batch_size=4, log_samples=True,
                                   bootstrap_iters=0,  # its process pool can hang beside torch's threads
                                   task_manager=TaskManager(include_path=str(setup["tasks"])))  # fmt: skip


def responses(results: dict) -> dict[str, list]:
    return {task: [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in results["samples"].items()}  # fmt: skip


def assert_same_responses(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for task in expected:
        for mine, theirs in zip(actual[task], expected[task], strict=True):
            for a, b in zip(mine, theirs, strict=True):
                a, b = a[0], b[0]
                if isinstance(b, str):  # a generation
                    assert a == b, (task, a, b)
                elif isinstance(b, (list, tuple)):  # (log-likelihood, greedy)
                    assert a[0] == pytest.approx(b[0], abs=1e-4, rel=1e-5), (task, a, b)
                    assert bool(a[1]) == bool(b[1]), (task, a, b)
                else:  # a rolling log-likelihood
                    assert a == pytest.approx(b, abs=1e-4, rel=1e-5), (task, a, b)


@pytest.mark.parametrize("which", ["byte", "bpe", "gru"])
def test_rmoe_eval_and_lm_evals_hf_model_on_the_export_give_the_same_numbers(setup, which):
    setup = with_variant(setup, which)
    if which == "gru":  # exported as remote code: lm-eval's client runs rmoe's own modelling file
        assert json.loads((setup["gru_export"] / "config.json").read_text()).get("auto_map")
    mine, theirs = ours(setup, which), hf(setup, which)
    assert_same_responses(responses(mine), responses(theirs))
    for task in TASKS:
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float) and not metric.endswith("_stderr,none"):
                assert mine["results"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, metric)
    assert mine["results"]["rmoe_ppl"]["word_perplexity,none"] > 1  # scored, not a stub
    assert not math.isnan(mine["results"]["rmoe_mc"]["acc,none"])


def test_batching_and_padding_give_what_batch_size_one_gives(setup):
    assert_same_responses(responses(ours(setup, "byte", batch_size=3)), responses(ours(setup, "byte", batch_size=1)))


def test_rmoe_eval_writes_results_and_a_table(setup, tmp_path, capsys):
    out = tmp_path / "eval"
    main(["eval", "--ckpt", str(setup["byte"]), "--tasks", NAMES, "--include-path", str(setup["tasks"]),
          "--limit", "3", "--out", str(out)])  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == set(TASKS)
    assert results["config"]["limit"] == 3 and "rmoe_mc" in (out / "results.md").read_text()
    assert "rmoe eval: 4 task(s)" in capsys.readouterr().out
    # an export folder is read like a checkpoint
    main(["eval", "--ckpt", str(setup["byte_export"]), "--tasks", "rmoe_mc", "--include-path", str(setup["tasks"]),
          "--out", str(tmp_path / "eval_export")])  # fmt: skip
    assert (tmp_path / "eval_export/results.json").is_file()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--tasks", "rmoe_nope"], "unknown task 'rmoe_nope' (did you mean rmoe_"),
        (["--tasks", "rmoe_mc", "--limit", "0"], "--limit 0: expected an integer >= 1"),
        (["--tasks", "rmoe_offline"], "the data of task 'rmoe_offline' is not available here"),
        (["--tasks", "rmoe_mc", "--include-path", "/nonexistent"], "--include-path /nonexistent: no such folder"),
    ],
)
def test_bad_input_is_one_paragraph_exit_2_and_nothing_written(setup, extra, fragment, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    write_tasks(tasks)
    offline = {"task": "rmoe_offline", "dataset_path": "nobody/no_such_dataset_here", "output_type": "loglikelihood",
               "test_split": "test", "doc_to_text": "{{q}}", "doc_to_target": "{{a}}"}  # fmt: skip
    (tasks / "rmoe_offline.yaml").write_text(yaml.safe_dump(offline))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--ckpt", str(setup["byte"]), "--include-path", str(tasks), "--out", str(out), *extra])
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()


def test_without_lm_eval_the_message_says_what_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--ckpt", "x.ckpt", "--tasks", "small", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "pip install -e '.[eval]'" in capsys.readouterr().err


def test_text_the_tokenizer_cannot_encode_names_the_task(setup):
    from types import SimpleNamespace

    from rmoe.errors import RmoeError
    from rmoe.evaluation.lm_eval_model import RmoeLM
    from rmoe.inference import load_model

    model = RmoeLM(load_model(str(setup["byte"])))
    model.rmoe_tokenizer = SimpleNamespace(unencodable=lambda text: ["☃"] if "☃" in text else [])
    request = SimpleNamespace(args=("Is it ☃ cold?", " yes"), task_name="snow_task")
    with pytest.raises(RmoeError, match=r"task 'snow_task': the model's tokenizer cannot encode '☃'"):
        model.loglikelihood([request])


def test_the_presets_name_known_tasks():
    from lm_eval.tasks import TaskManager

    from rmoe.evaluation.harness import PRESETS, expand_tasks

    known = set(TaskManager().all_tasks)
    for preset, names in PRESETS.items():
        assert set(names) <= known, preset
    assert expand_tasks("small,arc_easy,paper")[:3] == ["arc_easy", "piqa", "lambada_openai"]


def test_downstream_scores_are_logged_during_fit_and_reported_as_columns(setup, tmp_path):
    from rmoe.report.collect import read_run
    from rmoe.runs import read_scalars

    callback = (
        "--trainer.callbacks+={class_path: rmoe.training.downstream.DownstreamEval, init_args: "
        f"{{tasks: 'rmoe_mc,rmoe_ppl', every_n_steps: 2, limit: 3, include_path: {setup['tasks']}}}}}"
    )
    args = [*BASE_CONFIGS, *tiny_overrides(tmp_path), "data.block_size=64", "data.num_workers=0", "trainer.max_steps=4",
            "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
            f"trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "trainer.logger.init_args.name=dl",
            callback]  # fmt: skip
    main(["fit", *args])
    run = tmp_path / "runs/dl/version_0"
    scalars = read_scalars(run, pattern=r"^downstream/")
    assert sorted(step for step, _ in scalars["downstream/rmoe_mc/acc"]) == [2, 4]
    assert all(value > 1 for _, value in scalars["downstream/rmoe_ppl/word_perplexity"])
    row = read_run(run.parent, {})  # rmoe report's reading of a run: the final scores are columns
    assert 0 <= row.metrics["downstream/rmoe_mc/acc"] <= 1


def test_downstream_eval_refuses_an_unknown_task_before_training(setup, tmp_path, capsys):
    callback = ("--trainer.callbacks+={class_path: rmoe.training.downstream.DownstreamEval, init_args: "
                "{tasks: rmoe_nope, include_path: " + str(setup["tasks"]) + "}}")  # fmt: skip
    args = [*BASE_CONFIGS, *tiny_overrides(tmp_path), "trainer.max_steps=2", callback,
            f"trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code == 2
    assert "unknown task 'rmoe_nope'" in capsys.readouterr().err
