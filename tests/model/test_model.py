"""Embedding model behaviour on a tiny random Qwen2-VL: pooling, attention, order, saving, LoRA, dtypes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from umarvel.data.collate import EmbedInput, EmbeddingCollator, instruction_mask, plan_batches
from umarvel.model.embedder import mean_pool


def _batch(model, texts, padding_side="left", images=()):
    inputs = [EmbedInput(t, tuple(images)) for t in texts]
    coll = EmbeddingCollator(model.tokenizer, model.image_processor, padding_side=padding_side)
    return coll(model._tok.tokenize(inputs))


def test_mean_pool_hand_computed():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    m = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    out = mean_pool(h, m)
    torch.testing.assert_close(out[0], (h[0, 1] + h[0, 2]) / 2)
    torch.testing.assert_close(out[1], h[1].mean(0))
    assert torch.isfinite(mean_pool(h, torch.zeros(2, 4))).all()  # clamp, no division by zero


def test_instruction_mask_includes_both_markers():
    ids = torch.tensor([[5, 100, 6, 7, 101, 8, 100, 9, 101]])
    mask = instruction_mask(ids, 100, 101)
    assert mask.tolist() == [[0, 1, 1, 1, 1, 0, 1, 1, 1]]


def test_left_and_right_padding_give_the_same_embeddings(tiny_model):
    texts = ["<instruction_start>Find it.<instruction_end> a red ball.", "A much longer candidate text " * 5]
    left = _batch(tiny_model, texts, "left")
    right = _batch(tiny_model, texts, "right")
    assert left["attention_mask"][0, 0] == 0 and right["attention_mask"][0, -1] == 0
    assert left["instruction_mask"].sum() == right["instruction_mask"].sum() > 0
    with torch.no_grad():
        a, b = tiny_model.embedder(**left), tiny_model.embedder(**right)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    solo = _batch(tiny_model, texts[:1])
    with torch.no_grad():
        torch.testing.assert_close(tiny_model.embedder(**solo)[0], a[0], atol=1e-5, rtol=1e-5)


def test_instruction_span_is_masked_from_pooling_but_conditions_the_rest(tiny_model):
    b = _batch(tiny_model, ["<instruction_start>Find a picture.<instruction_end> a red ball."])
    assert (b["pool_mask"] == b["attention_mask"] * (1 - b["instruction_mask"])).all()
    c = _batch(tiny_model, ["<instruction_start>Retrieve a caption.<instruction_end> a red ball."])
    with torch.no_grad():
        hb = tiny_model.embedder.hidden_states(b["input_ids"], b["attention_mask"])
        eb, ec = tiny_model.embedder(**b), tiny_model.embedder(**c)
    expected = torch.nn.functional.normalize(mean_pool(hb, b["pool_mask"]), dim=-1)
    torch.testing.assert_close(eb, expected)
    assert not torch.allclose(eb, ec, atol=1e-4)  # the instruction still takes part in attention


@pytest.mark.parametrize("texts", [["A red ball on the table."], ["A red ball.", "A blue box."]])
def test_attention_is_bidirectional_without_padding(tiny_model, texts):
    """A later token changes an earlier position's hidden state (batch of one / unpadded batch)."""
    b1 = _batch(tiny_model, texts)
    assert bool(b1["attention_mask"].all())
    b2 = {k: v.clone() for k, v in b1.items()}
    b2["input_ids"][:, -3] = 1234  # change a late token
    with torch.no_grad():
        h1 = tiny_model.embedder.hidden_states(b1["input_ids"], b1["attention_mask"])
        h2 = tiny_model.embedder.hidden_states(b2["input_ids"], b2["attention_mask"])
    assert (h1[:, 0] - h2[:, 0]).abs().max() > 1e-6
    tiny_model.embedder.set_attention("causal")
    try:
        with torch.no_grad():
            c1 = tiny_model.embedder.hidden_states(b1["input_ids"], b1["attention_mask"])
            c2 = tiny_model.embedder.hidden_states(b2["input_ids"], b2["attention_mask"])
    finally:
        tiny_model.embedder.set_attention("bidirectional")
    torch.testing.assert_close(c1[:, :-3], c2[:, :-3])


def test_plan_batches_covers_every_index_and_respects_budget():
    lengths = [5, 50, 7, 49, 3, 100, 20]
    batches = plan_batches(lengths, max_batch_size=3, max_tokens=120)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= max(120, max(lengths[i] for i in b))


def test_order_preserved_under_length_sorting_and_batch_sizes(tiny_model, sample_images):
    items = [{"text": "short."}, {"text": "a much longer text about many different things " * 4},
             {"image": str(sample_images["red"])}, {"text": "red ball", "image": str(sample_images["blue"])},
             {"text": "medium length text here."}, {"image": str(sample_images["green_tall"])}]
    full = tiny_model.encode_candidates(items, batch_size=4)
    singles = np.concatenate([tiny_model.encode_candidates([it], batch_size=1) for it in items])
    np.testing.assert_allclose(full, singles, atol=1e-5)
    perm = [3, 0, 5, 1, 4, 2]
    shuffled = tiny_model.encode_candidates([items[i] for i in perm], batch_size=2)
    np.testing.assert_allclose(shuffled, full[perm], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
    assert full.dtype == np.float32 and full.shape == (6, tiny_model.embed_dim)


def test_save_load_round_trip_keeps_tokens_temperature_and_vectors(tiny_model, tmp_path):
    from umarvel import UMarvel

    with torch.no_grad():
        tiny_model.embedder.temperature.fill_(0.0321)
    try:
        out = tiny_model.save_pretrained(tmp_path / "saved")
        again = UMarvel.from_pretrained(out)
    finally:
        with torch.no_grad():
            tiny_model.embedder.temperature.fill_(0.05)
    assert abs(again.temperature - 0.0321) < 1e-7
    for t in ("<emb>", "<instruction_start>", "<instruction_end>"):
        assert again.tokenizer.convert_tokens_to_ids(t) == tiny_model.tokenizer.convert_tokens_to_ids(t)
    assert (out / "umarvel.json").is_file()
    items = [{"text": "a red ball", "instruction": "Find an image."}]
    np.testing.assert_allclose(again.encode_queries(items), tiny_model.encode_queries(items), atol=1e-6)


def test_marker_rows_zero_are_drawn_deterministically(tiny_checkpoint, tmp_path):
    """D14: all-zero marker rows are drawn once with a fixed seed, identically at every load."""
    from umarvel import UMarvel

    m = UMarvel.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        m.embedder.hf_model.get_input_embeddings().weight[151658:151660] = 0
    m.embedder.hf_model.save_pretrained(tmp_path / "zero")
    m.tokenizer.save_pretrained(tmp_path / "zero")  # tokens already added: ids stay 151657-151659
    m.image_processor.save_pretrained(tmp_path / "zero")
    a, b = UMarvel.from_pretrained(tmp_path / "zero"), UMarvel.from_pretrained(tmp_path / "zero")
    ra = a.embedder.hf_model.get_input_embeddings().weight[151658:151660]
    rb = b.embedder.hf_model.get_input_embeddings().weight[151658:151660]
    assert ra.abs().sum() > 0
    torch.testing.assert_close(ra, rb, rtol=0, atol=0)
    assert a.fingerprint() == b.fingerprint() != m.fingerprint()


def test_lora_merged_equals_unmerged(tiny_checkpoint, tmp_path):
    from umarvel import UMarvel
    from umarvel.model.lora import attach_lora, is_lora, merge_lora, save_lora

    m = UMarvel.from_pretrained(tiny_checkpoint)
    attach_lora(m.embedder, r=4, alpha=8, dropout=0.0)
    trainable = [n for n, p in m.embedder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    with torch.no_grad():  # make the LoRA branch non-zero
        for n, p in m.embedder.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    items = [{"text": "a red ball", "instruction": "Find an image."}, {"text": "blue"}]
    unmerged = m.encode_queries(items)
    save_lora(m.embedder, tmp_path / "adapter")
    merge_lora(m.embedder)
    assert not is_lora(m.embedder)
    np.testing.assert_allclose(m.encode_queries(items), unmerged, atol=1e-5)
    base_plus_adapter = UMarvel.from_pretrained(tiny_checkpoint, adapter=tmp_path / "adapter")
    np.testing.assert_allclose(base_plus_adapter.encode_queries(items), unmerged, atol=1e-5)
    plain = UMarvel.from_pretrained(tiny_checkpoint).encode_queries(items)
    assert np.abs(plain - unmerged).max() > 1e-4


def test_bf16_path_close_to_fp32(tiny_checkpoint, sample_images):
    from umarvel import UMarvel

    items = [{"text": "a red ball"}, {"text": "x", "image": str(sample_images["red"])}]
    fp32 = UMarvel.from_pretrained(tiny_checkpoint, dtype="float32").encode_candidates(items)
    m16 = UMarvel.from_pretrained(tiny_checkpoint, dtype="bfloat16")
    assert next(m16.embedder.hf_model.parameters()).dtype == torch.bfloat16
    bf16 = m16.encode_candidates(items)
    assert bf16.dtype == np.float32
    assert (np.sum(fp32 * bf16, axis=1) > 0.99).all()


def test_video_of_two_identical_frames_equals_the_image(tiny_model, sample_images):
    """Videos go through the vision tower as ``pixel_values_videos``; a still 2-frame clip == the image."""
    from umarvel.data.images import load_image
    from umarvel.data.visual import VideoInput

    im = load_image(sample_images["blue"], tiny_model.budget)
    video = EmbedInput("", video=VideoInput.from_frames([im, im]))
    image = EmbedInput("", (im,))
    out = tiny_model.encode_prepared([lambda: video, lambda: image, lambda: EmbedInput("A blue ellipse.")])
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)
    assert np.abs(out[0] - out[2]).max() > 1e-3


def test_interleaved_segments_render_in_order(tiny_model, sample_images):
    from umarvel.data.formatting import SUFFIX_IMAGE_TEXT
    from umarvel.data.images import load_image

    im = load_image(sample_images["red"], tiny_model.budget)
    inp = EmbedInput.interleaved(["First caption.", im, "Second caption.", im, "Last one."])
    rendered = tiny_model._tok.render(inp)
    user = rendered.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    assert user == f"First caption.{pad}Second caption.{pad}Last one." + SUFFIX_IMAGE_TEXT
    emb = tiny_model.encode_prepared([lambda: inp])
    assert emb.shape == (1, tiny_model.embed_dim) and np.isfinite(emb).all()
