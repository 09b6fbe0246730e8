"""The whole recipe on tiny random Qwen2.5-VL and Qwen3-VL models, in process: stages 1-5 chained through
``init_from`` (each reading the backbone from the previous folder's config), mining, the point-wise reranker,
the teacher lists, M-BEIR evaluation and the zero-shot suite (an image, a composed-image and a video set).
Qwen2-VL runs the same steps in tests/train, tests/pipelines, tests/rerank and tests/eval.

SLOW: about a minute per backbone on 2 CPU cores (one optimiser step per stage).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import REPO, make_data, tiny_config

pytestmark = pytest.mark.slow

TASKS = ("mscoco_task0", "webqa_task1")
ZS_TASKS = "flickr30k,circo,msvd"


def _stage(name: str, init_from: Path, out: Path, *overrides: str):
    from umarvel.train.config import load_stage_config

    common = ["model.dtype=float32", "model.gradient_checkpointing=false", "train.deepspeed=null", "train.max_steps=1",
              "train.save_steps=1", "lora.r=4", "lora.alpha=8", "data.num_workers=0", "train.device=cpu",
              "train.report_to=[]", "data.path=null", "data.pool=null", "data.instructions=null",
              f"init_from={init_from}", f"train.output_dir={out}"]
    return load_stage_config(REPO / "configs" / "stages" / name, common + list(overrides))


def _train(cfg) -> Path:
    from umarvel.train.stage import stage_trainer

    state = stage_trainer(cfg).train()
    assert state.global_step == 1 and all(math.isfinite(h["loss"]) for h in state.history)
    return Path(cfg.train.output_dir) / "merged"


@pytest.mark.parametrize("backbone", ["qwen2_5_vl", "qwen3_vl"])
def test_recipe_end_to_end(backbone, tmp_path):
    from umarvel import UMarvel
    from umarvel.config import load_config
    from umarvel.data.synthetic import make_synthetic_mbeir
    from umarvel.eval.mbeir.runner import MBeirEvalConfig, evaluate_mbeir
    from umarvel.eval.zeroshot.fixtures import write_zeroshot_fixture
    from umarvel.eval.zeroshot.runner import run_zeroshot
    from umarvel.model.tiny import save_tiny_checkpoint
    from umarvel.pipelines.mining import MineConfig, mine
    from umarvel.pipelines.teacher import TeacherConfig, build_teacher_file
    from umarvel.rerank.model import load_reranker
    from umarvel.rerank.train import RerankTrainConfig, train_reranker
    from umarvel.train.stage import stage_trainer

    base = save_tiny_checkpoint(tmp_path / "base", seed=0, backbone=backbone)
    toy = make_data(tmp_path / "toy")
    root = make_synthetic_mbeir(tmp_path / "mbeir", seed=2, n_queries_per_task=2, n_candidates_per_task=5,
                                image_size=40, n_train_queries_per_task=4, tasks=TASKS)

    # stages 1-3: each starts from the previous merged folder and keeps the backbone
    model_dir = base
    for kind in ("nli", "cc3m", "mbeir"):
        cfg = tiny_config(kind, model_dir, toy, tmp_path / kind, "train.max_steps=1", "train.save_steps=1",
                          "model.gradient_checkpointing=false", "train.report_to=[]")
        trainer = stage_trainer(cfg)
        assert trainer.task.embedder.spec.model_type == backbone
        assert trainer.train().global_step == 1
        model_dir = tmp_path / kind / "merged"
        assert json.loads((model_dir / "config.json").read_text())["model_type"] == backbone
    stage3 = model_dir

    # mining with the stage-3 model, the reranker on the local lists, stage 4 on the global hard negatives
    files = mine(MineConfig(model=str(stage3), mbeir_root=str(root), output=str(tmp_path / "mined3"), top_k=6,
                            subset_fraction=0.5, device="cpu", dtype="float32"))
    rerank_base = save_tiny_checkpoint(tmp_path / "rerank_base", seed=1, backbone=backbone, initializer_range=0.3)
    train_reranker(load_config(REPO / "configs" / "rerank" / "reranker.yaml", RerankTrainConfig, [
        f"model.init_from={rerank_base}", "model.dtype=float32", "model.gradient_checkpointing=false",
        f"data.mbeir_root={root}", f"data.mined={files['local']}", "data.num_workers=0", "lora.r=4", "lora.alpha=8",
        f"train.output_dir={tmp_path / 'rerank'}", "train.per_device_queries=2", "train.gradient_accumulation_steps=1",
        "train.max_steps=1", "train.bf16=false", "train.device=cpu", "train.save_steps=0"]))
    reranker = load_reranker(tmp_path / "rerank" / "merged", dtype="float32")
    assert reranker.model.spec.model_type == backbone
    stage4 = _train(_stage("04_mbeir_hardneg.yaml", stage3, tmp_path / "s4", f"data.root={root}",
                           f"data.negatives={files['global']}", "data.num_hard_negatives=2",
                           "train.per_device_batch_size=3"))

    # stage-4 lists of the subset, the teacher (reranker P(yes) fused with the cosines), stage 5
    sub = mine(MineConfig(model=str(stage4), mbeir_root=str(root), output=str(tmp_path / "mined4"),
                          queries=str(files["subset"]), scope="local", subset=False, top_k=5, device="cpu",
                          dtype="float32"))
    teacher = build_teacher_file(TeacherConfig(reranker=str(tmp_path / "rerank" / "merged"), mbeir_root=str(root),
                                               queries=str(files["subset"]), mined=str(sub["local"]),
                                               output=str(tmp_path / "teacher"), top_k=4, device="cpu",
                                               dtype="float32"), reranker=reranker)
    lines = [json.loads(x) for x in teacher.read_text().splitlines()]
    assert lines and all(len(x["p_yes"]) == 4 and all(0 <= p <= 1 for p in x["p_yes"]) for x in lines)
    stage5 = _train(_stage("05_mbeir_distill.yaml", stage4, tmp_path / "s5", f"data.root={root}",
                           f"data.path={files['subset']}", f"data.scores={teacher}", "data.num_candidates=4",
                           "train.per_device_batch_size=2"))

    # evaluation of the final model: M-BEIR (local pools) and the zero-shot sets
    final = UMarvel.from_pretrained(stage5, device="cpu", dtype="float32")
    assert final.embedder.spec.model_type == backbone
    res = evaluate_mbeir(final, MBeirEvalConfig(model=str(stage5), mbeir_root=str(root), protocol="local",
                                                split="test", output=str(tmp_path / "eval"), device="cpu"))
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res is not None and {t["name"] for t in results["tasks"]} == set(TASKS), results
    assert all(0 <= t["value"] <= 100 for t in results["tasks"])
    zs = run_zeroshot(final, write_zeroshot_fixture(tmp_path / "zs"), tmp_path / "zs_out", tasks=ZS_TASKS)
    assert {t["name"]: t["status"] for t in zs["tasks"]} == {n: "ok" for n in ZS_TASKS.split(",")}, zs
    factor = 32 if backbone == "qwen3_vl" else 28
    assert zs["video_specs"]["msvd"]["factor"] == factor and zs["video_specs"]["msvd"]["min_pixels"] == 128 * factor ** 2
