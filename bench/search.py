"""Benchmark exact inner-product top-k: umarvel's torch search vs faiss IndexFlatIP, and the M-BEIR global shape.

    # CPU (default): 1M x 256 candidates, 1000 queries, top-10, torch vs faiss-cpu on the same vectors
    .venv/bin/python bench/search.py
    # the same through a flat umarvel Index folder (fp16 vectors on disk; faiss gets the same fp16 values)
    .venv/bin/python bench/search.py --index
    # GPU: random vectors of the M-BEIR global test size (190,573 x 5,609,079 x 3,584, bf16 = 40 GB)
    python bench/search.py --shape mbeir --device cuda [--scale 0.1] [--k 50]

Random L2-normalised Gaussian vectors; prints a result table on stdout (timings are wall-clock, one run
after a warm-up on a small slice).
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from umarvel.eval.search import make_searcher

MBEIR = {"queries": 190_573, "candidates": 5_609_079, "dim": 3_584}


def random_unit(n: int, d: int, seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
                rows: int = 1 << 18) -> torch.Tensor:
    """``(n, d)`` L2-normalised Gaussian rows, generated chunk-wise in fp32 then cast to ``dtype``."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty((n, d), dtype=dtype, device=device)
    for a in range(0, n, rows):
        x = torch.randn((min(rows, n - a), d), generator=g, device=device)
        out[a:a + x.shape[0]] = torch.nn.functional.normalize(x, dim=1).to(dtype)
    return out


def agreement(ids_a: np.ndarray, sc_a: np.ndarray, ids_b: np.ndarray, sc_b: np.ndarray, tol: float) -> float:
    """Fraction of (query, rank) slots whose ids agree, counting a differing id as agreeing when the
    two scores are within ``tol`` of each other (near-ties may legitimately swap)."""
    same = ids_a == ids_b
    near = np.abs(sc_a - sc_b) <= tol
    return float((same | near).mean())


def bench_cpu(args: argparse.Namespace) -> None:
    """torch vs faiss-cpu IndexFlatIP on the same fp32 vectors."""
    torch.set_num_threads(args.threads)
    import faiss
    faiss.omp_set_num_threads(args.threads)
    n, q, d, k = args.n, args.q, args.dim, args.k
    t0 = time.perf_counter()
    cands = random_unit(n, d, seed=0).numpy()
    queries = random_unit(q, d, seed=1).numpy()
    print(f"data: {n:,} x {d} candidates, {q:,} queries, top-{k}, {args.threads} threads "
          f"(generated in {time.perf_counter() - t0:.1f}s)")

    label = "umarvel torch"
    if args.index:
        cands, ts, label = _flat_index(cands, args)
    t0 = time.perf_counter()
    fs = make_searcher(cands, backend="faiss")
    build = time.perf_counter() - t0
    if not args.index:
        ts = make_searcher(cands, backend="torch", device="cpu", q_tile=args.q_tile, c_tile=args.c_tile)
    fs.search(queries[:8], k), ts.search(queries[:8], k)  # warm-up

    # interleaved repeats (faiss, torch, faiss, torch, ...), best of each: fairer on a shared machine
    best = {"faiss": float("inf"), "torch": float("inf")}
    res = {}
    for _ in range(args.repeat):
        for name, s in (("faiss", fs), ("torch", ts)):
            t0 = time.perf_counter()
            res[name] = s.search(queries, k)
            best[name] = min(best[name], time.perf_counter() - t0)
    rows = [(name, best[name], *res[name]) for name in ("faiss", "torch")]
    (_, tf, sf, idf), (_, tt, st, idt) = rows
    print(f"{'backend':<20}{'seconds':>10}{'queries/s':>12}")
    print(f"{'faiss IndexFlatIP':<20}{tf:>10.3f}{q / tf:>12.1f}   (+{build:.2f}s index build)")
    print(f"{label:<20}{tt:>10.3f}{q / tt:>12.1f}")
    print(f"ratio torch/faiss: {tt / tf:.3f}  (target <= 1.25)")
    print(f"ids identical: {(idf == idt).mean():.5f}; agree within tie tolerance {args.tol:g}: "
          f"{agreement(idf, sf, idt, st, args.tol):.5f}; max |score diff| {np.abs(sf - st).max():.2e}")


class _IndexSearch:
    """``search(queries, k)`` through a flat :class:`umarvel.Index` (what ``umarvel search`` runs)."""

    def __init__(self, index):
        self.index = index

    def search(self, queries, k):
        return self.index.search_arrays(queries, k, device="cpu")


def _flat_index(cands: np.ndarray, args: argparse.Namespace):
    """Write ``cands`` as a flat index folder (fp16) in a temporary folder; return the fp32 values of the
    stored fp16 vectors (for faiss), the index searcher and its label."""
    import atexit
    import shutil
    import tempfile

    from umarvel import Index

    tmp = tempfile.mkdtemp(prefix="bench_index_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    t0 = time.perf_counter()
    items = [{"id": str(i), "text": "x"} for i in range(len(cands))]
    index = Index.from_vectors(cands.astype(np.float16), items, f"{tmp}/idx")
    stored = np.asarray(index.vectors, dtype=np.float32)
    searcher = _IndexSearch(index)
    index.searcher("cpu")  # the resident fp32 copy, built once as faiss builds its index once
    print(f"flat index folder written in {time.perf_counter() - t0:.1f}s ({index})")
    return stored, searcher, "umarvel Index (flat)"


def exact_reference(queries: torch.Tensor, cands: torch.Tensor, k: int, rows: int = 1 << 20):
    """Chunked fp32 top-k of the (half-precision) vectors: the ground truth for ``--check``."""
    best_v = best_i = None
    for a in range(0, cands.shape[0], rows):
        sc = queries.float() @ cands[a:a + rows].float().T
        v, i = sc.topk(min(k, sc.shape[1]), dim=1)
        i = i + a
        if best_v is not None:
            v, pos = torch.cat([best_v, v], 1).topk(k, dim=1)
            i = torch.cat([best_i, i], 1).gather(1, pos)
        best_v, best_i = v, i
    return best_v.cpu().numpy(), best_i.cpu().numpy()


def bench_gpu(args: argparse.Namespace) -> None:
    """M-BEIR global shape on one CUDA device: seconds and achieved TFLOP/s of the exact search."""
    dev = args.device
    dtype = getattr(torch, args.dtype)
    n = max(1, int(MBEIR["candidates"] * args.scale)) if args.n is None else args.n
    q = max(1, int(MBEIR["queries"] * args.scale)) if args.q is None else args.q
    d = MBEIR["dim"] if args.dim is None else args.dim
    t0 = time.perf_counter()
    cands = random_unit(n, d, seed=0, device=dev, dtype=dtype)
    queries = random_unit(q, d, seed=1, device=dev, dtype=dtype)
    torch.cuda.synchronize()
    gb = cands.numel() * cands.element_size() / 1e9
    print(f"data: {n:,} x {d} candidates ({args.dtype}, {gb:.1f} GB), {q:,} queries, top-{args.k} "
          f"on {torch.cuda.get_device_name()} (generated in {time.perf_counter() - t0:.1f}s)")
    flop = 2.0 * q * n * d
    print(f"{'select':>10}{'q_tile':>8}{'c_tile':>9}{'seconds':>10}{'queries/s':>12}{'TFLOP/s':>9}{'check':>10}")
    for select in args.select.split(","):
        if select == "certified" and dtype != torch.float16:
            print(f"{select:>10}  (needs --dtype float16; skipped)")
            continue
        s = make_searcher(cands, backend="torch", device=dev, dtype=dtype, q_tile=args.q_tile, c_tile=args.c_tile,
                          select=select)
        s.search(queries[:64], args.k)  # warm-up (cuBLAS heuristics, out_dtype probe)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sc, ids = s.search(queries, args.k)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        check = ""
        if args.check:
            sub = min(q, 256)
            rv, ri = exact_reference(queries[:sub], cands, args.k)
            check = f"{agreement(ri, rv, ids[:sub], sc[:sub], 1e-6):.4f}"
        print(f"{select:>10}{s.q_tile:>8}{s.c_tile:>9}{dt:>10.2f}{q / dt:>12.0f}{flop / dt / 1e12:>9.1f}{check:>10}",
              flush=True)
        del s
        torch.cuda.empty_cache()
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")
    if args.profile:
        profile_tiles(queries, cands, args.k, args.q_tile or 16384, args.c_tile or 65536)


def profile_tiles(queries: torch.Tensor, cands: torch.Tensor, k: int, q_tile: int, c_tile: int) -> None:
    """Where the time goes: the GEMMs alone, then GEMM + per-tile topk for several k and score dtypes."""
    def run(label: str, score_dtype, kk: int | None, sort: bool = False) -> None:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for q0 in range(0, queries.shape[0], q_tile):
            qt = queries[q0:q0 + q_tile]
            for c0 in range(0, cands.shape[0], c_tile):
                if score_dtype is torch.float32:
                    tile = torch.mm(qt, cands[c0:c0 + c_tile].T, out_dtype=torch.float32)
                else:
                    tile = qt @ cands[c0:c0 + c_tile].T
                if kk:
                    torch.topk(tile, kk, dim=1, sorted=sort)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        flop = 2.0 * queries.shape[0] * cands.shape[0] * queries.shape[1]
        print(f"  {label:<44}{dt:>8.2f} s {flop / dt / 1e12:>8.1f} TFLOP/s", flush=True)

    print(f"profile (q_tile {q_tile}, c_tile {c_tile}):")
    for args in (("GEMM only, half scores", queries.dtype, None),
                 ("GEMM only, fp32 scores (out_dtype)", torch.float32, None),
                 (f"GEMM + topk({k}) half scores, unsorted", queries.dtype, k),
                 (f"GEMM + topk({k + 64}) half scores, unsorted", queries.dtype, k + 64),
                 (f"GEMM + topk({k + 1}) fp32 scores, sorted", torch.float32, k + 1, True)):
        try:
            run(*args)
        except (RuntimeError, TypeError) as exc:
            print(f"  {args[0]:<44} failed: {exc}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["cpu", "mbeir"], default="cpu",
                   help="cpu: torch vs faiss on CPU (default); mbeir: M-BEIR global sizes on a GPU")
    p.add_argument("--n", type=int, default=None, help="candidates (cpu default 1,000,000)")
    p.add_argument("--q", type=int, default=None, help="queries (cpu default 1,000)")
    p.add_argument("--dim", type=int, default=None, help="dimension (cpu default 256)")
    p.add_argument("--k", type=int, default=None, help="top-k (cpu default 10, mbeir default 50)")
    p.add_argument("--scale", type=float, default=1.0, help="mbeir: shrink queries and candidates by this factor")
    p.add_argument("--device", default="cuda", help="mbeir: device")
    p.add_argument("--dtype", default="float16", choices=["bfloat16", "float16"],
                   help="mbeir: vector dtype (float16 = what the embedding cache stores)")
    p.add_argument("--select", default="certified,exact",
                   help="mbeir: comma-separated search variants to time (certified needs float16)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="cpu: threads for torch and faiss")
    p.add_argument("--repeat", type=int, default=1, help="cpu: best of this many runs")
    p.add_argument("--q-tile", type=int, default=None)
    p.add_argument("--c-tile", type=int, default=None)
    p.add_argument("--tol", type=float, default=1e-5, help="cpu: score tolerance for id agreement")
    p.add_argument("--index", action="store_true",
                   help="cpu: search through a flat umarvel Index folder (fp16 on disk) instead of the bare searcher")
    p.add_argument("--profile", action="store_true", help="mbeir: time GEMMs and per-tile topk separately")
    p.add_argument("--check", action="store_true",
                   help="mbeir: compare 256 queries with a chunked fp32 top-k of the same vectors")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.shape == "cpu":
        args.n = args.n or 1_000_000
        args.q = args.q or 1_000
        args.dim = args.dim or 256
        args.k = args.k or 10
        bench_cpu(args)
    else:
        args.k = args.k or 50
        bench_gpu(args)


if __name__ == "__main__":
    main()
