"""Zero-shot instructions (method spec 6.3), as plain strings.

Where they go:

- CIRCO, GeneCIS, VisDial: on the query text, ``"{instr} {text}"`` (marker-wrapped, one space).
- Flickr30K, ShareGPT4V: on the texts, no space after ``<instruction_end>``; images get none.
- Urban1K: on the images, alone. The official code passes a Python set ``{text}`` so the rendered text is
  ``{'...'}``; that quirk is reproduced with ``compat="official"`` only.
- Sugar-Crepe add_*/replace_att/replace_obj: on the images, alone; replace_rel / swap_*: none.
- MSVD / MSR-VTT: on the caption, no space after ``<instruction_end>``.
- VIST: plain text leading the interleaved story (not marker-wrapped).
- COCO 5K, CC-Neg: none.
"""
from __future__ import annotations

CIRCO = "I'm looking for a similar everyday image with the described changes."
GENECIS_CHANGE = ("I want you to retrieve an similar image with the described changes. "
                  "Show me an image that best captures the following the described changes.")
GENECIS_FOCUS_ATTRIBUTE = ("I want you to retrieve an image with the same attributes as described. "
                           "Show me an image that best captures the following the same attributes.")
#: focus_object uses the "change" instruction in the official code (spec 6.3).
GENECIS = {
    "change_attribute": GENECIS_CHANGE,
    "change_object": GENECIS_CHANGE,
    "focus_attribute": GENECIS_FOCUS_ATTRIBUTE,
    "focus_object": GENECIS_CHANGE,
}
CAPTION_TO_IMAGE = "Find me an everyday image that matches the given caption."
IMAGE_TO_CAPTION_EVERYDAY = "Find an image caption describing the following everyday image."
IMAGE_TO_CAPTION = "Find an image caption describing the following image."
DIALOG_TO_IMAGE = "Find me an everyday image that matches the given dialog."
VIST = ("I will provide you with a series of images and captions from a story, and I need you to retrieve "
        "the image corresponding to the last caption.")
CAPTION_TO_VIDEO = "Find an everyday video match with caption."
SUGARCREPE_WITH_INSTRUCTION = ("add_att", "add_obj", "replace_att", "replace_obj")
