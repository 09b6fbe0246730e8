"""Packed forward == padded forward (fp32, tiny models): embeddings, kernels, encode API, a training step."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from umarvel.data.collate import EmbedInput, EmbeddingCollator
from umarvel.data.images import load_image
from umarvel.data.packing import PackedCollator
from umarvel.data.visual import VideoInput
from umarvel.model.attention import packed_attention

TOL = 1e-5


def _inputs(model, sample_images):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
    budget = model.budget
    return [
        EmbedInput("<instruction_start>Find a picture of it.<instruction_end> a red ball on a table."),
        EmbedInput("<instruction_start>Retrieve a caption.<instruction_end> what is this?",
                   (load_image(sample_images["blue"], budget),)),
        EmbedInput("", (load_image(sample_images["green_tall"], budget),)),
        EmbedInput("a much longer candidate text about many different things " * 6),
        EmbedInput("a short clip", video=VideoInput.from_frames(frames)),
        EmbedInput("", (load_image(sample_images["red"], budget),)),
    ]


def _both(model, inputs):
    tokenized = model._tok.tokenize(inputs)
    padded = EmbeddingCollator(model.tokenizer, model.image_processor)(tokenized)
    packed = PackedCollator(model.tokenizer, model.image_processor)(tokenized)
    return padded, packed


def test_packed_equals_padded_with_images_video_and_instructions(tiny_model, sample_images):
    padded, packed = _both(tiny_model, _inputs(tiny_model, sample_images))
    assert packed["input_ids"].shape[1] == int(padded["attention_mask"].sum()) < padded["input_ids"].numel()
    assert int(packed["instruction_mask"].sum()) > 0 and "pixel_values_videos" in packed
    with torch.no_grad():
        a = tiny_model.embedder(**padded)
        b = tiny_model.embedder(**packed)
        raw_a = tiny_model.embedder(**padded, normalize=False)
        raw_b = tiny_model.embedder(**packed, normalize=False)
    assert (a - b).abs().max() <= TOL
    assert ((raw_a - raw_b).abs().max() / raw_a.abs().max()) <= TOL


def test_packed_batch_of_one_and_order_independence(tiny_model, sample_images):
    inputs = _inputs(tiny_model, sample_images)
    _, packed = _both(tiny_model, inputs)
    with torch.no_grad():
        together = tiny_model.embedder(**packed)
        for i, inp in enumerate(inputs):
            padded_one, packed_one = _both(tiny_model, [inp])
            alone = tiny_model.embedder(**packed_one)
            assert (alone[0] - together[i]).abs().max() <= TOL
            assert (alone - tiny_model.embedder(**padded_one)).abs().max() <= TOL
        rev = _both(tiny_model, inputs[::-1])[1]
        assert (tiny_model.embedder(**rev).flip(0) - together).abs().max() <= TOL


def test_packed_causal_equals_padded_causal(tiny_model, sample_images):
    padded, packed = _both(tiny_model, _inputs(tiny_model, sample_images)[:4])
    tiny_model.embedder.set_attention("causal")
    try:
        with torch.no_grad():
            a, b = tiny_model.embedder(**padded), tiny_model.embedder(**packed)
    finally:
        tiny_model.embedder.set_attention("bidirectional")
    with torch.no_grad():
        bidir = tiny_model.embedder(**packed)
    assert (a - b).abs().max() <= TOL
    assert (bidir - b).abs().max() > 1e-3  # causal really differs


def _reference(q, k, v, lens, causal):
    out, s = [], 0
    rep = q.shape[1] // k.shape[1]
    for n in lens:
        qs, ks, vs = (x[s:s + n].transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1))
        s += n
    return torch.cat(out)


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
@pytest.mark.parametrize("causal", [False, True])
def test_packed_kernels_equal_per_sequence_attention(kernel, causal):
    g = torch.Generator().manual_seed(0)
    lens = [5, 1, 17, 9]
    total = sum(lens)
    q = torch.randn(total, 4, 16, generator=g)
    k, v = torch.randn(total, 2, 16, generator=g), torch.randn(total, 2, 16, generator=g)
    cu = torch.tensor([0, *np.cumsum(lens)], dtype=torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex without torch.compile on CPU warns (unfused, fine here)
        got = packed_attention(q, k, v, cu, max(lens), causal=causal, kernel=kernel)
    assert (got - _reference(q, k, v, lens, causal)).abs().max() <= 1e-5


def test_kernel_choice_on_cpu():
    from umarvel.model.attention import select_kernel

    assert select_kernel(torch.device("cpu"), torch.float32, "auto") == "sdpa"
    assert select_kernel(torch.device("cpu"), torch.bfloat16, "auto") == "sdpa"
    with pytest.raises(ValueError, match="not available"):
        select_kernel(torch.device("cpu"), torch.bfloat16, "varlen")
    with pytest.raises(ValueError, match="must be one of"):
        select_kernel(torch.device("cpu"), torch.float32, "nope")


def test_encode_api_packed_equals_padded_and_reports_no_padding(tiny_model, sample_images):
    items = [{"text": "short."}, {"text": "a much longer text about many different things " * 4},
             {"image": str(sample_images["red"])}, {"text": "red ball", "image": str(sample_images["blue"])},
             {"text": "medium length text here."}, {"image": str(sample_images["green_tall"])}]
    assert tiny_model.packs
    packed = tiny_model.encode_candidates(items, batch_size=4)
    stats = dict(tiny_model.last_encode_stats)
    tiny_model.packing = False
    try:
        padded = tiny_model.encode_candidates(items, batch_size=4)
        padded_stats = dict(tiny_model.last_encode_stats)
    finally:
        tiny_model.packing = True
    np.testing.assert_allclose(packed, padded, atol=TOL)
    assert stats["padded_tokens"] == stats["real_tokens"] == padded_stats["real_tokens"]
    assert padded_stats["padded_tokens"] > padded_stats["real_tokens"]
    assert stats["items"] == 6 and stats["batches"] >= 2 and stats["busy_s"] <= stats["wall_s"]


def test_encode_in_worker_processes_equals_in_process(tiny_model, sample_images):
    items = [{"text": f"item number {i} " * (1 + i % 5)} if i % 3 else {"image": str(sample_images["red"])}
             for i in range(24)]
    base = tiny_model.encode_candidates(items, batch_size=4)
    tiny_model.preprocess_workers, tiny_model.chunk_items = 2, 8  # 3 chunks -> 2 worker processes
    try:
        got = tiny_model.encode_candidates(items, batch_size=4)
    finally:
        tiny_model.preprocess_workers, tiny_model.chunk_items = None, None
    np.testing.assert_allclose(got, base, atol=TOL)


def test_mrope_positions_fall_back_to_padded(tiny_checkpoint, sample_images):
    from umarvel import UMarvel

    model = UMarvel.from_pretrained(tiny_checkpoint, positions="mrope")
    assert not model.packs
    _, packed = _both(model, [EmbedInput("a red ball")])
    with pytest.raises(ValueError, match="positions='1d'"):
        model.embedder(**packed)
    assert model.encode_candidates([{"text": "a red ball"}]).shape == (1, model.embed_dim)


# ------------------------------------------------------------------------------------------- training
def _lora_embedder(tiny_checkpoint, mode="full"):
    from umarvel import UMarvel
    from umarvel.model.checkpointing import set_activation_checkpointing
    from umarvel.model.lora import attach_lora

    model = UMarvel.from_pretrained(tiny_checkpoint)
    torch.manual_seed(0)
    emb = attach_lora(model.embedder, 4, 8, dropout=0.0)
    with torch.no_grad():  # non-zero B so every adapter weight gets a gradient
        for n, p in emb.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    hf = emb.hf_model
    set_activation_checkpointing(hf, emb.spec.language_model(hf), emb.spec.visual(hf), mode)
    emb.train()
    return model, emb


def _step_grads(model, emb, examples, packing, chunk_tokens=200):
    from umarvel.data.formatting import TRAIN_STYLE
    from umarvel.train import losses as L
    from umarvel.train.batching import PairCollator

    col = PairCollator(model.tokenizer, model.image_processor, TRAIN_STYLE, model.budget, chunk_size=3,
                       chunk_tokens=chunk_tokens, packing=packing)
    batch = col(examples)
    assert all(("cu_seqlens" in ch) == packing for ch in batch.chunks) and len(batch.chunks) > 1
    emb.zero_grad(set_to_none=True)
    embs = torch.cat([emb(**ch, normalize=False) for ch in batch.chunks])
    q, c = embs[batch.inverse].split(batch.group_sizes)
    loss = L.info_nce(q, c, emb.temperature.reshape(()))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in emb.named_parameters() if p.requires_grad}
    return loss.detach(), grads, batch


def _examples(sample_images):
    from umarvel.train.datasets import Side, TrainExample

    texts = ["a red ball", "a long description of a blue box on a wooden table near the window",
             "<instruction_start>Find the image.<instruction_end> green", "cat", "a small dog running"]
    images = [None, str(sample_images["blue"]), None, str(sample_images["red"]), None]
    return [TrainExample(Side(t, im), (Side(f"candidate {i} " * (i + 1), images[::-1][i]),),
                         query_id=f"q{i}", candidate_ids=(f"c{i}",)) for i, (t, im) in enumerate(zip(texts, images))]


def test_training_step_packed_equals_padded(tiny_checkpoint, sample_images):
    model, emb = _lora_embedder(tiny_checkpoint)
    examples = _examples(sample_images)
    loss_pad, g_pad, b_pad = _step_grads(model, emb, examples, packing=False)
    loss_pack, g_pack, b_pack = _step_grads(model, emb, examples, packing=True)
    assert b_pack.padded_tokens == b_pack.num_tokens < b_pad.padded_tokens
    assert abs(float(loss_pack) - float(loss_pad)) <= 1e-4 * abs(float(loss_pad))
    assert g_pad.keys() == g_pack.keys() and len(g_pad) > 0
    for n in g_pad:
        scale = g_pad[n].abs().max().clamp(min=1e-12)
        assert (g_pack[n] - g_pad[n]).abs().max() / scale <= 1e-4, n


@pytest.mark.parametrize("mode", ["selective", "none"])
def test_activation_checkpointing_modes_same_gradients(tiny_checkpoint, sample_images, mode):
    examples = _examples(sample_images)
    model, emb = _lora_embedder(tiny_checkpoint, "full")
    _, g_full, _ = _step_grads(model, emb, examples, packing=True)
    model2, emb2 = _lora_embedder(tiny_checkpoint, mode)
    layers = emb2.spec.language_model(emb2.hf_model).layers
    calls = []
    layers[0].self_attn.register_forward_pre_hook(lambda *a: calls.append(1))  # re-runs on recompute
    visual_grad = []
    emb2.spec.visual(emb2.hf_model).register_forward_hook(lambda *a: visual_grad.append(torch.is_grad_enabled()))
    _, g_mode, batch = _step_grads(model2, emb2, examples, packing=True)
    recomputed = len(calls) - len(batch.chunks)
    assert recomputed == (len(batch.chunks) if mode == "selective" else 0)  # layer 0 is checkpointed in selective
    assert [bool(layer.gradient_checkpointing) for layer in layers] == ([True, False] if mode == "selective"
                                                                         else [False, False])
    assert visual_grad and not any(visual_grad)  # the frozen tower runs without autograd
    for n in g_full:
        assert torch.allclose(g_mode[n], g_full[n], atol=1e-6, rtol=1e-4), n


def test_eager_implementation_packed_and_padded_agree(tiny_checkpoint, tiny_model, sample_images):
    """Models loaded with ``attn_implementation="eager"``: padded batches keep eager attention (masks built
    by transformers too, causal included), packed batches give the same vectors."""
    from umarvel import UMarvel

    eager = UMarvel.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    padded, packed = _both(eager, _inputs(eager, sample_images)[:4])
    ref_padded, _ = _both(tiny_model, _inputs(tiny_model, sample_images)[:4])
    with torch.no_grad():
        a, b = eager.embedder(**padded), eager.embedder(**packed)
        c = tiny_model.embedder(**ref_padded)
        hf = eager.embedder.hf_model  # a transformers-built causal mask (the reranker's padded path)
        ids, attn = padded["input_ids"][:2], padded["attention_mask"][:2]
        out_eager = hf.model(input_ids=ids, attention_mask=attn).last_hidden_state
        out_sdpa = tiny_model.embedder.hf_model.model(input_ids=ids, attention_mask=attn).last_hidden_state
    assert (a - b).abs().max() <= TOL and (a - c).abs().max() <= TOL
    real = attn.bool()
    assert (out_eager[real] - out_sdpa[real]).abs().max() <= 1e-4


def test_official_compat_keeps_the_padded_path(tiny_checkpoint, tiny_model):
    """compat="official" (D5: an unpadded batch runs causal) never packs: packing is off, the embedder refuses
    packed batches, and official batches formed in worker processes (chunks aligned to the batch size, the last
    batch completed with the first items) equal those formed in-process."""
    from umarvel import UMarvel

    official = UMarvel.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32", compat="official")
    assert not official.packing and not official.embedder.supports_packing and not official.packs
    official.packing = True  # asking for it does not switch the padded official path off
    assert not official.packs
    tokenized = official._tok.tokenize([EmbedInput("a red ball."), EmbedInput("a blue cube on a table.")])
    packed = PackedCollator(official.tokenizer, official.image_processor)(tokenized)
    with pytest.raises(ValueError, match="causal_when_unpadded"):
        official.embedder(**packed)
    items = [{"text": f"item number {i} " * (1 + i % 5)} for i in range(11)]
    base = official.encode_candidates(items, batch_size=4)
    assert official.last_encode_stats["padded_tokens"] > official.last_encode_stats["real_tokens"]
    official.preprocess_workers, official.chunk_items = 2, 3  # chunks of 4 (aligned), 3 of them -> 2 workers
    try:
        got = official.encode_candidates(items, batch_size=4)
    finally:
        official.preprocess_workers, official.chunk_items = None, None
    np.testing.assert_allclose(got, base, atol=TOL)
    # an unpadded official batch of one is causal, unlike the default model's
    one = official.encode_candidates(items[:1], batch_size=1)
    assert np.abs(one - tiny_model.encode_candidates(items[:1], batch_size=1)).max() > 1e-4
