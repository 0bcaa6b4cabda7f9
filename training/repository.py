"""The model repository the server reads (README "Updating a model"): models/<name>/<version>/model.onnx with
model.json beside it, versions being positive integers. Training writes each new model as the next version, so
a running server with polling on picks it up, and the previous version stays on disk for a rollback."""

from __future__ import annotations

from pathlib import Path


def versions(models_dir: Path, name: str) -> list[int]:
    root = models_dir / name
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def latest_version_dir(models_dir: Path, name: str) -> Path:
    found = versions(models_dir, name)
    if not found:
        raise SystemExit(f"error: no version of {name} in {models_dir} (expected {models_dir}/{name}/<n>/model.json)")
    return models_dir / name / str(found[-1])


def new_version_dir(models_dir: Path, name: str) -> Path:
    """The next version's folder, created: one more than the newest on disk (1 for a new model)."""
    found = versions(models_dir, name)
    path = models_dir / name / str((found[-1] if found else 0) + 1)
    path.mkdir(parents=True)
    return path
