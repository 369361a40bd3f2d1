"""``rmoe export``: a checkpoint to a directory that transformers loads with ``from_pretrained``.

``rmoe export --ckpt runs/base/version_0/checkpoints/last.ckpt --out exported/base [--push-to-hub user/name]``

Always written: ``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer's files and
``README.md`` (a model card with the training config and results). By router:

* ``linear`` (no options): a native ``Qwen2MoeForCausalLM`` (``Qwen3MoeForCausalLM`` with ``qk_norm``).
* every other causal router: ``modeling_rmoe.py`` / ``configuration_rmoe.py`` with an ``auto_map``
  (``trust_remote_code=True``) next to rmoe's own model sources, copied as flat ``rmoe_*.py`` modules with
  relative imports (:func:`bundle_sources`): loading needs no rmoe and computes exactly what rmoe computes.
* non-causal routers (expert choice, LocMoE with drops) are refused: their training forward routes each
  token using later tokens, which no decoder can reproduce token by token.

Both keep our metadata (the full ``ModelConfig``, the trained context) under ``config.json["rmoe"]``, from
which ``rmoe generate`` loads an export back.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import pkgutil
import shutil
from pathlib import Path
from typing import Any

from rmoe.checkpoints import check_can_create, describe_os_error, weights_digests
from rmoe.data.tokenizer import EOS_TOKEN, PAD_TOKEN, Tokenizer
from rmoe.errors import RmoeError, ToolArgumentParser
from rmoe.inference import EXPORT_KEY, LoadedModel, export_metadata, load_model, non_causal_reason
from rmoe.interop.qwen2_moe import native_model_type, to_hf_model

REMOTE_CODE_DIR = Path(__file__).with_name("remote_code")
NATIVE_CLASSES = {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
BUNDLE_ROOTS = ("rmoe.model.decoder",)
"""The modules the remote code imports; everything they import from rmoe is bundled with them."""


def bundle_module_name(module: str) -> str:
    """``rmoe.routers.base`` -> ``rmoe_routers_base`` (the flat file name in the export)."""
    return module.replace(".", "_")


def _module_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"cannot find the source of {module}")
    return Path(spec.origin)


def _rewrite(module: str, source: str) -> tuple[str, set[str]]:
    """``(source, needed)``: ``source`` with every ``from rmoe... import`` made relative to the flat bundle,
    and the rmoe modules it needs. ``from pkg import submodule`` (a registration import) becomes
    ``from .pkg_submodule import __name__ as _pkg_submodule``.
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits: list[tuple[int, int, str]] = []
    needed: set[str] = set()
    for node in ast.walk(tree):
        if _is_discovery(node):  # the package imports all its modules at run time: list them in the flat copy
            indent = " " * node.col_offset
            submodules = [f"{module}.{info.name}" for info in pkgutil.iter_modules([str(_module_file(module).parent)])]
            submodules = sorted(m for m in submodules if not m.rpartition(".")[2].startswith("_"))
            needed.update(submodules)
            text = "".join(
                f"{indent}from .{bundle_module_name(m)} import __name__ as _{bundle_module_name(m)}  # registers\n"
                for m in submodules
            )
            edits.append((node.lineno - 1, node.end_lineno, text))
            continue
        if isinstance(node, ast.Import) and any(a.name == "rmoe" or a.name.startswith("rmoe.") for a in node.names):
            raise RuntimeError(f"{module}: `import rmoe...` cannot be bundled; use `from rmoe... import`")
        if not isinstance(node, ast.ImportFrom) or node.level or not (node.module or "").startswith("rmoe"):
            continue
        if node.module == "rmoe":
            raise RuntimeError(f"{module}: `from rmoe import ...` cannot be bundled; import from the defining module")
        indent = " " * node.col_offset
        new_lines, plain = [], []
        for alias in node.names:
            submodule = f"{node.module}.{alias.name}"
            if _module_file(node.module).name == "__init__.py" and importlib.util.find_spec(submodule) is not None:
                needed.add(submodule)
                flat = bundle_module_name(submodule)
                new_lines.append(f"{indent}from .{flat} import __name__ as _{flat}  # registers\n")
            else:
                plain.append(alias.name if alias.asname is None else f"{alias.name} as {alias.asname}")
        if plain:
            needed.add(node.module)
            new_lines.insert(0, f"{indent}from .{bundle_module_name(node.module)} import {', '.join(plain)}\n")
        edits.append((node.lineno - 1, node.end_lineno, "".join(new_lines)))
    for start, end, text in sorted(edits, reverse=True):
        lines[start:end] = [text]
    return "".join(lines), needed


def _is_discovery(node: ast.AST) -> bool:
    """``discover_routers(__name__, __path__)``: a package importing every module of itself."""
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id == "discover_routers"
    )


def bundle_sources(roots: tuple[str, ...] = BUNDLE_ROOTS) -> dict[str, str]:
    """Flat file name -> rewritten source of every rmoe module the roots need (transitively)."""
    files: dict[str, str] = {}
    todo = list(roots)
    while todo:
        module = todo.pop()
        name = bundle_module_name(module) + ".py"
        if name in files:
            continue
        origin = _module_file(module).relative_to(_module_file("rmoe").parent.parent)
        header = f"# Copied from {module} ({origin}) by rmoe export; imports made relative.\n"
        source, needed = _rewrite(module, _module_file(module).read_text(encoding="utf-8"))
        files[name] = header + source
        todo.extend(sorted(needed))
    return files


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the alphabet of the ByteLevel pre-tokenizer."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer_fast(tokenizer: Tokenizer) -> Any:
    """rmoe's byte tokenizer (byte b -> id b, ``<eos>`` 256, ``<pad>`` 257) as a ``PreTrainedTokenizerFast``:
    a ByteLevel BPE without merges over the 256 byte symbols."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: b for b, char in bytes_to_unicode().items()}
    vocab[EOS_TOKEN], vocab[PAD_TOKEN] = tokenizer.eos_id, tokenizer.pad_id
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS_TOKEN, PAD_TOKEN])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """The tokenizer as transformers files plus rmoe's meta file.

    It pads on the left: a decoder continues the end of each prompt, so transformers' default (right)
    would make batched ``generate`` wrong.
    """
    if tokenizer.kind == "byte":
        byte_tokenizer_fast(tokenizer).save_pretrained(str(out))
    tokenizer.save(out)  # bpe and hf write transformers files themselves; every kind writes rmoe_tokenizer.json
    config_path = out / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["padding_side"] = "left"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_model(
    model_path: str | Path, out: str | Path, *, tokenizer: str | None = None, overwrite: bool = False
) -> tuple[Path, str]:
    """Export a checkpoint (or an export directory) to ``out``; returns ``(out, kind)``, kind ``"qwen2_moe"``,
    ``"qwen3_moe"`` (native) or ``"remote_code"``.

    Raises:
        RmoeError: Non-causal router, a non-empty ``out`` (without ``overwrite``), what ``load_model`` refuses.
    """
    out = Path(out)
    replaced = _files_to_replace(out, Path(model_path), overwrite)
    check_can_create(out, "--out")
    loaded = load_model(model_path, tokenizer=tokenizer)
    config = loaded.model.config
    reason = non_causal_reason(config)
    if reason:
        raise RmoeError(
            f"cannot export {model_path}: {reason}. transformers decodes token by token, so the exported "
            "model would not compute what was trained."
        )
    created = not out.exists()
    try:
        _remove_export(out, replaced)
        out.mkdir(parents=True, exist_ok=True)
        kind = _write_export(loaded, out)
    except OSError as err:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise RmoeError(f"--out: {describe_os_error(err, out, 'write the export to')}") from None
    return out, kind


def _write_export(loaded: LoadedModel, out: Path) -> str:
    """Write the export into the existing, empty folder ``out``; returns its kind."""
    config = loaded.model.config
    tok = loaded.tokenizer
    meta = export_metadata(config, loaded.context_length, tok)
    special = dict(eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, bos_token_id=None)
    context = {"max_position_embeddings": loaded.context_length} if loaded.context_length else {}
    kind = native_model_type(config)
    if kind is not None:
        hf = to_hf_model(loaded.model, **special, **context, **{EXPORT_KEY: meta})
        hf.save_pretrained(str(out))
    else:
        kind = "remote_code"
        _write_remote_code(loaded, out, meta, special)
    _write_generation_config(out, tok, config.vocab_size)
    save_tokenizer(tok, out)
    (out / "README.md").write_text(model_card(loaded, kind), encoding="utf-8")
    # what --overwrite may delete later, and the weights' digests that loading checks
    hf_config = json.loads((out / "config.json").read_text())
    hf_config[EXPORT_KEY]["weights_sha256"] = weights_digests(out)
    hf_config[EXPORT_KEY]["files"] = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    return kind


def _files_to_replace(out: Path, source: Path, overwrite: bool) -> list[Path]:
    """The files of an earlier export in ``out`` that ``--overwrite`` replaces ([] for a new or empty ``out``).

    Only the files ``rmoe export`` recorded in ``config.json`` are deleted: a folder holding anything else is refused.
    """
    if out.exists() and not out.is_dir():
        raise RmoeError(f"--out {out} is an existing file; expected a directory (new or empty) for the export.")
    if not out.exists() or not any(out.iterdir()):
        return []
    if not overwrite:
        raise RmoeError(f"--out {out} exists and is not empty; choose a new directory or pass --overwrite.")
    if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
        raise RmoeError(f"--out {out} holds the model being exported ({source}); --overwrite would delete it.")
    meta = None
    try:
        meta = json.loads((out / "config.json").read_text()).get(EXPORT_KEY)
    except (OSError, ValueError, AttributeError):
        pass
    recorded = set(meta.get("files") or []) if isinstance(meta, dict) else set()
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() or p.is_symlink()}
    foreign = sorted(present - recorded)
    if not recorded or foreign:
        raise RmoeError(
            f"--out {out} holds files that rmoe export did not write there ({', '.join(foreign[:4])}"
            f"{' ...' if len(foreign) > 4 else ''}); --overwrite only replaces an earlier export. Choose a new "
            "directory, or delete the folder yourself if it is yours to delete."
        )
    return [out / name for name in sorted(present)]


def _remove_export(out: Path, files: list[Path]) -> None:
    """Delete the files of an earlier export and the folders they leave empty (never ``out`` itself)."""
    for file in files:
        file.unlink()
    for folder in sorted({p.parent for p in files}, key=lambda p: len(p.parts), reverse=True):
        if folder != out and not any(folder.iterdir()):
            folder.rmdir()


def _write_remote_code(loaded: LoadedModel, out: Path, meta: dict[str, Any], special: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    config = loaded.model.config
    for name in ("configuration_rmoe.py", "modeling_rmoe.py"):
        shutil.copyfile(REMOTE_CODE_DIR / name, out / name)
    for name, source in bundle_sources().items():
        (out / name).write_text(source, encoding="utf-8")
    hf_config = {
        "architectures": ["RmoeForCausalLM"],
        "model_type": "rmoe_moe",
        "auto_map": {
            "AutoConfig": "configuration_rmoe.RmoeConfig",
            "AutoModelForCausalLM": "modeling_rmoe.RmoeForCausalLM",
        },
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        **special,
        EXPORT_KEY: meta,
    }
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    state = {f"model.{k}": v.detach().contiguous() for k, v in loaded.model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("model.lm_head.weight")  # tied: transformers re-ties it from _tied_weights_keys
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def _write_generation_config(out: Path, tok: Tokenizer, model_vocab_size: int) -> None:
    """As ``rmoe generate``: greedy, stops at ``<eos>``, never emits the ids the tokenizer lacks."""
    from transformers import GenerationConfig

    unused = list(range(tok.vocab_size, model_vocab_size))
    GenerationConfig(
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        do_sample=False,
        suppress_tokens=unused or None,
    ).save_pretrained(str(out))


def _training_results(source: Path) -> dict[str, float]:
    """Final ``val/*`` and ``test/*`` loss/bpb/ppl of the checkpoint's run, if any."""
    from rmoe.runs import EVENTS_GLOB, read_scalars, run_dir_of_checkpoint

    run_dir = run_dir_of_checkpoint(source)
    if not source.is_file() or not any(run_dir.glob(EVENTS_GLOB)):
        return {}
    series = read_scalars(run_dir, pattern=r"^(val|test)/(loss|bpb|ppl)$")
    return {tag: points[-1][1] for tag, points in series.items() if points}


def model_card(loaded: LoadedModel, kind: str) -> str:
    """README.md of the export: architecture, how to load, training config and results."""
    model, config = loaded.model, loaded.model.config
    total = model.num_parameters()
    active = model.num_parameters(active=True)
    remote = kind == "remote_code"
    load_args = ", trust_remote_code=True" if remote else ""
    lines = [
        "---",
        "library_name: transformers",
        "tags: [mixture-of-experts, rmoe" + (", custom_code" if remote else "") + "]",
        "---",
        "",
        f"# rmoe model: router `{config.router}`",
        "",
        f"Decoder-only Mixture-of-Experts LM trained with [rmoe](https://arxiv.org/abs/2408.06793) "
        f"({'Qwen3-MoE' if config.qk_norm else 'Qwen2-MoE'} architecture). {config.num_layers} layers, "
        f"width {config.hidden_size}, {config.num_experts} experts of {config.moe_intermediate_size}, "
        f"top-{config.top_k}, "
        f"router `{config.router}` {json.dumps(config.router_options) if config.router_options else ''}; "
        f"{total:,} parameters ({active:,} active per token). Trained context: "
        f"{loaded.context_length or 'unknown'} tokens; tokenizer: {loaded.tokenizer.kind} "
        f"({loaded.tokenizer.vocab_size} ids).",
        "",
        (
            f"This directory is a native transformers `{NATIVE_CLASSES.get(kind)}` (no custom code)."
            if not remote
            else "The router has no transformers counterpart, so the model code is included (`modeling_rmoe.py` and "
            "rmoe's own `rmoe_*.py` sources, imports made relative): load it with `trust_remote_code=True`; "
            "it needs torch and transformers, not rmoe."
        ),
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("PATH"{load_args})',
        f'tokenizer = AutoTokenizer.from_pretrained("PATH"{load_args})',
        'ids = tokenizer(["The ", "Once upon a"], return_tensors="pt", padding=True, padding_side="left")',
        "print(tokenizer.batch_decode(model.generate(**ids, max_new_tokens=50), skip_special_tokens=True))",
        "```",
        "",
        'or `rmoe generate --ckpt PATH "The "`. `generation_config.json` is greedy, stops at `<eos>` and '
        "suppresses the ids the tokenizer does not have (the vocabulary is padded to a multiple of 64), as "
        "`rmoe generate` does.",
        "",
    ]
    results = _training_results(loaded.source)
    if results:
        lines += ["## Results", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {tag} | {value:.4f} |" for tag, value in sorted(results.items())]
        lines += [""]
    lines += ["## Training configuration", ""]
    if loaded.hparams:
        step = loaded.hparams.get("global_step")
        lines += [f"Checkpoint at optimiser step {step}." if step is not None else "", "", "```json"]
        lines += [json.dumps({k: v for k, v in loaded.hparams.items() if k != "global_step"}, indent=2, default=str)]
    else:
        lines += [
            "Model architecture (`ModelConfig`):",
            "",
            "```json",
            json.dumps(dataclasses.asdict(config), indent=2),
        ]
    lines += ["```", ""]
    return "\n".join(lines)


def push_to_hub(out: Path, repo_id: str, private: bool = False) -> str:
    """Upload the export directory to the Hugging Face Hub (needs network and a token: ``hf auth login``)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=str(out), repo_id=repo_id, repo_type="model", commit_message="rmoe export")
    return str(getattr(commit, "commit_url", repo_id))


def build_parser() -> argparse.ArgumentParser:
    p = ToolArgumentParser(prog="rmoe export", description="Export a checkpoint to a transformers directory.")
    p.add_argument(
        "--ckpt", required=True, help="the model: a checkpoint (<run>/checkpoints/*.ckpt) or an export directory."
    )
    p.add_argument("--out", required=True, help="output directory (new or empty).")
    p.add_argument("--tokenizer", help="override the tokenizer (default: the run's).")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory.")
    p.add_argument("--push-to-hub", metavar="REPO", help="then upload the directory to this Hub repository.")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private.")
    return p


def main(argv: list[str]) -> None:
    """``rmoe export --ckpt MODEL --out DIR [--push-to-hub REPO]``; RmoeError for bad input (exit 2 in ``rmoe``)."""
    args = build_parser().parse_args(argv)
    out, kind = export_model(args.ckpt, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite)
    how = "native transformers model" if kind != "remote_code" else "custom code, load with trust_remote_code=True"
    print(f"rmoe export: wrote {out} ({kind}: {how})")
    if args.push_to_hub:
        print(f"rmoe export: pushed to {push_to_hub(out, args.push_to_hub, private=args.private)}")
