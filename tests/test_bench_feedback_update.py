"""The feedback-update benchmark's batches: same episodes, only the critique's place differs."""

import numpy as np
import pytest

from ctu import feedback_guidance as fg
from ctu import prompts
from ctu.bench import feedback_update as bench
from ctu.models.shared_prefix import PREFIX_BUCKET, common_prefix_length
from ctu.text import ConversationBuilder
from ctu.world import tools
from tests import toys


@pytest.fixture(scope="module")
def layouts():
    world, tokenizer = toys.shipped_world(), toys.tiny_tokenizer()
    rows = {layout: bench.episodes(world, tokenizer, layout) for layout in bench.LAYOUTS}
    return rows, tokenizer


def _first_agent_token(mask):
    return mask.index(1)


def test_layouts_hold_the_same_episodes(layouts):
    rows, tokenizer = layouts
    sizes = {layout: len(r) for layout, r in rows.items()}
    assert set(sizes.values()) == {bench.GROUPS * bench.GROUP_SIZE}
    guided_seen = 0
    for i, (plain, turn, inside) in enumerate(zip(*(rows[k] for k in bench.LAYOUTS), strict=True)):
        starts = [_first_agent_token(mask) for _, mask in (plain, turn, inside)]
        if i % bench.GROUP_SIZE == 0:  # rollout 1: no critique in any layout
            assert plain == turn == inside
            continue
        text_turn = tokenizer.decode(turn[0][: starts[1]])
        text_inside = tokenizer.decode(inside[0][: starts[2]])
        assert fg.OPEN_TAG not in tokenizer.decode(plain[0][: starts[0]])
        assert text_turn.count("<|im_start|>system") == 2 and fg.OPEN_TAG in text_turn
        assert text_inside.count("<|im_start|>system") == 1
        assert text_inside.index(fg.OPEN_TAG) < text_inside.index("<tools>")
        # From the first sampled token on, both guided layouts are the same episode.
        assert turn[0][starts[1] :] == inside[0][starts[2] :]
        assert turn[1][starts[1] :] == inside[1][starts[2] :]
        guided_seen += 1
    assert guided_seen == bench.GROUPS * (bench.GROUP_SIZE - 1)


def test_critique_turn_keeps_the_whole_system_turn_shared(layouts):
    rows, tokenizer = layouts
    conv = ConversationBuilder(tokenizer, tools.TOOL_SCHEMAS)
    conv.start(prompts.system_prompt(), "hi")
    shared = {}
    for layout, layout_rows in rows.items():
        batch = bench.rollout_batch(layout_rows, tokenizer.pad_token_id)
        assert batch.tokens.shape[1] % bench.LENGTH_BUCKET == 0
        np.testing.assert_array_equal(batch.mask.sum(1), [sum(m) for _, m in layout_rows])
        shared[layout] = common_prefix_length(batch.tokens, batch.mask)
    # The shared prefix is rounded down to a whole bucket.
    system_turn = conv.system_end // PREFIX_BUCKET * PREFIX_BUCKET
    assert shared["critique_turn"] == shared["baseline"] >= system_turn
    instructions = len(tokenizer.encode(prompts.SYSTEM_PROMPT, add_special_tokens=False))
    assert shared["critique_in_system"] < instructions + 10 < system_turn
