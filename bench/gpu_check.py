"""GPU correctness check: the golden embedding parity on CUDA (fp32 with TF32 off, and bf16).

    python bench/gpu_check.py --golden ../shared/golden/umarvel_tiny

Prints max-abs and min-cosine against the official vectors for each golden batch, computed (a) from our
own preprocessing through ``encode_*`` and (b) from the fixture's recorded tensors. Exit code 1 on failure.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def load(golden: Path, device: str, dtype: str):
    from umarvel import UMarvel

    model = UMarvel.from_pretrained(golden / "checkpoint", device=device, dtype=dtype)
    rows = torch.from_numpy(np.load(golden / "expected" / "added_token_embeddings.npy"))
    with torch.no_grad():
        model.embedder.hf_model.get_input_embeddings().weight[151658:151660] = rows[1:].to(device, model.dtype)
    return model


def check(golden: Path, device: str, dtype: str, tol_cos: float, tol_abs: float | None) -> bool:
    model = load(golden, device, dtype)
    records = json.loads((golden / "inputs" / "records.json").read_text())
    ok = True
    for batch in records["batches"]:
        arrays = np.load(golden / "expected" / batch["name"] / "arrays.npz")
        ref = arrays["embeddings_bidirectional"] if "embeddings_bidirectional" in arrays else arrays["embeddings"]
        items = []
        for it in batch["items"]:
            d = {"text": it["text"] or None, "image": str(golden / "inputs" / "images" / it["image"]) if it["image"] else None}
            if batch["role"] == "query":
                d["instruction"] = it["instruction"]
            items.append(d)
        fn = model.encode_queries if batch["role"] == "query" else model.encode_candidates
        ours = fn(items, batch_size=4)
        kw = {k: torch.from_numpy(arrays[k]) for k in ("input_ids", "attention_mask", "pool_mask")}
        if "pixel_values" in arrays:
            kw["pixel_values"] = torch.from_numpy(arrays["pixel_values"])
            kw["image_grid_thw"] = torch.from_numpy(arrays["image_grid_thw"])
        recorded = model.embed_batch(kw).cpu().numpy()
        for label, got in (("own preprocessing", ours), ("recorded tensors", recorded)):
            maxabs = float(np.abs(got - ref).max())
            mincos = float(np.min(np.sum(got * ref, axis=1)))
            good = mincos >= tol_cos and (tol_abs is None or label == "own preprocessing" or maxabs <= tol_abs)
            ok &= good
            print(f"{dtype:<9}{batch['name']:<16}{label:<19} max|diff| {maxabs:.2e}  min cos {mincos:.7f}  "
                  f"{'ok' if good else 'FAIL'}")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--golden", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "golden" / "umarvel_tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.device.startswith("cuda"):
        print("device:", torch.cuda.get_device_name(), "torch", torch.__version__)
    import transformers
    print("transformers", transformers.__version__)
    ok = check(args.golden, args.device, "float32", tol_cos=0.99999, tol_abs=1e-5)
    ok &= check(args.golden, args.device, "bfloat16", tol_cos=0.999, tol_abs=None)
    print("GPU parity:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
