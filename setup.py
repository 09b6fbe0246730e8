"""umarvel: the reference implementation of U-MARVEL universal multimodal retrieval."""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip() for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="umarvel",
    version="0.1.0",
    description="U-MARVEL: universal multimodal retrieval with a Qwen2-VL embedding model",
    long_description=(here / "README.md").read_text(encoding="utf-8") if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["umarvel", "umarvel.*"]),
    package_data={"umarvel": ["data/assets/qwen2vl_processor/*", "data/assets/qwen2_5_vl_processor/*",
                               "data/assets/qwen3_vl_processor/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={"dev": ["pytest>=7", "pytest-timeout"], "video": ["qwen-vl-utils"]},
    entry_points={"console_scripts": ["umarvel=umarvel.cli:main"]},
)
