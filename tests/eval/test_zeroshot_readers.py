"""Zero-shot readers on the generated tiny fixture (umarvel.eval.zeroshot.fixtures)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from umarvel.errors import DataError
from umarvel.eval.zeroshot import instructions as ins
from umarvel.eval.zeroshot.fixtures import FIXTURE_SIZES, write_zeroshot_fixture
from umarvel.eval.zeroshot.readers import SET_NAMES, read_set, read_sets
from umarvel.eval.zeroshot.readers_captions import read_ccneg
from umarvel.eval.zeroshot.readers_sequences import read_vist
from umarvel.eval.zeroshot.types import (BidirectionalSet, GallerySet, PairSet, RetrievalSet, Skipped, ZSItem)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_zeroshot_fixture(tmp_path_factory.mktemp("zs"))


def _sizes(s) -> tuple[int, int]:
    if isinstance(s, (RetrievalSet, GallerySet)):
        return len(s.queries), len(s.candidates)
    if isinstance(s, BidirectionalSet):
        return len(s.texts), len(s.images)
    return len(s.images), len(s.positives)


def test_every_set_reads_with_expected_sizes_and_existing_files(root):
    sets = read_sets(root, list(SET_NAMES) + ["circo_test"])
    for name, s in sets.items():
        assert not isinstance(s, Skipped), s
        assert _sizes(s) == FIXTURE_SIZES[name], name
        items = []
        for field in ("queries", "candidates", "texts", "images", "positives", "negatives"):
            v = getattr(s, field, ())
            if v and isinstance(v[0], ZSItem):
                items += list(v)
        for it in items:
            for p in [it.image, it.video] + [v for kind, v in it.segments if kind == "image"]:
                if p is not None:
                    assert Path(p).is_file(), (name, p)


def test_circo(root):
    s = read_set("circo", root)
    assert s.metric == "map" and s.suffix is False
    ids = [c.id for c in s.candidates]
    q0 = s.queries[0]
    assert q0.text == "has a dog" and q0.instruction == ins.CIRCO and q0.image.endswith("000000000011.jpg")
    assert [ids[i] for i in s.positives[0]] == ["12", "13", "14"] and ids[s.targets[0]] == "12"
    assert [ids[i] for i in s.positives[1]] == ["16"]
    assert q0.final_text() == ("<instruction_start>I'm looking for a similar everyday image with the described "
                               "changes.<instruction_end> has a dog")  # caption raw, as the official script
    t = read_set("circo_test", root)
    assert t.positives == ((),) and t.queries[0].id == "7" and t.targets == ()


def test_genecis_galleries_and_instructions(root):
    co = read_set("genecis_change_object", root)
    ids = [c.id for c in co.candidates]
    assert [[ids[i] for i in g] for g in co.galleries] == [["000000000002", "000000000003", "000000000004"],
                                                            ["000000000005", "000000000002", "000000000003"]]
    assert co.queries[1].image.endswith("val2017/000000000004.jpg") and co.queries[1].text == "bus"
    assert co.queries[0].instruction == ins.GENECIS_CHANGE
    assert read_set("genecis_focus_object", root).queries[0].instruction == ins.GENECIS_CHANGE
    fa = read_set("genecis_focus_attribute", root)
    assert fa.queries[0].instruction == ins.GENECIS_FOCUS_ATTRIBUTE
    assert fa.queries[1].image.endswith("vg/focus_attribute/2010_1_0.jpg")
    assert [fa.candidates[i].id for i in fa.galleries[1]] == ["2011_1_1", "2012_1_2", "2013_1_3"]


def test_flickr_lamra_layout_instruction_without_space_and_suffix(root):
    s = read_set("flickr30k", root)
    assert s.suffix is True and s.text_to_image == (0,) * 5 + (1,) * 5
    assert s.images[1].image.endswith("flickr/images/1.png") and s.images[0].instruction is None
    t = s.texts[6]
    assert t.text == "a photo number 1 caption 1" and t.instruction == ins.CAPTION_TO_IMAGE
    assert t.final_text() == ("<instruction_start>Find me an everyday image that matches the given caption."
                              "<instruction_end>A photo number 1 caption 1.")  # format_string(caption), no space


def test_coco_karpathy_layout_keeps_five_test_captions(root):
    s = read_set("mscoco5k", root)
    assert s.suffix is False and s.text_to_image == (0,) * 5 + (1,) * 5
    assert s.images[0].image.endswith("coco/images/val2014/COCO_val2014_000000000000.jpg")
    assert s.texts[4].text == "coco image 0 says 4" and s.texts[5].text == "coco image 1 says 0"
    assert all(t.instruction is None for t in s.texts) and all(i.instruction is None for i in s.images)


def test_sharegpt4v_and_urban1k_sides(root):
    sg = read_set("sharegpt4v", root)
    assert sg.texts[2].instruction == ins.CAPTION_TO_IMAGE and sg.texts[2].instruction_sep == ""
    assert sg.texts[2].final_text() == ("<instruction_start>Find me an everyday image that matches the given "
                                        "caption.<instruction_end>A long detailed caption 2.")
    assert sg.images[2].instruction is None
    ub = read_set("urban1k", root)
    assert [Path(i.image).name for i in ub.images] == ["1.jpg", "2.jpg", "10.jpg"]
    assert [t.text for t in ub.texts] == ["Urban scene 1.", "Urban scene 2.", "Urban scene 10."]
    assert ub.images[0].instruction == ins.IMAGE_TO_CAPTION_EVERYDAY and ub.texts[0].instruction is None
    # plain string by default; the official Python-set literal "{'...'}" with compat="official"
    plain = "<instruction_start>Find an image caption describing the following everyday image.<instruction_end>"
    assert ub.images[0].final_text() == plain
    assert ub.images[0].final_text("official") == "{'" + plain + "'}"
    assert ub.texts[0].final_text("official") == "Urban scene 1."


def test_visdial_dialog_text(root):
    s = read_set("visdial", root)
    assert s.queries[0].text == "Q: is it sunny? A: yes. Q: how many people? A: 2."
    assert s.queries[1].text == "Q: what color is the car?? A: red."  # as the official script joins it
    assert s.queries[0].instruction == ins.DIALOG_TO_IMAGE and s.positives == ((0,), (1,))
    assert s.candidates[1].image.endswith("VisualDialog_val2018_000000284024.jpg")


def test_vist_story_order_exclusion_and_quirk(root):
    s = read_set("vist", root)
    assert [q.id for q in s.queries] == ["s1", "s2"]          # s3 dropped: image 399 missing
    q = s.queries[0]
    kinds = [k for k, _ in q.segments]
    assert kinds == ["text"] + ["text", "image"] * 4 + ["text"]
    assert q.segments[0] == ("text", ins.VIST) and q.instruction is None
    assert q.segments[1] == ("text", "s1 sentence 0") and q.segments[-1] == ("text", "s1 sentence 4")
    assert q.segments[4][1].endswith("102.png")               # extension found on disk
    ids = [c.id for c in s.candidates]
    assert ids[s.positives[0][0]] == "105" and sorted(ids[i] for i in s.exclude[0]) == ["101", "102", "103", "104"]
    assert ids.count("104") == 1                              # shared photo is one candidate
    quirk = read_vist(root, drop_fourth=True).queries[0]
    assert [v for k, v in quirk.segments if k == "text"][1:] == ["s1 sentence 0", "s1 sentence 1", "s1 sentence 2",
                                                                 "s1 sentence 4"]


def test_ccneg_last_n_prefix_rewrite_and_commas(root):
    s = read_ccneg(root, n_eval=3)
    assert [i.id for i in s.images] == ["1", "2", "3"]
    assert s.images[0].image == str(root / "ccneg" / "ccneg_images/cc3m_subset_images_extracted_final/000000001.jpg")
    assert s.positives[0].text == "a dog on grass 1" and s.negatives[0].text == "a dog but not on grass 1"
    assert all(i.instruction is None for i in s.images)


def test_sugarcrepe_instruction_only_on_add_and_replace_att_obj(root):
    for subset in ("add_att", "add_obj", "replace_att", "replace_obj"):
        s = read_set(f"sugarcrepe_{subset}", root)
        assert all(i.instruction == ins.IMAGE_TO_CAPTION for i in s.images), subset
    for subset in ("replace_rel", "swap_att", "swap_obj"):
        s = read_set(f"sugarcrepe_{subset}", root)
        assert all(i.instruction is None for i in s.images), subset
    s = read_set("sugarcrepe_swap_obj", root)
    assert isinstance(s, PairSet) and s.positives[1].text == "swap_obj true 2" and s.negatives[1].text == "swap_obj false 2"


def test_video_sets(root):
    msvd = read_set("msvd", root)
    assert msvd.video_spec == "msvd" and [q.text for q in msvd.queries] == ["a man runs", "someone is running",
                                                                          "a cat sleeps"]
    assert msvd.positives == ((0,), (0,), (1,)) and msvd.candidates[0].video.endswith("YouTubeClips/vidA_1_5.avi")
    assert msvd.queries[0].final_text() == ("<instruction_start>Find an everyday video match with caption."
                                            "<instruction_end>a man runs")
    vt = read_set("msrvtt", root)
    assert vt.video_spec == "msrvtt" and [c.id for c in vt.candidates] == ["video7001", "video7002"]
    assert vt.queries[1].text == "cars race on a track" and vt.candidates[1].video.endswith("videos/video7002.mp4")


def test_missing_files_give_skipped(tmp_path):
    empty = read_set("visdial", tmp_path)
    assert isinstance(empty, Skipped)
    assert empty.message == f"skipped: visdial (missing {tmp_path / 'visdial' / 'visdial_1.0_val.json'})"
    root = write_zeroshot_fixture(tmp_path / "r", ["circo", "videos"])
    shutil.rmtree(root / "circo" / "images")
    s = read_set("circo", root)
    assert isinstance(s, Skipped) and s.missing == root / "circo" / "images" / "unlabeled2017"
    (root / "msrvtt" / "annotations" / "MSRVTT_JSFUSION_test.csv").unlink()
    assert read_set("msrvtt", root).message.startswith("skipped: msrvtt (missing ")
    assert all(isinstance(v, Skipped) for k, v in read_sets(tmp_path / "nothing").items())


def test_malformed_annotations_name_the_file(tmp_path):
    root = write_zeroshot_fixture(tmp_path, ["circo", "captions"])
    val = root / "circo" / "annotations" / "val.json"
    data = json.loads(val.read_text())
    data[1]["gt_img_ids"] = [99]
    val.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"val.json: query 1: gt_img_ids 99"):
        read_set("circo", root)
    (root / "flickr" / "flickr_text.json").write_text('["only", "three", "captions"]')
    with pytest.raises(DataError, match="flickr_text.json: expected a multiple of 5"):
        read_set("flickr30k", root)
    with pytest.raises(DataError, match="unknown zero-shot set"):
        read_set("nope", root)


def test_circo_found_in_circos_own_readme_layout(tmp_path):
    """CIRCO's README layout: COCO2017_unlabeled/annotations/image_info_unlabeled2017.json + unlabeled2017/."""
    root = write_zeroshot_fixture(tmp_path, ["circo"])
    base = root / "circo"
    (base / "COCO2017_unlabeled" / "annotations").mkdir(parents=True)
    (base / "annotations" / "image_info_unlabeled2017.json").rename(
        base / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json")
    (base / "images" / "unlabeled2017").rename(base / "COCO2017_unlabeled" / "unlabeled2017")
    s = read_set("circo", root)
    assert not isinstance(s, Skipped) and len(s.candidates) == 6
    assert s.candidates[0].image == str(base / "COCO2017_unlabeled" / "unlabeled2017" / "000000000011.jpg")
    assert Path(s.queries[0].image).is_file()
    shutil.rmtree(base / "COCO2017_unlabeled")
    missing = read_set("circo", root)
    assert isinstance(missing, Skipped) and missing.missing == base / "annotations" / "image_info_unlabeled2017.json"


def test_genecis_and_vist_candidates_in_the_official_order(tmp_path, root):
    """Candidates are listed as the official datasets list them (sorted id strings), which decides the
    official batches; galleries / positives / exclusions follow the reordering."""
    base = tmp_path / "genecis"
    for iid in (9, 10, 100, 2):
        (base / "val2017").mkdir(parents=True, exist_ok=True)
        (base / "val2017" / f"{iid:012d}.jpg").write_bytes(b"")
    ann = [{"reference": {"val_image_id": 2}, "target": {"val_image_id": 9},
            "gallery": [{"val_image_id": 10}, {"val_image_id": 100}], "condition": "donut"}]
    (base / "annotations").mkdir(parents=True)
    (base / "annotations" / "change_object.json").write_text(json.dumps(ann))
    s = read_set("genecis_change_object", tmp_path)
    assert [c.id for c in s.candidates] == ["000000000010", "000000000100", "000000000009"]  # "10" < "100" < "9"
    assert [s.candidates[i].id for i in s.galleries[0]] == ["000000000009", "000000000010", "000000000100"]
    assert s.queries[0].final_text() == (f"<instruction_start>{ins.GENECIS_CHANGE}<instruction_end> Donut.")
    v = read_set("vist", root)
    ids = [c.id for c in v.candidates]
    assert ids == sorted(ids)
    assert ids[v.positives[1][0]] == "205" and sorted(ids[i] for i in v.exclude[1]) == ["104", "201", "202", "203"]


def test_official_compat_reader_quirks(root):
    """compat="official": VIST's 4th caption / image dropped; the last caption stays raw in both modes."""
    default = read_set("vist", root).queries[0]
    official = read_set("vist", root, compat="official").queries[0]
    assert [k for k, _ in default.segments].count("image") == 4
    assert [k for k, _ in official.segments].count("image") == 3
    assert official.segments[-1] == default.segments[-1] == ("text", "s1 sentence 4")
    with pytest.raises(Exception, match="compat"):
        read_set("vist", root, compat="paper")
