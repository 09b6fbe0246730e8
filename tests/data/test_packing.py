"""Packed batches (umarvel.data.packing): first-fit-decreasing plans, packed rows, masks, visuals."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from umarvel.data.collate import EmbedInput, EmbeddingCollator, instruction_mask, pad_sequences
from umarvel.data.packing import HOST_KEYS, PackedCollator, is_packed, pack_padded, plan_packs, to_device


def test_plan_packs_covers_every_index_within_budget_and_item_cap():
    rng = random.Random(0)
    lengths = [rng.randint(1, 90) for _ in range(200)]
    packs = plan_packs(lengths, max_tokens=256, max_items=7)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    for p in packs:
        assert sum(lengths[i] for i in p) <= 256 and len(p) <= 7
    # first-fit decreasing: within 20% of the lower bound on this mix
    assert len(packs) <= 1.2 * max(sum(lengths) / 256, len(lengths) / 7) + 1


def test_plan_packs_first_fit_decreasing_hand_checked():
    # sorted: 7(i1) 5(i0) 4(i3) 3(i2) 2(i4) 1(i5); budget 10
    # 7 -> A; 5 -> B; 4 -> B (9); 3 -> A (10); 2 -> C; 1 -> B (10)
    assert plan_packs([5, 7, 3, 4, 2, 1], max_tokens=10) == [[1, 2], [0, 3, 5], [4]]


def test_plan_packs_oversized_item_gets_its_own_pack():
    assert plan_packs([50, 3, 4], max_tokens=10) == [[0], [2, 1]]
    with pytest.raises(ValueError):
        plan_packs([1], max_tokens=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_pack_padded_positions_restart_per_sequence(side):
    ids, attn = pad_sequences([[5, 6, 7], [8], [9, 10]], 0, side)
    packed = pack_padded({"input_ids": ids, "attention_mask": attn})
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]] and packed["attention_mask"].tolist() == [[1] * 6]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert packed["cu_seqlens"].tolist() == [0, 3, 4, 6] and packed["cu_seqlens"].dtype == torch.int32
    assert packed["seq_lens"].tolist() == [3, 1, 2]


def test_packed_instruction_mask_equals_per_sequence_mask_and_does_not_leak():
    seqs = [[1, 100, 2, 101, 3], [100, 4, 5], [6, 100, 7, 101]]  # the middle span is never closed
    ids, attn = pad_sequences(seqs, 0, "left")
    got = pack_padded({"input_ids": ids, "attention_mask": attn,
                       "instruction_mask": instruction_mask(ids, 100, 101)})["instruction_mask"][0].tolist()
    want = [v for s in seqs for v in instruction_mask(torch.tensor([s]), 100, 101)[0].tolist()]
    assert got == want
    assert got[8:] == [0, 1, 1, 1]  # the third sequence starts outside any span


def test_packed_collator_matches_padded_collator(tiny_model, sample_images):
    from umarvel.data.images import load_image

    im = load_image(sample_images["blue"], tiny_model.budget)
    inputs = [EmbedInput("<instruction_start>Find it.<instruction_end> a red ball.", (im,)),
              EmbedInput("plain text"), EmbedInput("", (load_image(sample_images["red"], tiny_model.budget),))]
    tokenized = tiny_model._tok.tokenize(inputs)
    padded = EmbeddingCollator(tiny_model.tokenizer, tiny_model.image_processor, padding_side="right")(tokenized)
    packed = PackedCollator(tiny_model.tokenizer, tiny_model.image_processor)(tokenized)
    assert is_packed(packed) and not is_packed(padded)
    real = padded["attention_mask"].bool()
    for key in ("input_ids", "instruction_mask", "pool_mask"):
        assert packed[key][0].tolist() == padded[key][real].tolist(), key
    assert packed["input_ids"].shape[1] == int(real.sum())  # no padding at all
    np.testing.assert_array_equal(packed["pixel_values"].numpy(), padded["pixel_values"].numpy())
    np.testing.assert_array_equal(packed["image_grid_thw"].numpy(), padded["image_grid_thw"].numpy())


def test_to_device_keeps_host_keys():
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "seq_lens": torch.tensor([3])}
    out = to_device(batch, "meta")
    assert out["input_ids"].device.type == "meta" and out["seq_lens"].device.type == "cpu"
    assert "seq_lens" in HOST_KEYS


def test_chunk_bounds_small_first_chunk():
    from umarvel.data.packing import chunk_bounds

    assert chunk_bounds(1000, 400, first=64) == [0, 64, 464, 864, 1000]
    assert chunk_bounds(50, 400, first=64) == [0, 50]
    assert chunk_bounds(0, 400, first=64) == [0]
    assert chunk_bounds(800, 400) == [0, 400, 800]


def test_chunk_bounds_give_every_preprocessing_worker_a_chunk():
    """A small job is cut so that all workers decode in parallel; a large one keeps the full chunk size."""
    from umarvel.data.packing import chunk_bounds

    small = chunk_bounds(1024, 512, first=64, workers=8)  # was [0, 64, 576, 1024]: 3 chunks for 8 workers
    assert small[:2] == [0, 64] and small[-1] == 1024 and len(small) - 2 >= 8
    assert all(b - a == 120 for a, b in zip(small[1:-2], small[2:-1]))
    assert chunk_bounds(300, 512, first=64, workers=8)[:3] == [0, 64, 128]  # never below the first chunk's size
    assert chunk_bounds(100_000, 512, first=64, workers=8) == chunk_bounds(100_000, 512, first=64)
    assert chunk_bounds(1024, 512, first=64, workers=1) == [0, 64, 576, 1024]
    assert chunk_bounds(1000, 400, workers=4) == [0, 250, 500, 750, 1000]
