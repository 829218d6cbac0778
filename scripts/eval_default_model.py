"""Evaluate a model on held-out edits and completions: `python scripts/eval_default_model.py --help`
(the code is training.evaluate)."""

from training.evaluate import main

if __name__ == "__main__":
    main()
