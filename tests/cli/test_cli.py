"""The ``umarvel`` console script: encode and demo end to end, clear errors on bad input."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import numpy as np
from helpers import REPO

from umarvel.cli import main


def test_encode_command_writes_vectors_and_ids(tiny_checkpoint, sample_images, tmp_path):
    from umarvel import UMarvel

    items = tmp_path / "items.jsonl"
    rel = tmp_path / "imgs"
    rel.mkdir()
    (rel / "red.png").write_bytes(sample_images["red"].read_bytes())
    items.write_text("\n".join(json.dumps(x) for x in [
        {"id": "q1", "text": "a red ball", "instruction": "Find an image."},
        {"id": "q2", "image": "imgs/red.png", "instruction": "Find a caption."}]) + "\n")
    out = tmp_path / "emb.npy"
    assert main(["encode", "--model", str(tiny_checkpoint), "--input", str(items), "--output", str(out),
                 "--queries", "--batch-size", "1"]) == 0
    emb = np.load(out)
    assert json.loads((tmp_path / "emb.npy.ids.json").read_text()) == ["q1", "q2"]
    ref = UMarvel.from_pretrained(tiny_checkpoint).encode_queries([
        {"text": "a red ball", "instruction": "Find an image."},
        {"image": str(rel / "red.png"), "instruction": "Find a caption."}])
    np.testing.assert_allclose(emb, ref, atol=1e-6)


def test_encode_command_compat_official_is_recorded(tiny_checkpoint, tmp_path):
    """--compat official: batch of one unpadded -> causal vectors, labelled in <output>.meta.json."""
    from umarvel import UMarvel

    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps({"text": t}) for t in ("a red ball", "two dogs on a long beach")) + "\n")
    out = {}
    for compat in ("default", "official"):
        path = tmp_path / f"{compat}.npy"
        assert main(["encode", "--model", str(tiny_checkpoint), "--input", str(items), "--output", str(path),
                     "--batch-size", "1", "--compat", compat]) == 0
        meta = json.loads((tmp_path / f"{compat}.npy.meta.json").read_text())
        assert meta["compat"] == meta["settings"]["compat"] == compat and meta["n"] == 2
        out[compat] = np.load(path)
    ref = UMarvel.from_pretrained(tiny_checkpoint, compat="official").encode_candidates(
        [{"text": "a red ball"}, {"text": "two dogs on a long beach"}], batch_size=1)
    np.testing.assert_allclose(out["official"], ref, atol=1e-6)
    assert np.abs(out["official"] - out["default"]).max() > 1e-3  # causal vs bidirectional


def test_eval_commands_take_compat(tmp_path):
    import argparse

    from umarvel.commands.eval import add_mbeir_arguments
    from umarvel.commands.flags import config_from_flags
    from umarvel.eval.mbeir.config import MBeirEvalConfig
    from umarvel.commands.eval_plus import configure
    from umarvel.commands.eval_zeroshot import add_arguments

    p = argparse.ArgumentParser()
    add_mbeir_arguments(p)
    args = p.parse_args(["--model", "m", "--mbeir-root", "r", "--output", "o", "--compat", "official"])
    assert config_from_flags(args, MBeirEvalConfig).compat == "official"
    default = config_from_flags(p.parse_args(["--model", "m", "--mbeir-root", "r", "--output", "o"]), MBeirEvalConfig)
    assert default.compat == "default"
    cfg = tmp_path / "e.yaml"
    cfg.write_text("model: m\nmbeir_root: r\noutput: o\ncompat: official\n")
    assert config_from_flags(p.parse_args(["--config", str(cfg)]), MBeirEvalConfig).compat == "official"
    z = argparse.ArgumentParser()
    add_arguments(z)
    assert z.parse_args(["--model", "m", "--data-root", "d", "--output-dir", "o", "--compat", "official"]).compat == "official"
    e = argparse.ArgumentParser()
    configure(e)
    assert e.parse_args(["--run", "r", "--reranker", "x", "--output", "o", "--compat", "official"]).compat == "official"


def test_encode_command_reports_bad_line(tiny_checkpoint, tmp_path, capsys):
    items = tmp_path / "bad.jsonl"
    items.write_text('{"text": "ok"}\n{"text": broken\n')
    rc = main(["encode", "--model", str(tiny_checkpoint), "--input", str(items), "--output", str(tmp_path / "e.npy")])
    assert rc == 2  # a user error: one log line, exit code 2, nothing written
    assert not (tmp_path / "e.npy").exists()
    assert f"umarvel: error: {items}:2: malformed JSON line" in capsys.readouterr().err


def test_demo_model_prints_recall_tables(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--model", str(tiny_checkpoint), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Recall@5 (local pools, test split" in printed and "Recall@5 (global pool, test split" in printed
    assert "txt>img" in printed and "img+edit>img" in printed and "chance (random ranking)" in printed
    results = json.loads((out / "results.json").read_text())
    row = results["stages"][0]
    assert row["local"]["protocol"] == "local" and row["global"]["protocol"] == "global"
    assert np.isfinite(row["local"]["average"]) and 0.0 <= row["global"]["average"] <= 100.0


# ------------------------------------------------------------------------------- the command table
def _python(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_python_m_umarvel_runs_the_cli():
    proc = _python("-m", "umarvel", "--help")
    assert proc.returncode == 0, proc.stderr
    for name in ("demo", "encode", "train", "merge-lora", "eval", "mine", "teacher", "rerank"):
        assert f"    {name} " in proc.stdout
    bad = _python("-m", "umarvel", "eval", "mbeir", "--model", "m")
    assert bad.returncode == 2 and "--mbeir-root, --output required" in bad.stderr


def test_parser_builds_without_torch():
    """``umarvel --help`` imports every command module and builds every parser, but never torch."""
    code = ("import sys; from umarvel.cli import build_parser; build_parser().format_help(); "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'faiss') if m in sys.modules]; "
            "assert not heavy, heavy")
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr


def test_every_command_is_in_the_table_and_commands_never_import_cli():
    from umarvel import cli

    modules = {p.stem for p in (REPO / "umarvel" / "commands").glob("*.py")} - {"__init__", "flags"}
    eval_group = {"eval_zeroshot", "eval_plus"}  # registered by umarvel.commands.eval
    assert {m.__name__.rsplit(".", 1)[1] for m in cli.COMMANDS} == modules - eval_group
    for path in (REPO / "umarvel" / "commands").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "umarvel.cli" not in imported, path
