"""Generation: the KV cache equals the full forward for every causal router, left padding, sampling
filters against transformers', and `rmoe generate` through the real command (output and bad input)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import BASE_CONFIGS, tiny_config, tiny_overrides

from rmoe import MoeLM
from rmoe.cli import main
from rmoe.generate import SamplingConfig, filter_logits, generate, left_pad
from rmoe.inference import non_causal_reason
from rmoe.model.decoder import KVCache
from rmoe.routers import ROUTERS

VARIANTS = {  # case -> (router, options): the option sets that change what a router computes
    "linear": ("linear", {}),
    "linear_bias_balance": ("linear", {"bias_update_rate": 0.01}),
    "gru": ("gru", {"state_dim": 8}),
    "gru_lstm_ralpha": ("gru", {"state_dim": 8, "cell": "lstm", "residual_alpha": 0.5}),
    "gru_rnn_shared_np": ("gru", {"state_dim": 8, "cell": "rnn", "projector": "shared", "pass_state": False}),
    "gru_cosine_head_detach": ("gru", {"state_dim": 8, "head": "cosine", "detach_state": True}),
    "mlp": ("mlp", {"hidden_dim": 8}),
    "hyper": ("hyper", {"embedding_dim": 4, "hypernet_hidden_dim": 8}),
    "locmoe": ("locmoe", {"capacity_factor": 2.0}),  # E / K = 2: no token is ever dropped
    "locmoe_eval_topk": ("locmoe", {"eval_routing": "topk"}),  # drops in training only
}
if "sinkhorn_token_choice" in ROUTERS:  # balanced by a transport plan in training, plain top-k in evaluation
    VARIANTS["sinkhorn_token_choice_eval_topk"] = ("sinkhorn_token_choice", {"eval_routing": "topk"})
CAUSAL_ROUTERS = {
    **VARIANTS,  # and every other registered router that is causal in evaluation, with its defaults
    **{
        name: (name, {})
        for name in sorted(ROUTERS)
        if name not in VARIANTS and tiny_config(router=name).causality().evaluation is None
    },
}


def test_every_registered_router_is_covered_or_refused():
    covered = {router for router, _ in CAUSAL_ROUTERS.values()}
    refused = [name for name in ROUTERS if name not in covered]
    for name in refused:
        assert non_causal_reason(tiny_config(router=name)) is not None, name
    assert "expert_choice" in refused and "gru" in covered
    assert non_causal_reason(tiny_config(router="locmoe")) is not None  # default capacity 1.25 drops tokens
    assert non_causal_reason(tiny_config(router="locmoe", router_options={"capacity_factor": 2.0})) is None
    assert non_causal_reason(tiny_config(router="locmoe", router_options={"eval_routing": "topk"})) is None


def _randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))


@pytest.mark.parametrize("case", sorted(CAUSAL_ROUTERS))
def test_cached_decoding_equals_full_forward_at_every_position(case):
    """Prompt of 5 (left-padded rows), then 7 single-token steps with the cache: the logits at every
    position equal the full forward of each row alone, and the routing of the new tokens too."""
    torch.manual_seed(0)
    router, options = CAUSAL_ROUTERS[case]
    config = tiny_config(router=router, router_options=options, qk_norm=case == "linear")
    assert non_causal_reason(config) is None
    model = MoeLM(config).eval()
    _randomize(model)
    rows = [torch.randint(0, 97, (12,)), torch.randint(0, 97, (9,))]  # the second one left-padded by 3
    ids_BS, mask_BS = left_pad([r.tolist() for r in rows], pad_id=0)
    with torch.no_grad():
        full = [model(r[None]) for r in rows]
        cache = KVCache()
        steps = [model(ids_BS[:, :5], attention_mask_BK=mask_BS[:, :5], cache=cache)]
        for t in range(5, 12):
            steps.append(model(ids_BS[:, t : t + 1], attention_mask_BK=mask_BS[:, : t + 1], cache=cache))
    cached_BSV = torch.cat([s.logits for s in steps], dim=1)
    assert cache.get_seq_length() == 12
    for b, (row, ref) in enumerate(zip(rows, full)):
        pad = 12 - len(row)
        torch.testing.assert_close(cached_BSV[b, pad:], ref.logits[0], atol=1e-5, rtol=0)
        last_step = steps[-1].routing  # the last token's experts in every MoE layer
        for mine, theirs in zip(last_step, ref.routing):
            K = theirs.expert_ids_TK.shape[-1]
            assert torch.equal(mine.expert_ids_TK.view(2, K)[b], theirs.expert_ids_TK[-1]), (case, b)


def test_batched_left_padded_generation_equals_each_prompt_alone_with_and_without_cache():
    torch.manual_seed(1)
    model = MoeLM(tiny_config(router="gru", router_options={"state_dim": 8})).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42]]
    greedy = SamplingConfig(max_new_tokens=9, stop_at_eos=False)
    batched = generate(model, prompts, greedy, eos_id=1, pad_id=0)
    uncached = generate(
        model, prompts, SamplingConfig(max_new_tokens=9, stop_at_eos=False, use_cache=False), eos_id=1, pad_id=0
    )
    alone = [generate(model, [p], greedy, eos_id=1, pad_id=0)[0] for p in prompts]
    assert [g.new_ids for g in batched] == [g.new_ids for g in alone] == [g.new_ids for g in uncached]
    assert all(len(g.new_ids) == 9 for g in batched)


def test_stop_at_eos_and_seeded_sampling():
    torch.manual_seed(2)
    model = MoeLM(tiny_config()).eval()
    prompts = [[5, 6, 7], [8]]
    first = generate(model, prompts, SamplingConfig(max_new_tokens=6, stop_at_eos=False), eos_id=1, pad_id=0)
    eos = first[0].new_ids[2]  # pretend the third greedy token of row 0 is <eos>
    stopped = generate(model, prompts, SamplingConfig(max_new_tokens=6), eos_id=eos, pad_id=0)
    assert stopped[0].new_ids == first[0].new_ids[: first[0].new_ids.index(eos) + 1]
    hot = SamplingConfig(max_new_tokens=8, temperature=1.5, top_k=20, top_p=0.9, seed=7, stop_at_eos=False)
    a, b = (generate(model, prompts, hot, eos_id=1, pad_id=0) for _ in range(2))
    assert [g.new_ids for g in a] == [g.new_ids for g in b]
    other = generate(model, prompts, SamplingConfig(**{**hot.__dict__, "seed": 8}), eos_id=1, pad_id=0)
    assert [g.new_ids for g in other] != [g.new_ids for g in a]
    masked = generate(
        model, prompts, SamplingConfig(max_new_tokens=8, temperature=3.0, seed=0), eos_id=1, pad_id=0, num_valid_ids=10
    )
    assert all(t < 10 for g in masked for t in g.new_ids)


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.8), (7, 0.5), (0, 0.01)])
def test_filters_equal_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(3)
    logits_BV = torch.randn(4, 50) * 3
    expected = logits_BV
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    assert torch.equal(filter_logits(logits_BV, top_k, top_p).isinf(), expected.isinf())


# ------------------------------------------------------------------------------------------------
# the `rmoe generate` command


def _fit(tmp_path: Path, *overrides: str) -> Path:
    """A 2-step tiny run through `rmoe fit`; returns its last checkpoint."""
    main(
        [
            "fit",
            *BASE_CONFIGS,
            *tiny_overrides(tmp_path),
            "trainer.max_steps=2",
            "trainer.limit_val_batches=0",
            f"trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            "trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
            "init_args: {save_last: true}}, {class_path: rmoe.training.callbacks.SaveTokenizer}]",
            *overrides,
        ]
    )
    return next((tmp_path / "runs").rglob("last.ckpt"))


@pytest.fixture(scope="module")
def gru_ckpt(tmp_path_factory) -> Path:
    return _fit(tmp_path_factory.mktemp("gen"), "model.arch.router=gru", "model.arch.router_options={state_dim: 8}")


def checkpoint_with(template: Path, out: Path, router: str = "linear", seed: int = 0, **arch) -> Path:
    """``template`` with another architecture and random, decisive weights (Normal(0, 0.2) matrices,
    norms around 1), so logits and greedy tokens differ from position to position."""
    from rmoe import ModelConfig, MoeLM

    checkpoint = torch.load(template, weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    hparams["arch"] = {**hparams["arch"], "router": router, **arch}
    torch.manual_seed(seed)
    model = MoeLM(ModelConfig(**{**hparams["arch"], "initializer_range": 0.2}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    checkpoint["state_dict"] = {f"model.{k}": v for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    return out


def test_non_causal_routers_are_refused_by_generate(gru_ckpt, tmp_path, capsys):
    ckpt = checkpoint_with(gru_ckpt, tmp_path / "ec.ckpt", router="expert_choice", router_options={})
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--ckpt", str(ckpt), "The"])
    assert exit_info.value.code == 2
    assert "is not causal in evaluation" in capsys.readouterr().err


def test_rmoe_generate_streams_text_and_shows_routing(gru_ckpt, capsys):
    main(["generate", "--ckpt", str(gru_ckpt), "The quick", "--max-new-tokens", "6", "--no-stop", "--show-routing"])
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith("The quick") and len(lines[0].encode()) >= len("The quick")
    routing = [line for line in lines if " L0[" in line]
    assert len(routing) == 6 and all(" L1[" in line for line in routing)  # 6 tokens x 2 MoE layers
    assert "tokens/s" in out.err

    main(["generate", "--ckpt", str(gru_ckpt), "The quick", "--max-new-tokens", "6", "--no-stop", "--no-cache"])
    assert capsys.readouterr().out.splitlines()[0] == lines[0]  # the cache changes nothing
    main(["generate", "--ckpt", str(gru_ckpt), "The quick", "Pack my", "--max-new-tokens", "6", "--no-stop"])
    batched = capsys.readouterr().out
    assert "=== prompt 0 ===\n" + lines[0] + "\n" in batched and "=== prompt 1 ===\nPack my" in batched


def test_rmoe_generate_caps_new_tokens_at_the_trained_context(gru_ckpt, capsys):
    with pytest.warns(UserWarning, match="lowered to 2"):  # block_size 32, prompt of 30 bytes
        main(["generate", "--ckpt", str(gru_ckpt), "x" * 30, "--max-new-tokens", "9", "--no-stop", "--show-routing"])
    assert len([line for line in capsys.readouterr().out.splitlines() if " L0[" in line]) == 2


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d, ck: ["--ckpt", str(ck), "y" * 40], "longer than the model's trained context of 32 tokens"),
        (lambda d, ck: ["--ckpt", str(ck), "hi", "--tokenizer", str(d / "no-such-tokenizer")], "unknown tokenizer"),
        (lambda d, ck: ["--ckpt", str(d), "hi"], "is not an rmoe export directory"),
        (lambda d, ck: ["--ckpt", str(_other_arch(d, ck)), "hi"], "another architecture"),
        (lambda d, ck: ["--ckpt", str(_not_a_checkpoint(d)), "hi"], "is not a checkpoint: it is a text file"),
        (lambda d, ck: ["--ckpt", str(ck), "hi", "--top-p", "0"], "--top-p=0.0 must be in (0, 1]"),
    ],
    ids=["prompt-too-long", "unknown-tokenizer", "not-an-export", "other-architecture", "not-a-checkpoint", "top-p"],
)
def test_rmoe_generate_bad_input_is_one_paragraph_and_exit_2(make, fragment, gru_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *make(tmp_path, gru_ckpt)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("rmoe: error: ") and fragment in err and len(err.strip().splitlines()) == 1, err


def _other_arch(directory: Path, ckpt: Path) -> Path:
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["arch"]["sliding_window"] = 128
    torch.save(checkpoint, directory / "other.ckpt")
    return directory / "other.ckpt"


def _not_a_checkpoint(directory: Path) -> Path:
    (directory / "model.ckpt").write_text("not a checkpoint")
    return directory / "model.ckpt"
