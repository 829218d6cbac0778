"""Train the default model: `python scripts/train_default_model.py --help` (the code is training.train)."""

from training.train import main

if __name__ == "__main__":
    main()
