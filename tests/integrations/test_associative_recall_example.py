"""examples/associative_recall.py: the task is what its docstring says (each asked key's target is
the value it was paired with, nothing else is scored), and --quick runs every method end to end."""
import json
import sys

import torch

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "examples"))
import associative_recall  # noqa: E402


def test_targets_are_the_values_of_the_asked_keys():
    tokens, targets = associative_recall.batch(5, 3, torch.Generator().manual_seed(0))
    assert tokens.shape == targets.shape == (3, 20)
    for row in range(3):
        pairs = dict(zip(tokens[row, 0:10:2].tolist(), tokens[row, 1:10:2].tolist()))
        assert len(pairs) == 5 and all(k < associative_recall.KEYS <= v for k, v in pairs.items())
        asked = tokens[row, 10::2].tolist()
        assert sorted(asked) == sorted(pairs)
        assert targets[row, 10::2].tolist() == [pairs[k] for k in asked]
        assert (targets[row, :10] == -100).all() and (targets[row, 11::2] == -100).all()


def test_quick_run_covers_every_method(tmp_path, monkeypatch):
    output = tmp_path / "recall"
    monkeypatch.setattr(sys, "argv", ["associative_recall.py", "--quick", "--output", str(output)])
    associative_recall.main()
    results = json.loads((tmp_path / "recall.json").read_text())
    assert sorted(results["accuracy"]) == sorted(associative_recall.METHODS)
    assert all(0.0 <= a <= 1.0 for accuracies in results["accuracy"].values() for a in accuracies)
    assert (tmp_path / "recall.png").exists()


def test_overwrite_targets_are_the_latest_values():
    """--task overwrite: every key is assigned twice (a different value the second time) and the
    asked key's target is its second value."""
    tokens, targets = associative_recall.overwrite_batch(5, 3, torch.Generator().manual_seed(1))
    assert tokens.shape == targets.shape == (3, 30)
    for row in range(3):
        first = dict(zip(tokens[row, 0:10:2].tolist(), tokens[row, 1:10:2].tolist()))
        latest = dict(zip(tokens[row, 10:20:2].tolist(), tokens[row, 11:20:2].tolist()))
        assert len(first) == 5 and sorted(first) == sorted(latest)
        assert all(first[k] != latest[k] and latest[k] >= associative_recall.KEYS for k in first)
        asked = tokens[row, 20::2].tolist()
        assert sorted(asked) == sorted(first)
        assert targets[row, 20::2].tolist() == [latest[k] for k in asked]
        assert (targets[row, :20] == -100).all() and (targets[row, 21::2] == -100).all()
