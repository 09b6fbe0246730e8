"""umarvel: U-MARVEL universal multimodal retrieval (Qwen2-VL embedding model).

The public API is imported lazily so that ``import umarvel`` stays cheap::

    from umarvel import UMarvel
    model = UMarvel.from_pretrained("TencentBAC/U-MARVEL-Qwen2VL-7B-Instruct", device="cuda", dtype="bfloat16")
"""
from umarvel.version import __version__

__all__ = ["UMarvel", "Index", "__version__"]


def __getattr__(name):
    if name == "UMarvel":
        from umarvel.api import UMarvel  # lazy: `import umarvel` must not load torch (the CLI parser imports it)
        return UMarvel
    if name == "Index":  # the lazy public facade reaches up to layer 6 (allowed in tests/test_architecture.py)
        from umarvel.index import Index
        return Index
    raise AttributeError(f"module 'umarvel' has no attribute {name!r}")
