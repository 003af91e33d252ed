"""Packaging for nnunet-samflare.

Two folders at the repository root are installed *inside* the package so that they exist after a plain
(non-editable) install too:

* ``trainers/`` -> ``nnunet_samflare.nnunet_trainers``: the folder that nnU-Net's external trainer lookup
  (``nnUNet_extTrainer``) scans. It only re-exports the trainer classes (docs/nnunet.md §1: modules found there
  are purged from ``sys.modules`` afterwards, so real classes must live in the package).
* ``plans/`` -> ``nnunet_samflare.plans``: JSON templates of the plug-in configurations.

``nnunet_samflare_autoregister.pth`` is copied into site-packages. Python runs its one ``import`` line at
start-up, which appends the trainer shim folder to ``nnUNet_extTrainer`` so that ``nnUNetv2_train`` and
``nnUNetv2_predict`` find the trainers with no configuration (opt out with ``SAMFLARE_NO_AUTOREGISTER=1``).
"""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PTH_FILE = "nnunet_samflare_autoregister.pth"


class BuildPyWithPth(build_py):
    """Put the autoregistration ``.pth`` at the root of the wheel, i.e. into site-packages."""

    def run(self):
        super().run()
        if self.editable_mode:
            # PEP 660 editable wheels are assembled from the ``install`` command's ``install_lib``
            # (build_lib is thrown away), so the .pth has to go there.
            target = self.distribution.get_command_obj("install").install_lib
        else:
            target = self.build_lib
        self.copy_file(PTH_FILE, os.path.join(target, PTH_FILE), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_FILE)]


setup(
    name="nnunet-samflare",
    version="0.1.0",
    description="nnU-Net v2 plug-in: FLARE23 PConv locator + SAM/MSA hybrid segmenter cascade for abdominal CT",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Every sub-package of nnunet_samflare/ (a new one cannot be forgotten), plus the two folders mapped in below.
    packages=find_packages(include=["nnunet_samflare", "nnunet_samflare.*"])
    + ["nnunet_samflare.nnunet_trainers", "nnunet_samflare.plans"],
    package_dir={
        "nnunet_samflare.nnunet_trainers": "trainers",
        "nnunet_samflare.plans": "plans",
    },
    package_data={
        "nnunet_samflare.plans": ["*.json"],
        "nnunet_samflare.example_data": ["README.md", "flare_like/*.json", "flare_like/*/*.nii.gz"],
    },
    py_modules=["nnunet_samflare_autoregister"],
    cmdclass={"build_py": BuildPyWithPth},
    install_requires=[
        "torch==2.14.1",
        "nnunetv2>=2.8.1",
        "numpy",
        "scipy",
        "SimpleITK",
        "connected-components-3d",
        "surface-distance",
        "tqdm",
        "matplotlib",
        "psutil",
        "nvidia-ml-py",
    ],
    extras_require={"test": ["pytest", "ruff", "hypothesis"]},
    entry_points={"console_scripts": ["samflare = nnunet_samflare.cli:console_main"]},
)
