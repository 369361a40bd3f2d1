"""`rmoe import`: tiny random transformers Qwen2-MoE / Qwen3-MoE models saved with `save_pretrained`
become rmoe checkpoints with the same logits, usable by `rmoe analyze`, `rmoe generate` and fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import TEXT

from rmoe.cli import main
from rmoe.data.tokenizer import ByteTokenizer
from rmoe.interop.export import byte_tokenizer_fast

COMMON = dict(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    moe_intermediate_size=16,
    num_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    initializer_range=0.2,
    eos_token_id=256,
    pad_token_id=257,
)


def save_tiny_hf_model(directory: Path, model_type: str) -> torch.nn.Module:
    """A randomly initialised transformers model (and a byte-level tokenizer) written with save_pretrained."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    if model_type == "qwen2_moe":
        hf = Qwen2MoeForCausalLM(Qwen2MoeConfig(**COMMON, shared_expert_intermediate_size=24, norm_topk_prob=False))
    else:
        hf = Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, head_dim=16, norm_topk_prob=True, mlp_only_layers=[0]))
    with torch.no_grad():  # norms away from 1 and biases away from 0: a missing one would show
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    hf.eval().save_pretrained(str(directory))
    byte_tokenizer_fast(ByteTokenizer()).save_pretrained(str(directory))
    return hf


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe"])
def test_import_gives_the_same_model_and_works_with_analyze_generate_and_fine_tuning(model_type, tmp_path, capsys):
    from rmoe.training.module import MoeLMModule

    hf = save_tiny_hf_model(tmp_path / "hf", model_type)
    main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
    ckpt = tmp_path / "run/checkpoints/imported.ckpt"
    assert f"wrote {ckpt}" in capsys.readouterr().out

    module = MoeLMModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert module.arch.qk_norm == (model_type == "qwen3_moe")
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        ours, theirs = module.model(ids), hf(ids, output_router_logits=True)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    for mine, hf_logits in zip(ours.routing, theirs.router_logits):
        torch.testing.assert_close(mine.logits_TE, hf_logits.float(), atol=1e-5, rtol=0)

    # rmoe generate, greedy, equals transformers' greedy generate
    main(["generate", "--ckpt", str(ckpt), "The quick", "--max-new-tokens", "5", "--no-stop"])
    text = capsys.readouterr().out.rstrip("\n")
    prompt = torch.tensor([list(b"The quick")])
    hf_new = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=5,
        do_sample=False,
        eos_token_id=None,
        suppress_tokens=list(range(258, 320)),
    )[0, prompt.shape[1] :]
    assert text == "The quick" + ByteTokenizer().decode(hf_new.tolist())
    if model_type == "qwen3_moe":
        return  # the rest reads the checkpoint only, as for qwen2_moe

    # rmoe analyze on a local text file (the data source is the user's choice)
    data = tmp_path / "data.txt"
    data.write_text(TEXT * 20)
    main(
        [
            "analyze",
            "--ckpt",
            str(ckpt),
            "--split",
            "val",
            "--max-batches",
            "1",
            "--out",
            str(tmp_path / "analysis"),
            *("--data", "source=files", "--data", f"train_files=[{data}]", "--data", "block_size=32"),
            *("--data", f"cache_dir={tmp_path / 'cache'}"),
        ]
    )
    metrics = json.loads((tmp_path / "analysis/metrics.json").read_text())
    assert metrics["loss"] > 0 and metrics["router"] == "linear"

    # fine-tuning: the imported module trains with Lightning on our data module
    import lightning as L

    from rmoe.data import TextDataModule

    datamodule = TextDataModule(
        source="files",
        train_files=[str(data)],
        tokenizer=str(tmp_path / "run/tokenizer"),
        block_size=16,
        batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )
    before = module.model.embed_tokens.weight.detach().clone()
    module.train()
    L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
    ).fit(module, datamodule)
    assert not torch.equal(before, module.model.embed_tokens.weight)


def test_an_imported_model_fine_tunes_through_rmoe_fit_with_init_from(tmp_path, capsys):
    """``rmoe fit --config OUT/config.yaml model.init_from=OUT/checkpoints/imported.ckpt``: the run starts
    from the imported weights (its val loss after one step at lr ~0 is the imported model's)."""
    from tiny import BASE_CONFIGS, scalars

    save_tiny_hf_model(tmp_path / "hf", "qwen2_moe")
    main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run"), "--context-length", "32"])
    ckpt = tmp_path / "run/checkpoints/imported.ckpt"
    data = tmp_path / "data.txt"
    data.write_text(TEXT * 20)
    common = [
        *BASE_CONFIGS,
        *("--config", str(tmp_path / "run/config.yaml")),
        "data.source=files",
        f"data.train_files=[{data}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "trainer.limit_val_batches=2",
        "trainer.enable_model_summary=false",
        f"trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        "trainer.logger.init_args.name=ft",
    ]
    main(["validate", *common, f"--ckpt={ckpt}"])  # the imported model as it is
    imported = scalars(tmp_path / "runs/ft/version_0", "val/loss")
    fit = [
        *common,
        f"model.init_from={ckpt}",
        "trainer.max_steps=1",
        "model.optim.lr=1e-12",
        "model.optim.warmup_steps=0",
    ]
    main(["fit", *fit, "trainer.val_check_interval=1", "trainer.num_sanity_val_steps=0"])
    tuned = scalars(tmp_path / "runs/ft/version_1", "val/loss")
    assert next(iter(imported.values())) == pytest.approx(next(iter(tuned.values())), abs=1e-4)
    main(["fit", *common, "trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.num_sanity_val_steps=0"])
    fresh = scalars(tmp_path / "runs/ft/version_2", "val/loss")  # without init_from: a random model
    assert abs(next(iter(fresh.values())) - next(iter(imported.values()))) > 1e-2  # 100x the tolerance above
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *common, f"model.init_from={ckpt}", "model.arch.num_experts=8", "trainer.max_steps=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model.init_from=" in err and "does not fit model.arch" in err and "other shape" in err


def test_import_refuses_other_architectures_with_one_message(tmp_path, capsys):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama/config.json").write_text(json.dumps({"model_type": "llama"}))
    for source, fragment in ((tmp_path / "llama", "model_type='llama'"), (tmp_path / "none", "has no config.json")):
        with pytest.raises(SystemExit) as exit_info:
            main(["import", str(source), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and fragment in err and err.startswith("rmoe: error: "), err
    assert not (tmp_path / "out").exists()
