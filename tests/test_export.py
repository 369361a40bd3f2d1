"""`rmoe export` -> transformers `from_pretrained`: native Qwen2-MoE / Qwen3-MoE for the linear router,
self-contained remote code for the other causal routers; logits equal ours and transformers' greedy
`generate` equals `rmoe generate`. Non-causal routers are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_generate import CAUSAL_ROUTERS, _fit, checkpoint_with

from rmoe.cli import main
from rmoe.generate import SamplingConfig, generate
from rmoe.inference import load_model

PROMPTS = ["The quick brown", "Pack", "héllo wörld ✓"]  # different lengths (left padding), multi-byte UTF-8
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def template_ckpt(tmp_path_factory) -> Path:
    """A real 2-step `rmoe fit` checkpoint (linear router); other architectures reuse its structure."""
    return _fit(tmp_path_factory.mktemp("export-fit"))


def ours(model_path: Path, continuations: bool = True) -> tuple[torch.Tensor, list[list[int]] | None]:
    """Our logits of the first prompt and greedy continuations of all prompts (rmoe's own loop)."""
    loaded = load_model(model_path)
    tok = loaded.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    with torch.no_grad():
        logits = loaded.model(torch.tensor([prompts[0]])).logits
    if not continuations:
        return logits, None
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    results = generate(
        loaded.model, prompts, sampling, eos_id=tok.eos_id, pad_id=tok.pad_id, num_valid_ids=tok.vocab_size
    )
    return logits, [r.new_ids for r in results]


LOADER = r"""
import json, sys, importlib.abc
class NoRmoe(importlib.abc.MetaPathFinder):  # prove the export needs no rmoe
    def find_spec(self, name, path, target=None):
        if name == "rmoe" or name.startswith("rmoe."):
            raise ImportError("rmoe must not be imported: " + name)
sys.meta_path.insert(0, NoRmoe())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
prompts, new_tokens, out, generate = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4].split(",")
results = {}
for d in sys.argv[5:]:
    remote = "auto_map" in json.load(open(d + "/config.json"))
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=remote).eval()
    tok = AutoTokenizer.from_pretrained(d, trust_remote_code=remote)
    batch = tok(prompts, return_tensors="pt", padding=True)  # the export pads on the left by itself
    with torch.no_grad():
        logits = model(input_ids=tok(prompts[:1], return_tensors="pt")["input_ids"]).logits
        generated = model.generate(**batch, max_new_tokens=new_tokens) if d.rsplit("/", 1)[-1] in generate else None
    new = generated[:, batch["input_ids"].shape[1]:].tolist() if generated is not None else None
    tokens = [tok(p)["input_ids"] for p in prompts]
    results[d] = {"class": type(model).__name__, "logits": logits.tolist(), "new": new, "eos": tok.eos_token_id,
                  "tokens": tokens, "decoded": [tok.decode(t) for t in tokens], "padding_side": tok.padding_side}
json.dump(results, open(out, "w"))
"""


def start_transformers_loader(tmp_path: Path, dirs: list[Path]) -> tuple[subprocess.Popen, Path]:
    """Load each export in ONE fresh interpreter where importing rmoe fails (logits and greedy
    generations to a JSON file); started in the background, so the test computes ours meanwhile."""
    script, out = tmp_path / "load.py", tmp_path / "loaded.json"
    script.write_text(LOADER)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, str(script), json.dumps(PROMPTS), str(NEW_TOKENS), str(out), ",".join(GENERATE)]
    args += [str(d) for d in dirs]
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    return process, out


def strip_after_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


EXPORTS = {  # name -> (router, arch overrides, expected transformers class)
    "qwen2_moe": ("linear", {"shared_expert_intermediate_size": 16}, "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("linear", {"qk_norm": True, "qkv_bias": False, "head_dim": 16}, "Qwen3MoeForCausalLM"),
    **{  # every other causal router (cosine and the cosine head: as xmoe, the same class)
        case: (router, {"router_options": options}, "RmoeForCausalLM")
        for case, (router, options) in CAUSAL_ROUTERS.items()
        if case not in ("linear", "cosine", "gru_cosine_head_detach")
    },
    "gru_qwen3": ("gru", {"router_options": {"state_dim": 8}, "qk_norm": True, "qkv_bias": False}, "RmoeForCausalLM"),
}


GENERATE = ("qwen2_moe", "qwen3_moe", "gru", "gru_lstm_ralpha", "hyper", "locmoe", "linear_bias_balance")
"""The exports whose greedy `generate` is compared too (all: logits); each a different router code path."""


@pytest.mark.slow
def test_exports_load_in_transformers_and_equal_rmoe(template_ckpt, tmp_path, capsys):
    dirs, ckpts = [], []
    for i, (name, (router, arch, hf_class)) in enumerate(EXPORTS.items()):
        ckpt = checkpoint_with(template_ckpt, tmp_path / "ckpts" / f"{name}.ckpt", router=router, seed=i, **arch)
        out = tmp_path / "exports" / name
        main(["export", "--ckpt", str(ckpt), "--out", str(out)])
        assert f"wrote {out}" in capsys.readouterr().out
        remote = hf_class == "RmoeForCausalLM"
        assert (out / "modeling_rmoe.py").exists() == remote  # native exports carry no code
        assert ("auto_map" in json.loads((out / "config.json").read_text())) == remote
        assert "## Training configuration" in (out / "README.md").read_text()
        dirs.append(out)
        ckpts.append(ckpt)
    process, results_file = start_transformers_loader(tmp_path, dirs)
    expected = {}
    for (name, (_, _, hf_class)), ckpt, out in zip(EXPORTS.items(), ckpts, dirs):
        expected[str(out)] = (hf_class, *ours(ckpt, continuations=name in GENERATE))
        if name in ("qwen2_moe", "qwen3_moe", "gru"):  # an export directory is a model for `rmoe generate` too
            assert ours(out)[1] == expected[str(out)][2], name
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    loaded = json.loads(results_file.read_text())
    for d, (hf_class, logits, new_ids) in expected.items():
        theirs = loaded[d]
        assert theirs["class"] == hf_class, d
        assert theirs["decoded"] == PROMPTS and theirs["tokens"][2] == list("héllo wörld ✓".encode()), d
        assert theirs["padding_side"] == "left", d  # batched generation pads before the prompts
        error = (torch.tensor(theirs["logits"]) - logits).abs().max().item()
        assert error <= 1e-5, (d, error)
        if new_ids is not None:
            assert [strip_after_eos(row, theirs["eos"]) for row in theirs["new"]] == new_ids, (
                d,
                theirs["new"],
                new_ids,
            )
    continuations = [tuple(row) for d in expected if expected[d][2] for row in expected[d][2]]
    assert len(set(continuations)) > len(GENERATE)  # not degenerate (all rows the same token)


def test_rmoe_generate_output_equals_transformers_generate_text(template_ckpt, tmp_path, capsys):
    ckpt = checkpoint_with(template_ckpt, tmp_path / "gru.ckpt", router="gru", router_options={"state_dim": 8})
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "gru")])
    capsys.readouterr()
    main(["generate", "--ckpt", str(tmp_path / "gru"), PROMPTS[0], "--max-new-tokens", str(NEW_TOKENS)])
    text = capsys.readouterr().out.rstrip("\n")
    loaded = load_model(ckpt)
    new = ours(ckpt)[1][0]
    assert text == PROMPTS[0] + loaded.tokenizer.decode([t for t in new if t != loaded.tokenizer.eos_id])


@pytest.mark.parametrize(
    ("router", "options", "fragment"),
    [("expert_choice", {}, "not causal in evaluation"), ("locmoe", {"capacity_factor": 1.0}, "capacity_factor=1.0")],
)
def test_non_causal_routers_are_refused(router, options, fragment, template_ckpt, tmp_path, capsys):
    ckpt = checkpoint_with(template_ckpt, tmp_path / "nc.ckpt", router=router, router_options=options)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("rmoe: error: cannot export") and fragment in err
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_output_directory(template_ckpt, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    with pytest.raises(SystemExit):
        main(["export", "--ckpt", str(template_ckpt), "--out", str(tmp_path / "out")])
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "x").read_text() == "keep me"
