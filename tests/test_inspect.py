"""``rmoe inspect`` (terminal report, HTML page in a real headless browser), the new ``rmoe analyze``
outputs (specialisation, co-activation, Closer-Look analyses, router saturation across a run's
checkpoints) and their live TensorBoard scalars, on one tiny run trained through the real CLI.

The browser test needs Debian's ``chromium`` (or ``chromium-browser`` / ``google-chrome``) and
skips cleanly without it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from tiny import BASE_CONFIGS, tiny_config, tiny_overrides

from rmoe.analyze import _saturation_checkpoints
from rmoe.cli import main
from rmoe.data.tokenizer import BpeTokenizer, ByteTokenizer, HfTokenizer
from rmoe.inspection import (
    byte_pieces,
    expert_summary,
    format_report,
    page_data,
    render_html,
    route_text,
    token_pieces,
)
from rmoe.model.decoder import MoeLM
from rmoe.routers.registry import ROUTERS
from rmoe.runs import read_scalars

TEXT = "def café(x):\n    return x + 1  # naïve\n"
CHECKPOINTS = (
    "{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_top_k: -1, "
    "every_n_train_steps: 2, filename: 'step-{step}', auto_insert_metric_name: false, save_last: true}}"
)
ANALYTICS = "{class_path: rmoe.training.analytics.RoutingAnalytics, init_args: {every_n_steps: 2, histograms: false}}"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("inspect")
    main(
        [
            "fit",
            *BASE_CONFIGS,
            *tiny_overrides(tmp),
            f"trainer.logger.init_args.save_dir={tmp / 'runs'}",
            "trainer.logger.init_args.name=tiny",
            "trainer.enable_progress_bar=false",
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
            "trainer.limit_val_batches=2",
            f"trainer.callbacks=[{CHECKPOINTS}, {ANALYTICS}]",
        ]
    )
    return tmp / "runs" / "tiny" / "version_0"


def rmoe(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``rmoe ...``; (exit code, stdout, stderr)."""
    code = 0
    try:
        main(list(args))
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------------------------
# Tokens shown readably


def test_byte_pieces_show_characters_escapes_and_stray_bytes():
    tok = ByteTokenizer()
    ids = [*tok.encode("a é\n\t"), 0x07, 0xFF, tok.eos_id]
    pieces = byte_pieces(ids, {tok.eos_id: "<eos>", tok.pad_id: "<pad>"})
    assert [p.label for p in pieces] == ["a", "␣", "é[1/2]", "é[2/2]", "\\n", "\\t", "<0x07>", "<0xFF>", "<eos>"]
    assert "".join(p.text for p in pieces[:6]) == "a é\n\t"  # the text reads as written
    assert pieces[3].text == ""  # a continuation byte adds nothing to the text


def test_bpe_pieces_decode_and_partial_characters_show_their_bytes(tmp_path):
    tok = BpeTokenizer.train(["hello world, hello there " * 20], vocab_size=270)
    ids = tok.encode("hello ☃")  # the snowman never merged: three byte tokens
    pieces = token_pieces(tok, ids)
    assert pieces[0].text == "hello"
    assert [p.text for p in pieces[-3:]] == ["<0xE2>", "<0x98>", "<0x83>"]
    assert token_pieces(tok, [tok.eos_id])[0].label == "<eos>"
    # the same vocabulary through transformers (a saved BPE is a transformers tokenizer directory)
    tok.save(tmp_path / "bpe")
    hf = HfTokenizer.load(str(tmp_path / "bpe"))
    assert [p.text for p in token_pieces(hf, hf.encode("hello ☃"))] == [p.text for p in pieces]


def test_every_registered_router_can_be_inspected():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    for name in sorted(ROUTERS):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the non-causal routers say so
            model = MoeLM(tiny_config(router=name, vocab_size=258)).eval()
        routing = route_text(model, tok, ids, context_length=16)
        summary = expert_summary(routing)
        for l, experts in enumerate(summary):
            assert sum(e["load"] for e in experts) == int(routing.keep_LTK[l].sum()), name
        assert len(page_data(routing, summary, title="t", meta="")["routes"][0]) == len(ids), name


# ----------------------------------------------------------------------------------------------
# Routing of a text, every router


@pytest.mark.parametrize(
    ("router", "options"),
    [("linear", {}), ("gru", {"state_dim": 8}), ("locmoe", {"capacity_factor": 0.5}), ("expert_choice", {})],
)
def test_route_text_and_report_for_every_router_kind(router, options):
    torch.manual_seed(0)
    model = MoeLM(tiny_config(router=router, router_options=options, vocab_size=258)).eval()
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    routing = route_text(model, tok, ids, context_length=16)  # three chunks
    T, L = len(ids), 3
    assert routing.expert_ids_LTK.shape[:2] == (L, T)
    with torch.no_grad():  # chunks of 16 routed alone, as the model routes them
        for start in range(0, T, 16):
            out = model(torch.tensor(ids[start : start + 16])[None])
            for l, r in enumerate(out.routing):
                assert torch.equal(routing.expert_ids_LTK[l, start : start + 16], r.expert_ids_TK)
    summary = expert_summary(routing)
    for l, experts in enumerate(summary):
        assert sum(e["load"] for e in experts) == int(routing.keep_LTK[l].sum())  # every kept pair, once
        for e in experts:
            assert sum(t["count"] for t in e["top"]) <= e["load"]
    report = format_report(routing, summary, table_tokens=T)
    top_LT = routing.top_expert_LT()
    if router == "locmoe":  # capacity 0.5 * T * K / E: some pairs dropped, shown as such
        assert (~routing.keep_LTK).any() and ":x" in report
    if router == "expert_choice":  # only the experts that took a token are listed
        assert all(all(kept for _, _, kept in routing.token_experts(0, t)) for t in range(T))
        assert ((top_LT == -1) == ~routing.keep_LTK.any(-1)).all()
    lines = [line for line in report.splitlines() if re.match(r"^\s+\d+\s+'", line)]
    assert len(lines) == T
    path = " → ".join("x" if e < 0 else str(int(e)) for e in top_LT[:, 5])
    assert lines[5].endswith(path)
    data = page_data(routing, summary, title="t", meta="m")
    assert data["top"] == top_LT.tolist() and len(data["routes"][0]) == T
    assert [p[0] for p in data["routes"][1][7]] == [e for e, _, _ in routing.token_experts(1, 7)]


# ----------------------------------------------------------------------------------------------
# The command


def test_inspect_prints_experts_tokens_and_the_per_token_table(run, capsys, tmp_path):
    ckpt = run / "checkpoints/last.ckpt"
    page = tmp_path / "page.html"
    code, out, err = rmoe(capsys, "inspect", "--ckpt", str(ckpt), "--text", TEXT, "--out", str(page), "--top", "3")
    assert code == 0, err
    T = len(TEXT.encode())
    assert f"{T} tokens of --text" in out and "router linear, 2 MoE layers, 4 experts, top-2" in out
    for l in range(2):
        assert f"== MoE layer {l} (decoder layer {l}) ==" in out
    loads = [int(n) for n in re.findall(r"^expert \d: (\d+) tokens", out, flags=re.M)]
    assert len(loads) == 8 and sum(loads[:4]) == sum(loads[4:]) == 2 * T  # top-2 of T tokens, per layer
    assert "'é[1/2]'" in out or "é[1/2]" in out
    assert re.search(r"^\s+0\s+'d'\s+\d:0\.\d\d \d:0\.\d\d", out, flags=re.M)
    html = page.read_text()
    assert "<script src" not in html and "http://" not in html and "https://" not in html  # self-contained
    data = json.loads(re.search(r'id="rmoe-data">(.*?)</script>', html, flags=re.S).group(1))
    assert "".join(t["t"] for t in data["tokens"]) == TEXT and len(data["routes"]) == 2
    # the first tokens of a data split
    code, out, err = rmoe(capsys, "inspect", "--ckpt", str(ckpt), "--split", "val", "--max-tokens", "50")
    assert code == 0, err
    assert "50 tokens of the first tokens of the val split" in out


def test_written_page_inlines_its_css_and_js(run, capsys, tmp_path):
    from importlib import resources

    page = tmp_path / "sub" / "page.html"  # the folder is created
    args = ["--ckpt", str(run / "checkpoints/last.ckpt"), "--text", "x = 1", "--table-tokens", "1"]
    code, _, err = rmoe(capsys, "inspect", *args, "--out", str(page))
    assert code == 0, err
    html = page.read_text(encoding="utf-8")
    assets = resources.files("rmoe.inspection")
    css, js = (assets.joinpath(name).read_text(encoding="utf-8") for name in ("page.css", "page.js"))
    assert f"<style>\n{css}</style>" in html and f"<script>\n{js}</script>" in html
    assert "{{" not in html.replace(js, "")  # every placeholder of page.html filled
    assert not re.search(r"<script[^>]*\ssrc=|<link[^>]*\srel=", html, flags=re.I)  # nothing to fetch


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--ckpt", "/no/such.ckpt", "--text", "x"], "--ckpt /no/such.ckpt: no such file or folder"),
        (["--ckpt", "{ckpt}", "--text", "   "], "is empty"),
        (["--ckpt", "{ckpt}", "--split", "dev"], "'dev' is not a split"),
        (["--ckpt", "{ckpt}", "--file", "/no/such.txt"], "no such file"),
        (["--ckpt", "{ckpt}", "--text", "x", "--layer", "5"], "MoE layers 0..1"),
        (["--ckpt", "{ckpt}"], "one of the arguments --text --file --split is required"),
        (["--ckpt", "{ckpt}", "--text", "x", "--max-tokens", "0"], "--max-tokens=0"),
    ],
)
def test_inspect_bad_input_is_one_paragraph_and_exit_2(run, capsys, args, fragment):
    args = [a.replace("{ckpt}", str(run / "checkpoints/last.ckpt")) for a in args]
    code, out, err = rmoe(capsys, "inspect", *args)
    assert code == 2 and err.startswith("rmoe: error: ") and fragment in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# The page in a real browser

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def headless(url: str, profile: Path, *extra: str) -> tuple[str, list[str]]:
    """Load ``url`` in headless Chromium: (the DOM after its scripts ran, its console messages)."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    result = subprocess.run([CHROMIUM, *flags, *extra, url], capture_output=True, text=True, timeout=120)
    return result.stdout, [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get install chromium)")
def test_page_in_headless_chromium_shows_tokens_and_experts(run, tmp_path):
    from rmoe.inference import load_model

    loaded = load_model(run / "checkpoints/last.ckpt")
    routing = route_text(loaded.model, loaded.tokenizer, loaded.tokenizer.encode(TEXT), loaded.context_length)
    summary = expert_summary(routing)
    page = tmp_path / "page.html"
    page.write_text(render_html(page_data(routing, summary, title="tiny </script> test", meta="m")), encoding="utf-8")

    # the checker sees errors: a page that throws is caught
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    _, console = headless(broken.as_uri(), tmp_path / "p0", "--dump-dom")
    assert any("Uncaught ReferenceError" in line for line in console)

    dom, console = headless(page.as_uri() + "#layer=1&token=3", tmp_path / "p1", "--dump-dom")
    assert console == []  # no error, no message at all
    assert 'data-status="ready"' in dom and 'data-errors="' not in dom
    spans = re.findall(r'<span class="tok[^"]*" data-t="(\d+)"[^>]*data-expert="(-?\d+)"', dom)
    assert [int(t) for t, _ in spans] == list(range(len(TEXT.encode())))
    assert [int(e) for _, e in spans] == routing.top_expert_LT()[1].tolist()  # coloured by layer 1
    pairs = ", ".join(f"e{e} {w:.2f}" for e, w, _ in routing.token_experts(1, 3))
    assert f'data-token="3" data-pairs="{pairs}"' in dom  # the pinned token's experts
    assert dom.count('<tr data-layer="') == 2 and dom.count('<tr data-expert="') == 4
    assert "path: e" in dom and "tiny &lt;/script&gt; test" in dom

    shot = tmp_path / "shot.png"
    headless(page.as_uri(), tmp_path / "p2", f"--screenshot={shot}", "--window-size=900,600", "--hide-scrollbars")
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 5000


# ----------------------------------------------------------------------------------------------
# rmoe analyze and the live analytics


def test_analyze_writes_the_expert_analyses_and_router_saturation(run, capsys, tmp_path):
    ckpt = run / "checkpoints/last.ckpt"
    code, out, err = rmoe(capsys, "analyze", "--ckpt", str(ckpt), "--out", str(tmp_path), "--max-batches", "2")
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    L, E = 2, 4
    assert len(metrics["vocab_specialization"]) == L and len(metrics["coactivation"][0]) == E
    assert all(0 < v <= 1 for v in metrics["vocab_specialization"])
    assert "label" in metrics["top_specialized"][0][0]
    # the live validation values (same checkpoint, same two validation batches) are the same numbers
    live = read_scalars(run, r"^moe/val/(vocab_specialization|coactivation_max)/layer_")
    for key in ("vocab_specialization", "coactivation_max"):
        for l in range(L):
            assert live[f"moe/val/{key}/layer_{l}"][-1][1] == pytest.approx(metrics[key][l], rel=1e-6)
    counts = torch.tensor(metrics["score_norm_rank_counts"])
    assert (counts.sum(dim=1) == counts.sum(dim=(1, 2))[:, None] / E).all()  # each rank once per token
    sat = metrics["router_saturation"]
    assert sat["steps"] == [2] and sat["final_step"] == 4 and sat["checkpoints"] == ["step-2.ckpt"]
    assert all(0 <= v <= 1 for v in sat["saturation"][0])
    for kind in (
        "coactivation",
        "score_norm_rank",
        "expert_output_similarity",
        "neuron_similarity",
        "router_saturation",
    ):
        assert (tmp_path / f"{kind}.png").read_bytes()[:4] == b"\x89PNG"
    # an explicit list; a checkpoint of the analysed step (or the same file) is not compared with it
    checkpoints = run / "checkpoints"
    explicit = [checkpoints / "step-4.ckpt", ckpt, checkpoints / "step-2.ckpt"]
    assert _saturation_checkpoints(ckpt, 4, explicit) == [(2, checkpoints / "step-2.ckpt")]
    assert _saturation_checkpoints(ckpt, 4, False) == []
    code, _, err = rmoe(capsys, "analyze", "--ckpt", str(ckpt), "--saturation-ckpt", "/no/such.ckpt")
    assert code == 2 and "--saturation-ckpt /no/such.ckpt: no such file" in err


def test_live_analytics_log_specialization_and_coactivation(run):
    scalars = read_scalars(run, r"^moe/(train|val)/(vocab_specialization|coactivation_max)/")
    for split, steps in (("train", [0, 2]), ("val", [3])):
        for key in ("vocab_specialization", "coactivation_max"):
            for suffix in ("layer_0", "layer_1", "mean"):
                points = scalars[f"moe/{split}/{key}/{suffix}"]
                assert [s for s, _ in points] == steps and all(0 <= v <= 1 for _, v in points)
