"""Recurrent benchmark models: shapes, registry, and the plan targets they expose."""

import pytest
import torch

from admmcompress.models import GRUClassifier, LSTMLanguageModel, create_model
from admmcompress.plan import Plan
from admmcompress.structures import Block

pytestmark = pytest.mark.usefixtures("private_rng")  # seeded, the global RNG restored after


def test_gru_classifier_shapes_and_block_plan_targets():
    model = create_model("gru_fsdd", hidden=32)
    assert isinstance(model, GRUClassifier)
    assert model(torch.randn(3, 20, 39)).shape == (3, 10)
    targets = Plan({"gru": Block(compression=10, block=(16, 1))}).resolve(model)
    assert [t.param for t in targets] == ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"]


@pytest.mark.parametrize("cutoffs", [None, [10, 20]])
def test_lstm_language_model_nll_matches_log_probs_and_carries_state(cutoffs):
    lm = create_model("lstm_ptb", vocab_size=30, embed=8, hidden=16, cutoffs=cutoffs).eval()
    assert isinstance(lm, LSTMLanguageModel)
    tokens, targets = torch.randint(0, 30, (6, 2)), torch.randint(0, 30, (6, 2))
    log_probs, _ = lm(tokens)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(6, 2))
    nll, _ = lm.nll(tokens, targets)
    torch.testing.assert_close(nll, -log_probs.gather(-1, targets[..., None]).mean())
    first, state = lm(tokens[:3])
    second, _ = lm(tokens[3:], state)
    torch.testing.assert_close(torch.cat([first, second]), log_probs)
