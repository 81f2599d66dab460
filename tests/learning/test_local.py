"""Local SGD: it learns, it is reproducible from its generator, it validates input."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny
from veil.errors import ConfigError
from veil.learning import SGDTrainer, evaluate
from veil.models import build_model


def test_sgd_learns_and_is_reproducible() -> None:
    data = make_tiny()
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("2nn")
        before, _ = evaluate(model, data.test.x, data.test.y)
        stats = SGDTrainer(0.05, epochs=3, batch_size=20).train(
            model, data.train.x, data.train.y, torch.Generator().manual_seed(1)
        )
        after, _ = evaluate(model, data.test.x, data.test.y)
        assert stats.steps == 3 * 30 and stats.examples_seen == 3 * 600
        assert after > before + 0.3
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_max_steps_stops_early() -> None:
    data = make_tiny()
    stats = SGDTrainer(0.05, epochs=5, batch_size=10, max_steps=7).train(
        build_model("2nn"), data.train.x, data.train.y, torch.Generator()
    )
    assert stats.steps == 7 and stats.examples_seen == 70


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": 0.1, "epochs": 0}, "epochs"),
        ({"lr": 0.1, "batch_size": 0}, "batch_size"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SGDTrainer(**kwargs)  # type: ignore[arg-type]
