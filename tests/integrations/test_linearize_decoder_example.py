"""examples/linearize_decoder.py --quick: trains the byte-level LM, linearizes it both ways, fits
the students, measures held-out bits per byte and generates from every model."""
import json
import sys

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "examples"))
import linearize_decoder  # noqa: E402


def test_quick_run(tmp_path, monkeypatch):
    output = tmp_path / "decoder"
    monkeypatch.setattr(sys, "argv", ["linearize_decoder.py", "--quick", "--output", str(output)])
    linearize_decoder.main()
    results = json.loads((tmp_path / "decoder.json").read_text())
    assert len(results["rows"]) == 9 and all(0 < row["bits_per_byte"] < 9 for row in results["rows"])
    assert len(results["curves"]) == 2 and len(results["generation"]) == 3
    softmax, linear, hybrid = (row["cache_bytes"] for row in results["generation"])
    assert linear < softmax and hybrid < softmax
    assert (tmp_path / "decoder.png").exists()
