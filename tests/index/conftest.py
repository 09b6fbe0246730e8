"""Fixtures of the index tests: a folder of generated photos (nested, with captions) and a built index."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 190, 30), "yellow": (230, 210, 30),
           "purple": (150, 40, 170), "cyan": (30, 200, 210), "orange": (240, 140, 20), "grey": (120, 120, 120)}


def draw(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (72, 56), shape: str = "ellipse") -> Path:
    """A small generated photo: a coloured shape on a light background."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", size, (245, 245, 240))
    box = [size[0] // 5, size[1] // 5, 4 * size[0] // 5, 4 * size[1] // 5]
    getattr(ImageDraw.Draw(im), shape)(box, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


@pytest.fixture(scope="session")
def draw_image():
    """:func:`draw` (a fixture, so that test files need not import this conftest)."""
    return draw


@pytest.fixture(scope="session")
def n_photos() -> int:
    """How many photos :func:`photos` holds."""
    return len(COLOURS)


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """8 photos in a folder tree (two sub-folders, one hidden file skipped) with captions for three."""
    root = tmp_path_factory.mktemp("photos")
    for n, (name, rgb) in enumerate(COLOURS.items()):
        sub = ("", "trips/", "trips/2024/")[n % 3]
        draw(root / f"{sub}{name}.{'jpg' if n % 2 else 'png'}", rgb, shape="ellipse" if n % 2 else "rectangle")
    (root / ".hidden.png").write_bytes((root / "red.png").read_bytes())
    (root / "notes.txt").write_text("not an image")
    caps = [{"id": "red.png", "text": "a red square"}, {"id": "trips/blue.jpg", "text": "a blue circle"},
            {"image": "trips/2024/green.png", "text": "a green square"}]
    (root / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in caps))
    return root


@pytest.fixture(scope="session")
def photo_index(tiny_model, photos, tmp_path_factory):
    """The flat index of :func:`photos` built with the tiny model (do not modify it)."""
    from umarvel import Index

    return Index.build(tiny_model, photos, tmp_path_factory.mktemp("idx") / "photos.idx", shard_size=3)
