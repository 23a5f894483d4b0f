import math

import numpy as np
import pytest

from ctu.analysis import induction
from ctu.models import ModelConfig


def test_copy_batch_repeats_a_first_half_span_at_varying_places():
    config = induction.ProbeConfig(vocab=50, length=64, span=10, batch=64)
    tokens, mask = induction.copy_batch(np.random.default_rng(0), config)
    assert tokens.shape == mask.shape == (64, 64)
    assert tokens.min() >= induction.FIRST_TOKEN
    assert tokens.max() < induction.FIRST_TOKEN + 50
    starts = []
    for row in range(64):
        masked = np.flatnonzero(mask[row])
        assert len(masked) == config.span - 1 and np.all(np.diff(masked) == 1)
        start = masked[0] - 1  # the span's first token carries no loss
        assert start >= config.length // 2
        span = tokens[row, start : start + config.span]
        # The span occurs in the first half, so content alone locates it.
        first_half = tokens[row, : config.length // 2]
        windows = np.lib.stride_tricks.sliding_window_view(first_half, config.span)
        assert np.any(np.all(windows == span, axis=1))
        starts.append(start)
    # Not a fixed offset: the repeat lands in many places.
    assert len(set(starts)) > 10


def test_probe_config_refuses_a_span_that_cannot_move():
    with pytest.raises(ValueError, match="length=30 must be at least 4 \\* span=40"):
        induction.ProbeConfig(length=30, span=10)
    with pytest.raises(ValueError, match="batch must be >= 1"):
        induction.ProbeConfig(batch=0)


def test_a_fresh_model_starts_at_chance_and_the_curve_is_logged():
    model = ModelConfig.preset("tiny", vocab_size=8)  # grown to fit the probe's tokens
    config = induction.ProbeConfig(vocab=40, length=40, span=8, batch=4, steps=3, log_every=1)
    result = induction.run_probe(model, config, log=lambda _: None)
    assert [p["step"] for p in result["curve"]] == [1, 2, 3]
    assert result["chance_loss"] == pytest.approx(math.log(40))
    # Small initial weights predict nearly uniformly over the whole (grown) vocabulary.
    vocab = induction.FIRST_TOKEN + 40
    assert result["curve"][0]["loss"] == pytest.approx(math.log(vocab), abs=0.15)
    assert result["steps_to_copy"] is None


def test_train_copy_refuses_ids_beyond_the_vocabulary():
    from flax import nnx

    from ctu.models import Qwen

    model = Qwen(ModelConfig.preset("tiny", vocab_size=40), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="beyond the model's vocabulary of 40; lower vocab"):
        induction.train_copy(model, induction.ProbeConfig(vocab=64), log=lambda _: None)


def _earlier_values(tokens, query, context):
    """Values (the RECALL_VALUE tokens) that follow an earlier copy of the `context`
    tokens before position `query`."""
    size = induction.RECALL_VALUE
    key = tuple(tokens[query - context : query])
    return {
        tuple(tokens[p : p + size])
        for p in range(context, query - size + 1)
        if tuple(tokens[p - context : p]) == key
    }


def test_recall_values_follow_their_key_and_not_the_separators_alone():
    config = induction.ProbeConfig(vocab=2000, length=64, batch=64, task="recall")
    tokens, mask = induction.recall_batch(np.random.default_rng(1), config)
    assert tokens.shape == mask.shape == (64, 64)
    longest = induction.RECALL_KEY[1] + induction.RECALL_SEPARATORS[1]
    spans = ambiguous = 0
    for row in range(64):
        masked = np.flatnonzero(mask[row])
        assert len(masked) >= 2 * induction.RECALL_VALUE  # at least two lines asked for
        for query in masked[:: induction.RECALL_VALUE]:
            value = tuple(tokens[row, query : query + induction.RECALL_VALUE])
            assert mask[row, query : query + len(value)].all()
            spans += 1
            # The last separator alone is followed by several values...
            ambiguous += len(_earlier_values(tokens[row], query, 1)) > 1
            # ...the key and separators (at most `longest` tokens back) by this one only.
            found = [_earlier_values(tokens[row], query, k) for k in range(1, longest + 1)]
            assert {value} in found, (row, query)
    assert ambiguous == spans


def test_copy_and_recall_split_the_rows():
    config = induction.ProbeConfig(vocab=500, batch=6, task="copy+recall")
    tokens, mask = induction.task_batch(np.random.default_rng(0), config)
    assert tokens.shape == (6, 64)
    assert all(mask[row].sum() == config.span - 1 for row in range(3))  # copy rows
    assert all(mask[row].sum() % induction.RECALL_VALUE == 0 for row in range(3, 6))
    with pytest.raises(ValueError, match="task='lookup'"):
        induction.ProbeConfig(task="lookup")
