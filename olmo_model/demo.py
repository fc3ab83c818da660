"""The built-in demo model: a tiny OLMo trained on Python's own help texts.

Made by ``scripts/train_demo_model.py``; used whenever no model path is given.
"""

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"


def resolve_model_dir(model: str | Path | None) -> Path:
    return Path(model) if model else DEMO_MODEL_DIR
