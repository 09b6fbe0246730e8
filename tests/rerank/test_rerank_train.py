"""Reranker training and scoring on tiny random models: toy loss decrease, data reader, CLI train/resume/score/fuse."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import Killed, StopAfter

from umarvel.rerank.prompts import RerankPair, RerankSide

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_rerank_ckpt(tmp_path_factory) -> Path:
    from umarvel.model.tiny import save_tiny_checkpoint

    # a larger init scale than the default 0.02: with frozen tied embeddings (hidden 64) logits could not
    # move far enough from uniform over 151,936 tokens for the toy task to be learnable
    return save_tiny_checkpoint(tmp_path_factory.mktemp("rerank") / "tiny", seed=1, initializer_range=0.3)


def _toy_pairs() -> list[RerankPair]:
    red = Image.new("RGB", (56, 56), (220, 20, 20))
    blue = Image.new("RGB", (56, 56), (20, 20, 220))
    return [
        RerankPair(RerankSide("Find a red square."), RerankSide("", red), True, "r+"),
        RerankPair(RerankSide("Find a blue square."), RerankSide("", blue), True, "b+"),
        RerankPair(RerankSide("Find a red square."), RerankSide("", blue), False, "r-"),
        RerankPair(RerankSide("Find a blue square."), RerankSide("A red square.", red), False, "b-"),
    ]


def test_toy_loss_decreases_with_lora(tiny_rerank_ckpt):
    from umarvel.rerank.collate import RerankTokenizer, RerankTrainCollator
    from umarvel.rerank.model import attach_reranker_lora, load_reranker

    torch.manual_seed(0)
    loaded = load_reranker(tiny_rerank_ckpt, dtype="float32")
    rr = attach_reranker_lora(loaded.model, r=8, alpha=16, dropout=0.0)
    trainable = {n for n, p in rr.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    assert not any("visual" in n for n in trainable)
    batch = RerankTrainCollator(loaded.tokenizer, loaded.image_processor)(
        RerankTokenizer(loaded.tokenizer, training=True).tokenize(_toy_pairs()))
    opt = torch.optim.AdamW([p for p in rr.parameters() if p.requires_grad], lr=3e-2)
    rr.train()
    losses = []
    for _ in range(25):
        loss = rr(**batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    # the trained reranker separates the toy positives from the negatives
    rr.eval()
    score = RerankTokenizer(loaded.tokenizer, training=False).tokenize(
        [RerankPair(p.query, p.candidate, None, p.id) for p in _toy_pairs()])
    from umarvel.rerank.collate import RerankScoreCollator

    with torch.no_grad():
        p = rr.p_yes(RerankScoreCollator(loaded.tokenizer, loaded.image_processor)(score))
    assert float(p[:2].min()) > float(p[2:].max())


def test_answer_only_loss_is_yes_no_ce(tiny_rerank_ckpt):
    """answer_only_loss supervises one token per row: its loss is the CE of the Yes/No token alone."""
    from umarvel.rerank.collate import RerankTokenizer, RerankTrainCollator
    from umarvel.rerank.model import load_reranker

    loaded = load_reranker(tiny_rerank_ckpt, dtype="float32")
    tok = RerankTokenizer(loaded.tokenizer, training=True).tokenize(_toy_pairs())
    full = RerankTrainCollator(loaded.tokenizer, loaded.image_processor)(tok)
    only = RerankTrainCollator(loaded.tokenizer, loaded.image_processor, answer_only_loss=True)(tok)
    assert int((full["labels"] != -100).sum()) == 6 * 4 and int((only["labels"] != -100).sum()) == 4
    with torch.no_grad():
        hidden = loaded.model.hidden_states(full["input_ids"], full["attention_mask"], full["pixel_values"],
                                            full["image_grid_thw"])
        rows, cols = (only["labels"] != -100).nonzero(as_tuple=True)
        logits = loaded.model.lm_logits(hidden[rows, cols - 1])
        expect = torch.nn.functional.cross_entropy(logits, only["labels"][rows, cols])
        got = loaded.model.loss(**only)
    assert torch.allclose(got, expect, rtol=1e-6)
    assert not torch.allclose(got, loaded.model.loss(**full).detach())


def test_score_pairs_order_independent_of_batching(tiny_rerank_ckpt):
    from umarvel.rerank.model import load_reranker
    from umarvel.rerank.score import score_pairs

    loaded = load_reranker(tiny_rerank_ckpt, dtype="float32")
    pairs = [RerankPair(p.query, p.candidate, None, p.id) for p in _toy_pairs()]
    pairs.append(RerankPair(RerankSide("A much longer query text " * 8), RerankSide("Short."), None, "long"))
    one = score_pairs(loaded, pairs, batch_size=1)
    many = score_pairs(loaded, pairs, batch_size=5)
    rev = score_pairs(loaded, pairs[::-1], batch_size=3)
    assert one.shape == (5,) and np.all((one > 0) & (one < 1))
    np.testing.assert_allclose(many, one, atol=1e-5)
    np.testing.assert_allclose(rev[::-1], one, atol=1e-5)


# -------------------------------------------------------------------------------- data + CLI
@pytest.fixture(scope="module")
def mbeir(tmp_path_factory) -> Path:
    from umarvel.data.synthetic import make_synthetic_mbeir

    root = make_synthetic_mbeir(tmp_path_factory.mktemp("mbeir"), seed=0, n_queries_per_task=3,
                                n_candidates_per_task=6, image_size=28, n_train_queries_per_task=2,
                                tasks=["mscoco_task0", "webqa_task1"])
    rows = [json.loads(x) for x in (root / "query/union_train/mbeir_union_up_train.jsonl").read_text().splitlines()]
    pool = [json.loads(x)["did"] for x in
            (root / "cand_pool/global/mbeir_union_train_cand_pool.jsonl").read_text().splitlines()]
    with (root / "mined.jsonl").open("w") as fh:
        for r in rows:
            same = [d for d in pool if d.split(":")[0] == r["qid"].split(":")[0]]
            fh.write(json.dumps({"qid": r["qid"], "gt_docs": r["pos_cand_list"], "top100_docs": same[::-1],
                                 "score": [0.0] * len(same)}) + "\n")
    return root


def test_dataset_pairs_positive_and_mined_negative(mbeir, tiny_rerank_ckpt):
    from umarvel.data.images import ImageBudget
    from umarvel.data.processor import load_tokenizer
    from umarvel.rerank.data import build_train_dataset

    tok = load_tokenizer(tiny_rerank_ckpt, add_umarvel_tokens=False)
    ds = build_train_dataset(mbeir, "query/union_train/mbeir_union_up_train.jsonl",
                             "cand_pool/global/mbeir_union_train_cand_pool.jsonl",
                             "instructions/query_instructions.tsv", "mined.jsonl", tok, ImageBudget())
    for i in range(len(ds)):
        pos, neg = ds.pairs(i)
        q = ds.queries[i]
        assert pos.label is True and neg.label is False
        assert pos.id.split("/")[1] in q.positives
        assert neg.id.split("/")[1] not in q.positives and neg.id.split("/")[1] in ds.mined[i].top_docs
        assert "<instruction_start>" not in pos.query.text and pos.query.text == neg.query.text
        assert ds.pairs(i) == (pos, neg)  # seeded by (seed, epoch, index)


def _train_args(mbeir: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    # 4 query rows, 2 per micro-batch, accumulation 4: every epoch ends inside a partial window, which must
    # still take an optimizer step (an earlier version never stepped and looped forever)
    cfg = Path(__file__).resolve().parents[2] / "configs" / "rerank" / "reranker.yaml"
    return ["rerank", "train", str(cfg), f"model.init_from={ckpt}", "model.dtype=float32",
            "model.gradient_checkpointing=false", f"data.mbeir_root={mbeir}", f"data.mined={mbeir / 'mined.jsonl'}",
            "data.num_workers=0", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", f"train.output_dir={out}",
            "train.per_device_queries=2", "train.gradient_accumulation_steps=4", "train.learning_rate=1e-3",
            "train.bf16=false", "train.device=cpu", "train.logging_steps=1", *extra]


def _adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def test_cli_train_resume_score_fuse(mbeir, tiny_rerank_ckpt, tmp_path, capsys):
    from umarvel.cli import main
    from umarvel.config import load_config
    from umarvel.data.runfiles import read_trec_run, write_trec_run
    from umarvel.rerank.train import RerankTrainConfig, train_reranker
    from umarvel.train import checkpoint as ckpt
    from umarvel.utils.runs import read_identity

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run = ("train.max_steps=2", "lora.dropout=0.1")  # dropout on: the resumed run must restore the RNG too
    assert main(_train_args(mbeir, tiny_rerank_ckpt, straight, *run, "train.save_steps=0")) == 0
    assert (straight / "adapter" / "adapter_config.json").is_file()
    assert (straight / "merged" / "config.json").is_file() and (straight / "resolved_config.yaml").is_file()
    assert ckpt.latest_checkpoint(straight).name == "step-000002"  # save_steps=0: only the final checkpoint
    # the folder knows its run (umarvel.utils.runs): another config is refused in one line, naming the key
    assert read_identity(straight)["kind"] == "rerank-train"
    capsys.readouterr()
    assert main(_train_args(mbeir, tiny_rerank_ckpt, straight, *run, "train.save_steps=0", "lora.r=8")) == 2
    err = capsys.readouterr().err
    assert "umarvel: error: " in err and "lora.r: 4 -> 8" in err and "--overwrite" in err
    assert ckpt.latest_checkpoint(straight).name == "step-000002" and not (straight / ".lock").exists()
    # interrupted run: killed after the step-1 checkpoint, then resumed through the CLI to finish step 2
    args = _train_args(mbeir, tiny_rerank_ckpt, resumed, *run, "train.save_steps=1")
    with pytest.raises(Killed):
        train_reranker(load_config(args[2], RerankTrainConfig, args[3:]), callbacks=[StopAfter(1)])
    assert ckpt.latest_checkpoint(resumed).name == "step-000001" and not (resumed / "adapter").exists()
    assert main(args) == 0
    assert sorted(p.name for p in (resumed / "checkpoints").glob("step-*")) == ["step-000001", "step-000002"]
    history = lambda d: json.loads((d / "train_history.json").read_text())["loss_per_step"]  # noqa: E731
    assert len(history(straight)) == 2 and len(history(resumed)) == 1  # only step 2 ran after the resume
    assert history(resumed)[0] == pytest.approx(history(straight)[1], rel=1e-5)
    a, b = _adapter_weights(straight), _adapter_weights(resumed)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # it did learn something

    # score the top 3 of a val run with the merged model, then fuse and choose the weight
    from umarvel.data.mbeir import read_pool, read_queries

    from umarvel.data.registry import get_task

    files = get_task("mscoco_task0").files("val")
    queries = read_queries(mbeir / files.queries, mbeir)
    pool = read_pool(mbeir / files.pool, mbeir)
    rng = np.random.default_rng(0)
    ids = [[c.did for c in pool][:5] for _ in queries]
    cos = np.sort(rng.uniform(0, 1, (len(queries), 5)), axis=1)[:, ::-1]
    run = tmp_path / "val.run"
    write_trec_run(run, [q.qid for q in queries], ids, cos, "test")
    out = tmp_path / "val_scores.json"
    assert main(["rerank", "score", "--model", str(straight / "merged"), "--mbeir-root", str(mbeir), "--run", str(run),
                 "--split", "val", "--task", "mscoco_task0", "--top-k", "3", "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert list(scores) == [q.qid for q in queries] and all(len(v) == 3 for v in scores.values())
    meta = json.loads((tmp_path / "val_scores.meta.json").read_text())
    assert meta["split"] == "val" and meta["task"] == "mscoco_task0"
    fused = tmp_path / "fused.run"
    assert main(["rerank", "fuse", "--run", str(run), "--scores", str(out), "--weight", "0.5", "--out", str(fused)]) == 0
    got = read_trec_run(fused)
    q0 = queries[0].qid
    cos0 = dict(zip(ids[0], cos[0]))
    expect = {d: round(cos0[d] + 0.5 * p, 6) for d, p in zip(ids[0][:3], scores[q0])}
    assert {d: round(s, 6) for d, s in got[q0][:3]} == pytest.approx(expect, abs=2e-6)
    assert [d for d, _ in got[q0][3:]] == ids[0][3:]
    assert main(["rerank", "fuse", "--choose-weight", "--val-scores", str(out), "--grid", "0,0.1,1"]) == 0
    meta["split"] = "test"
    (tmp_path / "val_scores.meta.json").write_text(json.dumps(meta))
    assert main(["rerank", "fuse", "--choose-weight", "--val-scores", str(out)]) == 2  # test data refused


def test_reranker_config_passes_the_fused_optimizer_knob_to_the_one_trainer():
    """``train.fused_optimizer`` (on by default, as for the stages) reaches the trainer's loop settings."""
    from umarvel.config import load_config
    from umarvel.rerank.train import RerankTrainConfig, loop_config

    yaml = Path(__file__).resolve().parents[2] / "configs" / "rerank" / "reranker.yaml"
    assert loop_config(load_config(yaml, RerankTrainConfig, [])).fused_optimizer is True
    off = load_config(yaml, RerankTrainConfig, ["train.fused_optimizer=false"])
    assert loop_config(off).fused_optimizer is False
