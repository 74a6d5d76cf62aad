"""Train a likelihood model with FIM-norm tracking and an OOD evaluation at the end.

python train.py                      # embedded default: Glow on scikit-learn's 8x8 digits
python train.py fit --config configs/glow_fashionmnist.yaml --data.root ../shared/data
"""

from pathlib import Path

from fimcb.cli import main

if __name__ == "__main__":
    main(default_config=Path(__file__).resolve().parent / "configs" / "default.yaml")
