"""Stage configs (published hyperparameters, unknown keys, overrides) and clear data errors (file:line)."""
from __future__ import annotations

import json

import pytest
from helpers import REPO, make_data, tiny_config

from umarvel.errors import ConfigError, DataError, ImageLoadError
from umarvel.train.config import load_stage_config
from umarvel.train.datasets import Cc3mDataset, MbeirTrainDataset, NliDataset

STAGES = REPO / "configs" / "stages"


def test_published_hyperparameters_and_chaining():
    s1, s2, s3 = (load_stage_config(STAGES / f) for f in ("01_nli.yaml", "02_cc3m.yaml", "03_mbeir.yaml"))
    assert (s1.lora.r, s1.lora.alpha, s1.train.learning_rate, s1.train.per_device_batch_size, s1.train.num_epochs) \
        == (64, 128, 2e-4, 72, 2)
    assert (s2.lora.r, s2.lora.alpha, s2.train.learning_rate, s2.train.per_device_batch_size, s2.train.num_epochs) \
        == (128, 256, 1e-4, 60, 1)
    assert (s3.lora.r, s3.lora.alpha, s3.train.learning_rate, s3.train.per_device_batch_size, s3.train.num_epochs) \
        == (128, 256, 4e-4, 60, 1)
    assert s2.loss.bidirectional and not s1.loss.bidirectional and not s3.loss.bidirectional
    assert not s1.temperature.learnable and not s2.temperature.learnable and s3.temperature.learnable
    assert s3.data.mask_instruction and not s2.data.mask_instruction
    assert all(s.data.suffix and not s.data.add_generation_prompt for s in (s1, s2, s3))  # D3, D4
    assert all(s.model.dtype == "bfloat16" and s.model.gradient_checkpointing for s in (s1, s2, s3))
    assert all(s.train.warmup_ratio == 0.03 and s.train.lr_scheduler == "cosine" for s in (s1, s2, s3))
    assert s2.init_from == s1.train.output_dir + "/merged" and s3.init_from == s2.train.output_dir + "/merged"
    for s in (s1, s2, s3):
        assert (REPO / s.train.deepspeed).is_file()
        json.loads((REPO / s.train.deepspeed).read_text())


def test_unknown_keys_and_bad_overrides_are_clear():
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rat'.*learning_rate"):
        load_stage_config(STAGES / "01_nli.yaml", ["train.learning_rat=1e-4"])
    with pytest.raises(ConfigError, match=r"train.per_device_batch_size"):
        load_stage_config(STAGES / "01_nli.yaml", ["train.per_device_batch_size=many"])
    cfg = load_stage_config(STAGES / "01_nli.yaml", ["train.learning_rate=1e-5", "lora.r=8"])
    assert cfg.train.learning_rate == 1e-5 and cfg.lora.r == 8


def test_unknown_key_in_a_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((STAGES / "01_nli.yaml").read_text() + "\nextra_section: {a: 1}\n")
    with pytest.raises(ConfigError, match=rf"{bad}.*unknown key 'extra_section'"):
        load_stage_config(bad)


def test_cli_reports_config_errors(capsys):
    from umarvel.commands.train import main

    assert main([str(STAGES / "01_nli.yaml"), "loss.kindd=x"]) == 2


def test_unknown_kinds(tiny_checkpoint, tmp_path):
    from umarvel.train.stage import stage_trainer

    data = make_data(tmp_path / "toy")
    with pytest.raises(ConfigError, match="unknown data.kind 'nope'"):
        stage_trainer(tiny_config("nli", tiny_checkpoint, data, tmp_path / "run", "data.kind=nope"))
    with pytest.raises(ConfigError, match="unknown loss.kind 'nope'"):
        stage_trainer(tiny_config("nli", tiny_checkpoint, data, tmp_path / "run", "loss.kind=nope"))


def test_bad_nli_line(tmp_path):
    f = tmp_path / "nli.csv"
    f.write_text("sent0,sent1,hard_neg\na,b,c\n\"quoted, with comma\",d,e\nonly,two\n")
    with pytest.raises(DataError, match=rf"{f}:4: expected 3 columns"):
        NliDataset.from_file(f)
    f.write_text("sent0,sent1,hard_neg\na,,c\n")
    with pytest.raises(DataError, match=rf"{f}:2: empty sent0 or sent1"):
        NliDataset.from_file(f)
    ok = tmp_path / "ok.csv"
    ok.write_text("sent0,sent1,hard_neg\na,b,c\n\"quoted, with comma\",d,e\n")
    assert NliDataset.from_file(ok).rows[1][0] == "quoted, with comma"


def test_bad_cc3m_record(tmp_path):
    f = tmp_path / "anno.json"
    f.write_text(json.dumps({"GCC_1": {"h5v": "x.png", "instruct_ans": ["ok"]}, "GCC_2": {"h5v": "y.png"}}))
    with pytest.raises(DataError, match=rf"{f}: record 'GCC_2': 'instruct_ans'"):
        Cc3mDataset.from_file(f, tmp_path)
    f.write_text('{"GCC_1": {"h5v": "x.png",\n "instruct_ans": ["ok"],}}')
    with pytest.raises(DataError, match=rf"{f}:2: malformed JSON"):
        Cc3mDataset.from_file(f, tmp_path)


def test_bad_mbeir_line_and_missing_image(tmp_path):
    data = make_data(tmp_path / "toy")
    root = data["mbeir"]
    q = root / "query/union_train/mbeir_union_up_train.jsonl"
    pool = root / "cand_pool/global/mbeir_union_train_cand_pool.jsonl"
    tsv = root / "instructions/query_instructions.tsv"
    lines = q.read_text().splitlines()
    bad = tmp_path / "q.jsonl"
    bad.write_text("\n".join(lines[:2] + ['{"qid": "9:1", oops'] + lines[2:]) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:3: malformed JSON"):
        MbeirTrainDataset.from_files(bad, pool, tsv, root)
    rec = json.loads(lines[0])
    rec["pos_cand_list"] = ["9:999999"]
    bad.write_text(json.dumps(rec) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:1: positive\(s\) \['9:999999'\]"):
        MbeirTrainDataset.from_files(bad, pool, tsv, root)

    # an image that disappeared after reading: the collator names the path
    from umarvel.data.formatting import TRAIN_STYLE
    from umarvel.data.processor import BUNDLED_PROCESSOR_DIR, load_image_processor, load_tokenizer
    from umarvel.train.batching import PairCollator
    from umarvel.train.datasets import Side, TrainExample

    col = PairCollator(load_tokenizer(BUNDLED_PROCESSOR_DIR), load_image_processor(BUNDLED_PROCESSOR_DIR, 3136, 235200),
                       TRAIN_STYLE)
    missing = tmp_path / "gone.png"
    with pytest.raises(ImageLoadError, match=str(missing)):
        col([TrainExample(Side("q"), (Side("", str(missing)),))])
