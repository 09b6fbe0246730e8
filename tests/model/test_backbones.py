"""Every registered backbone (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) on a tiny random model: our embedding equals the
stock transformers forward (its own vision tower, DeepStack included, with the same bidirectional mask and the
same positions) mean-pooled the same way, for text, image, image+text, video and mixed batches of 1 and N;
the registry's errors, LoRA targets, attention, tokens and budgets."""
from __future__ import annotations

import copy
import json
import logging
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from umarvel.data.collate import EmbedInput
from umarvel.data.images import load_image
from umarvel.data.visual import VideoInput
from umarvel.errors import CheckpointError
from umarvel.model.backbones import Qwen3VLSpec, get_backbone_spec
from umarvel.model.constants import BACKBONES

ATOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{backbone: (UMarvel, stock copy of its transformers model)} of tiny seed-0 checkpoints."""
    from umarvel import UMarvel
    from umarvel.model.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("backbones")
    out = {}
    for b in BACKBONES:
        m = UMarvel.from_pretrained(save_tiny_checkpoint(root / b, seed=0, backbone=b), device="cpu", dtype="float32")
        stock = copy.deepcopy(m.embedder.hf_model).eval()
        for module in m.embedder.spec.attention_modules(stock):
            module.is_causal = True  # as shipped: the reference gets its bidirectionality from the mask only
        out[b] = (m, stock)
    return out


def _picture(size, color) -> Image.Image:
    im = Image.new("RGB", size, (240, 240, 240))
    ImageDraw.Draw(im).ellipse([size[0] // 5, size[1] // 5, 4 * size[0] // 5, 4 * size[1] // 5], fill=color)
    return im


def _video(model, n_frames: int, w_units: int, h_units: int, seed: int) -> VideoInput:
    f = model.patch_spec.factor
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n_frames, h_units * f, w_units * f, 3), dtype=np.uint8)
    times = [0.5 + 1.5 * k for k in range((n_frames + 1) // 2)]
    return VideoInput.from_frames(frames, model.patch_spec, times)


def _inputs(model, case: str) -> list[EmbedInput]:
    """N inputs of one kind (different lengths / sizes, so the batch is padded)."""
    imgs = [load_image(_picture(s, c), model.budget) for s, c in
            [((130, 100), (200, 30, 30)), ((64, 180), (30, 30, 200)), ((90, 70), (30, 160, 30))]]
    texts = ["<instruction_start>Find a matching picture.<instruction_end> A red ball on a wooden table.",
             "A blue box.", "Three green circles next to each other on a long white shelf, seen from above."]
    if case == "text":
        return [EmbedInput(t) for t in texts]
    if case == "image":
        return [EmbedInput("", (im,)) for im in imgs]
    if case == "image_text":
        return [EmbedInput(t, (im,)) for t, im in zip(texts, imgs)]
    if case == "video":
        return [EmbedInput("A short clip.", video=_video(model, 4, 2, 3, 0)),
                EmbedInput("", video=_video(model, 6, 3, 2, 1))]
    if case == "mixed":  # text, image and video rows in one batch (Qwen3-VL: joint DeepStack rows)
        return [EmbedInput(texts[0]), EmbedInput(texts[1], (imgs[0],)),
                EmbedInput("A clip.", video=_video(model, 4, 2, 2, 2)), EmbedInput("", (imgs[1],))]
    raise ValueError(case)


def _batch(model, inputs):
    return model._collator(model._tok.tokenize(inputs))


def _stock_embedding(model, stock, batch, positions: str) -> torch.Tensor:
    """Reference: the stock ``...Model.forward`` with an explicit bidirectional key mask, mean-pooled over pool_mask."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    b, length = ids.shape
    mask = torch.zeros(b, 1, length, length, device=ids.device).masked_fill(attn[:, None, None, :] == 0,
                                                                      torch.finfo(torch.float32).min)
    if positions == "1d":
        pos = ((attn.cumsum(-1) - 1).clamp(min=0)).unsqueeze(0).expand(3, -1, -1)
    else:
        cfg = stock.config
        mm = (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()
        pos, _ = stock.model.get_rope_index(ids, mm, image_grid_thw=batch.get("image_grid_thw"),
                                            video_grid_thw=batch.get("video_grid_thw"), attention_mask=attn)
    with torch.no_grad():
        out = stock.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                          pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
                          pixel_values_videos=batch.get("pixel_values_videos"),
                          video_grid_thw=batch.get("video_grid_thw"))
    pool = batch["pool_mask"].unsqueeze(-1).float()
    return F.normalize((out.last_hidden_state.float() * pool).sum(1) / pool.sum(1), dim=-1)


def _ours(model, batch, positions: str) -> torch.Tensor:
    emb = model.embedder
    old, emb.positions = emb.positions, positions
    try:
        with torch.no_grad():
            return emb(**batch)
    finally:
        emb.positions = old


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("case", ["text", "image", "image_text", "video"])
@pytest.mark.parametrize("n", [1, "N"])
def test_embedding_equals_the_stock_forward(models, backbone, case, n):
    model, stock = models[backbone]
    inputs = _inputs(model, case)
    batch = _batch(model, inputs[:1] if n == 1 else inputs)
    if n == "N":
        assert not bool(batch["attention_mask"].all())  # padded
    if case in ("image", "image_text"):
        assert batch["pixel_values"].shape[1] == 3 * 2 * model.patch_spec.patch_size ** 2
    torch.testing.assert_close(_ours(model, batch, "1d"), _stock_embedding(model, stock, batch, "1d"),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("positions", ["1d", "mrope"])
def test_mixed_batch_equals_the_stock_forward(models, backbone, positions):
    model, stock = models[backbone]
    batch = _batch(model, _inputs(model, "mixed"))
    assert "pixel_values" in batch and "pixel_values_videos" in batch
    ours = _ours(model, batch, positions)
    torch.testing.assert_close(ours, _stock_embedding(model, stock, batch, positions), atol=ATOL, rtol=0)
    if positions == "mrope":  # the option is not a no-op on visual rows
        assert (ours - _ours(model, batch, "1d")).abs().max() > 1e-4


def test_deepstack_is_part_of_the_qwen3_embedding(models, monkeypatch):
    """Without the DeepStack inputs our Qwen3-VL embedding leaves the stock one: the parity above tests them."""
    model, stock = models["qwen3_vl"]
    batch = _batch(model, _inputs(model, "mixed"))
    ref = _stock_embedding(model, stock, batch, "1d")
    monkeypatch.setattr(Qwen3VLSpec, "deepstack_inject", lambda self, found: {})
    without = _ours(model, batch, "1d")
    visual_rows = [1, 2, 3]
    assert (without[visual_rows] - ref[visual_rows]).abs().max() > 1e-4
    torch.testing.assert_close(without[0], ref[0], atol=ATOL, rtol=0)  # the text-only row has no DeepStack


def test_qwen25_images_span_several_attention_windows(models):
    model, _ = models["qwen2_5_vl"]
    vc = model.embedder.config.vision_config
    window = vc.window_size // vc.patch_size // vc.spatial_merge_size  # merged units per window side
    batch = _batch(model, _inputs(model, "image"))
    grids = batch["image_grid_thw"] // torch.tensor([1, vc.spatial_merge_size, vc.spatial_merge_size])
    assert bool((grids[:, 1:] > window).any()) and vc.fullatt_block_indexes != list(range(vc.depth))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_eager_attention_gives_the_same_embedding(models, backbone, tmp_path):
    """Without padding no mask is needed under sdpa; eager attention needs one (Qwen3-VL's text model would
    build a causal one from ``None``): both equal the stock forward."""
    from umarvel import UMarvel

    model, stock = models[backbone]
    model.embedder.hf_model.save_pretrained(str(tmp_path / "ckpt"))
    model.tokenizer.save_pretrained(str(tmp_path / "ckpt"))
    model.image_processor.save_pretrained(str(tmp_path / "ckpt"))
    eager = UMarvel.from_pretrained(tmp_path / "ckpt", attn_implementation="eager")
    for inputs in (_inputs(model, "text")[:1], _inputs(eager, "mixed")):
        batch = _batch(eager, inputs)
        torch.testing.assert_close(_ours(eager, batch, "1d"), _stock_embedding(model, stock, batch, "1d"),
                                   atol=ATOL, rtol=0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_attention_is_bidirectional_in_unpadded_batches(models, backbone):
    model, _ = models[backbone]
    b1 = _batch(model, [EmbedInput("A red ball on the table.")])
    ids2 = b1["input_ids"].clone()
    ids2[:, -3] = 1234
    emb = model.embedder
    with torch.no_grad():
        h1 = emb.hidden_states(b1["input_ids"], b1["attention_mask"])
        h2 = emb.hidden_states(ids2, b1["attention_mask"])
        assert (h1[:, 0] - h2[:, 0]).abs().max() > 1e-6
        emb.set_attention("causal")
        try:
            c1 = emb.hidden_states(b1["input_ids"], b1["attention_mask"])
            c2 = emb.hidden_states(ids2, b1["attention_mask"])
        finally:
            emb.set_attention("bidirectional")
    torch.testing.assert_close(c1[:, :-3], c2[:, :-3])


def test_registry_lists_the_three_backbones_and_rejects_others(tmp_path):
    assert [get_backbone_spec(b).model_type for b in BACKBONES] == list(BACKBONES)
    with pytest.raises(CheckpointError, match=r"unsupported backbone model_type 'llava'.*qwen2_5_vl.*qwen3_vl"):
        get_backbone_spec("llava")
    from umarvel import UMarvel

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(CheckpointError, match="supported: \\['qwen2_5_vl', 'qwen2_vl', 'qwen3_vl'\\]"):
        UMarvel.from_pretrained(tmp_path)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_lora_targets_the_language_model_only(models, backbone):
    from umarvel.model.lora import make_lora_config
    from peft import get_peft_model

    model, stock = models[backbone]
    peft = get_peft_model(copy.deepcopy(stock), make_lora_config(model.embedder, r=2, alpha=4))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in peft.named_parameters() if ".lora_A" in n}
    layers = stock.config.text_config.num_hidden_layers
    assert len(wrapped) == 7 * layers
    assert all(".language_model.layers." in n and "visual" not in n for n in wrapped)


@pytest.mark.parametrize("backbone,ids,system", [("qwen2_vl", [151657, 151658, 151659], True),
                                                  ("qwen2_5_vl", [151665, 151666, 151667], True),
                                                  ("qwen3_vl", [151669, 151670, 151671], False)])
def test_tokens_template_and_budget_per_backbone(models, backbone, ids, system):
    model, _ = models[backbone]
    assert [model.tokenizer.convert_tokens_to_ids(t) for t in ("<emb>", "<instruction_start>", "<instruction_end>")] \
        == ids
    rendered = model._tok.render(EmbedInput("A red ball."))
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.") is system  # D17
    assert rendered.endswith("A red ball.\nSummarize above sentence in one word: <|im_end|>\n<|im_start|>assistant\n"
                             "<emb>.<|im_end|>\n<|im_start|>assistant\n")
    f = 32 if backbone == "qwen3_vl" else 28
    assert (model.budget.factor, model.budget.min_pixels, model.budget.max_pixels) == (f, 4 * f * f, 300 * f * f)
    im = load_image(_picture((500, 260), (1, 2, 3)), model.budget)
    assert im.width % f == 0 and im.height % f == 0 and im.width * im.height <= 300 * f * f


def test_qwen3_video_prompt_has_one_timestamped_block_per_temporal_patch(models):
    model, _ = models["qwen3_vl"]
    video = _video(model, 6, 2, 2, 0)  # 3 temporal patches of 2x2 merged tokens
    rendered = model._tok.render(EmbedInput("Clip.", video=video))
    assert "<|vision_start|><0.5 seconds><|vision_start|>" not in rendered
    assert ("<0.5 seconds><|vision_start|><|video_pad|><|vision_end|><2.0 seconds><|vision_start|><|video_pad|>"
            "<|vision_end|><3.5 seconds><|vision_start|><|video_pad|><|vision_end|>Clip.") in rendered
    ids = model._tok.tokenize([EmbedInput("Clip.", video=video)])[0].input_ids
    vs = model.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert ids.count(model.embedder.config.video_token_id) == 3 * 4 and ids.count(vs) == 3
    qwen2, _ = models["qwen2_vl"]
    assert qwen2._tok.render(EmbedInput("Clip.", video=_video(qwen2, 6, 2, 2, 0))).count("<|vision_start|>") == 1


def test_missing_processor_files_are_named_and_the_backbone_files_used(models, tmp_path, caplog):
    from umarvel import UMarvel
    from umarvel.data.processor import load_image_processor, load_tokenizer

    with pytest.raises(CheckpointError, match=r"no tokenizer files \(needs tokenizer.json or vocab.json \+ merges.txt"):
        load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="no preprocessor_config.json"):
        load_image_processor(tmp_path, 3136, 235200)
    # A Qwen3-VL checkpoint folder with weights only: warned about by name, loaded with the Qwen3-VL files.
    model, _ = models["qwen3_vl"]
    bare = tmp_path / "bare"
    model.embedder.hf_model.save_pretrained(str(bare))
    with caplog.at_level(logging.WARNING, logger="umarvel.model.loading"):
        loaded = UMarvel.from_pretrained(bare)
    text = caplog.text
    assert "no tokenizer files (tokenizer.json or vocab.json + merges.txt)" in text and "bundled Qwen3-VL" in text
    assert "no preprocessor_config.json" in text
    assert loaded.patch_spec.patch_size == 16 and len(loaded.tokenizer) == 151672


def test_a_processor_of_another_family_is_refused(models, tmp_path):
    from umarvel import UMarvel
    from umarvel.data.processor import BUNDLED_PROCESSOR_DIRS

    model, _ = models["qwen3_vl"]
    folder = tmp_path / "mixed"
    model.embedder.hf_model.save_pretrained(str(folder))
    shutil.copy(BUNDLED_PROCESSOR_DIRS["qwen2_vl"] / "preprocessor_config.json", folder)
    with pytest.raises(CheckpointError, match=r"\(patch, merge, temporal patch\) \(14, 2, 2\) do not match the "
                                              r"Qwen3-VL vision tower's \(16, 2, 2\)"):
        UMarvel.from_pretrained(folder)


@pytest.mark.parametrize("backbone", ["qwen2_5_vl", "qwen3_vl"])
def test_save_and_reload_keeps_the_backbone_and_the_vectors(models, backbone, tmp_path):
    from umarvel import UMarvel

    model, _ = models[backbone]
    items = [{"text": "a red ball", "instruction": "find it"}, {"image": _picture((90, 70), (200, 30, 30))}]
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == backbone
    again = UMarvel.from_pretrained(tmp_path / "saved")
    assert type(again.embedder.spec) is type(model.embedder.spec)
    np.testing.assert_allclose(again.encode_queries(items), model.encode_queries(items), atol=1e-6)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_packed_row_equals_the_padded_batch(models, backbone, attention):
    """The packed forward goes through the same hooks: per-sequence positions, DeepStack at the packed row's
    visual positions, and (Qwen3-VL) no mask, so the block-diagonal packed attention is all there is."""
    from umarvel.data.packing import PackedCollator

    model, stock = models[backbone]
    assert model.embedder.supports_packing
    tokenized = model._tok.tokenize(_inputs(model, "mixed"))
    padded = model._collator(tokenized)
    packed = PackedCollator(model.tokenizer, model.image_processor)(tokenized)
    assert packed["input_ids"].shape[0] == 1 and "pixel_values_videos" in packed
    model.embedder.set_attention(attention)
    try:
        with torch.no_grad():
            a, b = model.embedder(**padded), model.embedder(**packed)
    finally:
        model.embedder.set_attention("bidirectional")
    torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
    if attention == "bidirectional":
        torch.testing.assert_close(b, _stock_embedding(model, stock, padded, "1d"), atol=ATOL, rtol=0)
