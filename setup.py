"""Packaging details pyproject.toml cannot say: the shipped pipelines, kept in ``pipelines/`` at
the repository root, install as the package ``medvision_pipelines`` (with their weights and
model cards as package data), and ``docs/`` as ``medvision_docs`` (read by ``medvision
docs``). Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["medvision", "medvision.*"]), "medvision_pipelines",
              "medvision_docs"],
    package_dir={"medvision_pipelines": "pipelines", "medvision_docs": "docs"},
    package_data={
        "medvision": ["py.typed", "report/report.schema.json", "report/templates/*"],
        "medvision_pipelines": ["*/*.yaml", "*/*.md", "*/*.json", "*/*.safetensors"],
        "medvision_docs": ["*.md", "screenshots/*.png", "examples/*.yaml", "synthetic/*"],
    },
)
