"""Reranker golden parity (case c6 of ``umarvel_train_tiny``): strings, ids, labels, loss, P(yes).

The official numbers come from the official reranker code on the tiny checkpoint (fp32, transformers 4.45).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import shared_dir
from umarvel.data.images import ImageBudget, load_image
from umarvel.rerank.collate import (RerankScoreCollator, RerankTokenizer, RerankTrainCollator, answer_token_ids,
                                    chat_layout)
from umarvel.rerank.prompts import (RERANK_INSTRUCTION, TRAIN_MAX_TEXT_TOKENS, RerankPair, make_side,
                                    rerank_candidate_text, rerank_query_text)

pytestmark = pytest.mark.golden


TRAIN_TINY = shared_dir() / "golden" / "umarvel_train_tiny"
CHECKPOINT = shared_dir() / "golden" / "umarvel_tiny" / "checkpoint"
needs_golden = pytest.mark.skipif(
    not (TRAIN_TINY / "expected" / "c6_rerank").is_dir() or not CHECKPOINT.is_dir(),
    reason=f"golden fixtures not found under {shared_dir()} (set UMARVEL_SHARED)")


@pytest.fixture(scope="module")
def golden():
    arrays = np.load(TRAIN_TINY / "expected" / "c6_rerank" / "arrays.npz")
    meta = json.loads((TRAIN_TINY / "expected" / "c6_rerank" / "meta.json").read_text())
    inputs = json.loads((TRAIN_TINY / "inputs" / "c6_rerank.json").read_text())
    return {k: arrays[k] for k in arrays.files}, meta, inputs


@pytest.fixture(scope="module")
def reranker():
    from umarvel.rerank.model import load_reranker

    torch.manual_seed(0)
    return load_reranker(CHECKPOINT, device="cpu", dtype="float32")


class _Fixture:
    """Builds reranker pairs from the c6 input files exactly as the official datasets do."""

    def __init__(self, inputs: dict, tokenizer):
        files = inputs["official_files"]
        self.tokenizer = tokenizer
        self.images = {name: TRAIN_TINY / rel for name, rel in inputs["image_files"].items()}
        self.queries = {q["qid"]: q for q in files["query.jsonl"]}
        self.cands = {c["did"]: c for c in files["cand_pool.jsonl"]}
        lines = files["instructions.tsv"].strip().split("\n")[1:]
        self.prompts = {(int(c[3]), c[0], c[1]): c[4] for c in (ln.split("\t") for ln in lines)}

    def image(self, name):
        return None if name is None else load_image(self.images[name], ImageBudget())

    def pair(self, qid: str, did: str, label: bool | None, max_tokens: int | None) -> RerankPair:
        q, c = self.queries[qid], self.cands[did]
        pos_modality = self.cands[q["pos_cand_list"][0]]["modality"]  # the key uses the positive's modality
        prompt = self.prompts[(int(qid.split(":")[0]), q["query_modality"], pos_modality)]
        qside = make_side(self.tokenizer, rerank_query_text(prompt, q["query_txt"]), self.image(q["query_img_path"]),
                          max_tokens)
        cside = make_side(self.tokenizer, rerank_candidate_text(c["txt"]), self.image(c["img_path"]), max_tokens)
        return RerankPair(qside, cside, label, id=f"{qid}/{did}")

    def train_pairs(self) -> list[RerankPair]:
        mined = self.inputs_mined
        pos = [(qid, self.queries[qid]["pos_cand_list"][0], True) for qid in self.queries]
        neg = [(qid, next(d for d in mined[qid]["top100_docs"] if d not in mined[qid]["gt_docs"]), False)
               for qid in self.queries]
        return [self.pair(q, d, y, TRAIN_MAX_TEXT_TOKENS) for q, d, y in pos + neg]

    def score_pairs(self, files: dict) -> list[RerankPair]:
        return [self.pair(qid, did, None, None)
                for qid, dids in zip(files["ret_query_data (scoring)"], files["ret_cand_data (scoring)"])
                for did in dids]


def _fixture(inputs, tokenizer) -> _Fixture:
    fx = _Fixture(inputs, tokenizer)
    fx.inputs_mined = inputs["official_files"]["rerank_train_data (qid -> gt_docs / top100_docs)"]
    return fx


@needs_golden
def test_prompt_constant_and_layout(golden, reranker):
    _, meta, _ = golden
    assert RERANK_INSTRUCTION == meta["train"]["prompt_text_item"]
    assert "candidate" + " " * 24 + "meets" in RERANK_INSTRUCTION and "responed" in RERANK_INSTRUCTION
    layout = chat_layout(reranker.tokenizer)
    assert layout.system_len == 11 and layout.assistant_header_len == 3
    assert answer_token_ids(reranker.tokenizer) == (9454, 2753) == (meta["train"]["yes_token_id"],
                                                                    meta["train"]["no_token_id"])
    assert len(reranker.tokenizer) == meta["train"]["tokenizer_len"]
    assert reranker.model.hf_model.get_input_embeddings().weight.shape[0] == meta["train"]["embedding_rows"]


@needs_golden
def test_training_strings_ids_labels(golden, reranker):
    arrays, meta, inputs = golden
    tok = reranker.tokenizer
    side_before = tok.padding_side
    fx = _fixture(inputs, tok)
    pairs = fx.train_pairs()
    rt = RerankTokenizer(tok, training=True)
    assert [rt.render(p) for p in pairs] == meta["train"]["rendered"]
    batch = RerankTrainCollator(tok, reranker.image_processor)(rt.tokenize(pairs))
    for key in ("input_ids", "attention_mask", "labels", "image_grid_thw"):
        np.testing.assert_array_equal(batch[key].numpy(), arrays[key], err_msg=key)
    np.testing.assert_allclose(batch["pixel_values"].numpy(), arrays["pixel_values"], atol=1e-6, rtol=0)
    assert tok.padding_side == side_before  # the shared tokenizer is not switched to right padding
    # the official rule: pads, [2nd, 3rd <|im_start|>) and [:, :11] -> -100
    official = batch["input_ids"].clone()
    official[batch["attention_mask"] == 0] = -100
    for b in range(official.shape[0]):
        starts = (batch["input_ids"][b] == 151644).nonzero().flatten().tolist()
        official[b, starts[1]:starts[2]] = -100
    official[:, :11] = -100
    assert torch.equal(official, batch["labels"])
    assert int((batch["labels"] != -100).sum()) == meta["train"]["num_supervised_tokens"] == 24
    # answer-only option: exactly the Yes/No token of each row
    only = RerankTrainCollator(tok, reranker.image_processor, answer_only_loss=True)(rt.tokenize(pairs))["labels"]
    rows, cols = (only != -100).nonzero(as_tuple=True)
    assert rows.tolist() == [0, 1, 2, 3]
    assert cols.tolist() == arrays["answer_token_positions"].tolist()  # positions of the answer tokens
    assert only[rows, cols].tolist() == [9454, 9454, 2753, 2753]


@needs_golden
def test_training_loss_recorded_tensors_and_own_preprocessing(golden, reranker):
    arrays, meta, inputs = golden
    expected = meta["train"]["loss"]
    assert expected == 12.587360382080078
    recorded = {k: torch.from_numpy(arrays[k]) for k in
                ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw")}
    with torch.no_grad():
        loss = reranker.model.loss(**recorded).item()
    assert abs(loss - expected) / expected <= 1e-5
    fx = _fixture(inputs, reranker.tokenizer)
    rt = RerankTokenizer(reranker.tokenizer, training=True)
    batch = RerankTrainCollator(reranker.tokenizer, reranker.image_processor)(rt.tokenize(fx.train_pairs()))
    with torch.no_grad():
        own = reranker.model.loss(**batch).item()
        mrope = reranker.model.loss(**batch, positions="mrope").item()
    assert abs(own - expected) / expected <= 1e-5
    # the position convention matters (official diagnostic: 12.6475 with M-RoPE)
    assert abs(mrope - meta["train"]["diagnostics_official_model"]["loss_if_mrope_positions"]) / expected <= 1e-5
    # per-token CE and the Yes/No logits before the answer (answer_token_positions = predicting position)
    with torch.no_grad():
        hidden = reranker.model.hidden_states(**{k: v for k, v in batch.items() if k != "labels"})
        pos = torch.from_numpy(arrays["supervised_positions"])
        logits = reranker.model.lm_logits(hidden[pos[:, 0], pos[:, 1]])
        ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(arrays["supervised_target_ids"]),
                                               reduction="none")
        ans = torch.from_numpy(arrays["answer_token_positions"]) - 1  # the position predicting the answer
        yes_no = reranker.model.lm_logits(hidden[torch.arange(4), ans])[:, [9454, 2753]]
    np.testing.assert_allclose(ce.numpy(), arrays["supervised_token_ce"], atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(yes_no.numpy(), arrays["logits_yes_no_before_answer"], atol=2e-4, rtol=0)


def _score_batch(arrays) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.from_numpy(arrays["score_input_ids"]),
            "attention_mask": torch.from_numpy(arrays["score_attention_mask"]),
            "pixel_values": torch.from_numpy(arrays["score_pixel_values"]),
            "image_grid_thw": torch.from_numpy(arrays["score_image_grid_thw"])}


@needs_golden
def test_scoring_strings_and_tensors(golden, reranker):
    arrays, meta, inputs = golden
    fx = _fixture(inputs, reranker.tokenizer)
    pairs = fx.score_pairs(inputs["official_files"])
    rt = RerankTokenizer(reranker.tokenizer, training=False)
    assert [rt.render(p) for p in pairs] == meta["score"]["rendered"]
    batch = RerankScoreCollator(reranker.tokenizer, reranker.image_processor)(rt.tokenize(pairs))
    np.testing.assert_array_equal(batch["input_ids"].numpy(), arrays["score_input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"].numpy(), arrays["score_attention_mask"])
    np.testing.assert_array_equal(batch["image_grid_thw"].numpy(), arrays["score_image_grid_thw"])
    np.testing.assert_allclose(batch["pixel_values"].numpy(), arrays["score_pixel_values"], atol=1e-6, rtol=0)


@needs_golden
def test_p_yes_one_forward_1d_and_mrope(golden, reranker):
    arrays, _, _ = golden
    batch = _score_batch(arrays)
    with torch.no_grad():
        p1d = reranker.model.p_yes(batch, positions="1d").numpy()
        pm = reranker.model.p_yes(batch, positions="mrope").numpy()
        lm = reranker.model.yes_no_logits(**batch, positions="mrope").numpy()
    np.testing.assert_allclose(p1d, arrays["score_p_yes_forward_1d_positions"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(p1d, arrays["score_p_yes_forward_1d_rowwise_positions"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(pm, arrays["score_p_yes_forward_mrope_positions"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(pm, arrays["score_p_yes_generate"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(lm, arrays["score_generate_first_step_logits_yes_no"], atol=2e-4, rtol=0)
    # the two conventions really differ on image rows (guards against a no-op positions switch)
    assert np.abs(p1d - pm).max() > 0.05


@needs_golden
def test_p_yes_mrope_equals_generate_first_step(golden, reranker):
    """One forward with M-RoPE positions == the first step of greedy ``generate`` on the same input."""
    arrays, _, _ = golden
    batch = _score_batch(arrays)
    hf = reranker.model.hf_model
    mm = torch.zeros_like(batch["input_ids"], dtype=torch.int)
    mm[batch["input_ids"] == hf.config.image_token_id] = 1
    with torch.no_grad():
        out = hf.generate(**batch, mm_token_type_ids=mm, max_new_tokens=1, do_sample=False, output_scores=True,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=151643,
                          repetition_penalty=1.0)
        first = out.logits[0][:, [reranker.model.yes_id, reranker.model.no_id]].float()
        p_gen = torch.softmax(first, dim=-1)[:, 0]
        p_fwd = reranker.model.p_yes(batch, positions="mrope")
    assert torch.equal(out.sequences[:, -1], out.logits[0].argmax(-1))
    assert float((p_fwd - p_gen).abs().max()) <= 1e-6
    np.testing.assert_allclose(p_gen.numpy(), arrays["score_p_yes_generate"], atol=1e-5, rtol=0)


@needs_golden
def test_packed_loss_and_p_yes_equal_official(golden, reranker):
    """Packed rows (no padding; causal attention inside each pair) give the official loss and P(yes)."""
    from umarvel.data.packing import pack_padded

    arrays, meta, _ = golden
    recorded = {k: torch.from_numpy(arrays[k]) for k in
                ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw")}
    packed = pack_padded(recorded)
    assert packed["input_ids"].shape[1] == int(recorded["attention_mask"].sum())
    with torch.no_grad():
        loss = reranker.model.loss(**packed).item()
        p = reranker.model.p_yes(pack_padded(_score_batch(arrays))).numpy()
    assert abs(loss - meta["train"]["loss"]) / meta["train"]["loss"] <= 1e-5
    np.testing.assert_allclose(p, arrays["score_p_yes_forward_1d_positions"], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def official_reranker():
    from umarvel.rerank.model import load_reranker

    return load_reranker(CHECKPOINT, device="cpu", dtype="float32", compat="official")


@needs_golden
def test_official_compat_p_yes_is_the_generate_path_value(golden, official_reranker):
    """compat="official": score_pairs gives the fixture's generate-path P(yes) (M-RoPE, first step)."""
    from umarvel.rerank.score import score_pairs

    arrays, _, inputs = golden
    assert official_reranker.compat == "official"
    fx = _fixture(inputs, official_reranker.tokenizer)
    pairs = fx.score_pairs(inputs["official_files"])
    got = score_pairs(official_reranker, pairs, batch_size=4)  # the official batch; pair order
    np.testing.assert_allclose(got, arrays["score_p_yes_generate"], atol=1e-5, rtol=0)
    with torch.no_grad():
        recorded = official_reranker.model.p_yes_generate(_score_batch(arrays)).numpy()
    np.testing.assert_allclose(recorded, arrays["score_p_yes_generate"], atol=1e-5, rtol=0)
    # the default (one forward, 1-D positions) is the other fixture column
    assert np.abs(got - arrays["score_p_yes_forward_1d_positions"]).max() > 0.05


@needs_golden
def test_official_compat_applies_the_checkpoint_generation_config(golden, official_reranker):
    """A repetition penalty in the checkpoint's generation_config changes the official scores[0] (D10)."""
    arrays, _, _ = golden
    gen = official_reranker.model.hf_model.generation_config
    before = getattr(gen, "repetition_penalty", None)
    gen.repetition_penalty = 1.05
    try:
        with torch.no_grad():
            p = official_reranker.model.p_yes_generate(_score_batch(arrays)).numpy()
    finally:
        gen.repetition_penalty = before
    np.testing.assert_allclose(p, arrays["score_p_yes_generate_repetition_penalty_1_05"], atol=1e-5, rtol=0)
    assert np.abs(p - arrays["score_p_yes_generate"]).max() > 1e-3
