"""umarvel.utils.io: permissions follow the umask, UTF-8 errors name byte and line, failed writes lose nothing."""
from __future__ import annotations

import errno
import json
import os
import stat

import pytest

from umarvel.errors import DataError, FileAccessError
from umarvel.utils.io import (atomic_dir, atomic_path, atomic_write_json, atomic_write_text, current_umask, iter_columns,
                              iter_jsonl, open_text, read_json)


@pytest.fixture
def umask():
    """Set the process umask for one test (restored afterwards)."""
    old = os.umask(0o022)
    try:
        yield lambda mask: os.umask(mask)
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                       (0o077, 0o600, 0o700)])
def test_outputs_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    assert current_umask() == mask
    atomic_write_json(tmp_path / "a" / "r.json", {"x": 1})
    atomic_write_text(tmp_path / "t.txt", "hi")
    with atomic_path(tmp_path / "m.npy") as tmp:
        tmp.write_bytes(b"\x93NUMPY")
    with atomic_dir(tmp_path / "merged") as d:
        (d / "config.json").write_text("{}")
    for f in ("a/r.json", "t.txt", "m.npy", "merged/config.json"):
        assert _mode(tmp_path / f) == file_mode, f
    for d in ("a", "merged"):
        assert _mode(tmp_path / d) == dir_mode, d


def test_config_and_checkpoint_files_follow_the_umask(tmp_path, umask):
    from umarvel.config import save_resolved
    from umarvel.train import checkpoint as ckpt
    from umarvel.train.config import StageConfig

    umask(0o002)
    save_resolved(StageConfig(stage="s", init_from="x"), tmp_path / "resolved_config.yaml")
    final = ckpt.checkpoints_dir(tmp_path) / ckpt.step_name(1)
    with atomic_dir(final) as tmp:  # as the trainer writes a checkpoint
        ckpt.write_state(tmp, {"global_step": 1})
    ckpt.point_latest(tmp_path, final, keep=2)
    assert _mode(final) == 0o775
    assert _mode(tmp_path / "resolved_config.yaml") == 0o664
    assert _mode(tmp_path / "checkpoints" / "latest") == 0o664
    assert _mode(tmp_path / "checkpoints" / "step-000001" / "trainer_state.json") == 0o664


# --------------------------------------------------------------------------------------------------- UTF-8
def test_not_utf8_names_byte_file_and_line(tmp_path):
    jl = tmp_path / "items.jsonl"
    jl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as err:
        list(iter_jsonl(jl))
    assert str(err.value).startswith(f"not UTF-8 at byte 14 of {jl}:2 (byte 0xe9)")
    tsv = tmp_path / "qrels.txt"
    tsv.write_bytes(b"q1 0 d1 1\nq2 0 \xffd2 1\n")
    with pytest.raises(DataError, match=f"not UTF-8 at byte 6 of {tsv}:2"):
        list(iter_columns(tsv))
    js = tmp_path / "x.json"
    js.write_bytes(b'{\n "a": "\xc3("\n}\n')
    with pytest.raises(DataError, match=f"not UTF-8 at byte 8 of {js}:2"):
        read_json(js)
    with pytest.raises(DataError, match=f"of {tsv}:2"), open_text(tsv) as fh:
        fh.read()


def test_nli_csv_not_utf8(tmp_path):
    from umarvel.train.datasets import NliDataset

    csv = tmp_path / "nli.csv"
    csv.write_bytes(b"sent0,sent1,hard_neg\na,b,c\n\"x\x80\",y,z\n")
    with pytest.raises(DataError, match=f"not UTF-8 at byte 3 of {csv}:3"):
        NliDataset.from_file(csv)


def test_mbeir_instructions_not_utf8(tmp_path):
    from umarvel.data.mbeir import read_instructions

    tsv = tmp_path / "query_instructions.tsv"
    tsv.write_bytes(b"a\tb\tc\td\te\ntext\timage\tx\t0\tFind \xfe it.\n")
    with pytest.raises(DataError, match=f"not UTF-8 at byte 21 of {tsv}:2"):
        read_instructions(tsv)


# ----------------------------------------------------------------------------------------- failed writes
def test_disk_full_while_writing_keeps_the_old_file(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_json(target, {"old": True})
    with pytest.raises(FileAccessError) as err:
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    msg = str(err.value)
    assert f"cannot write {target}" in msg and "No space left on device" in msg and "nothing was lost" in msg
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left


def test_write_under_a_regular_file_or_onto_a_folder(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileAccessError, match="a parent of the path is a file"):
        atomic_write_text(tmp_path / "afile" / "sub" / "out.txt", "y")
    (tmp_path / "adir").mkdir()
    with pytest.raises(FileAccessError, match="expected a file, got a folder"):
        atomic_write_text(tmp_path / "adir", "y")
    with pytest.raises(FileAccessError, match="a parent of the path is a file"):
        with atomic_dir(tmp_path / "afile" / "merged"):
            pass
