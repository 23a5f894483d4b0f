r"""Builds the tiny model's tokenizer from a world:
`python -m launch.make_tokenizer --data=data/world --out=DIR --vocab_size=4096`.

Trains a byte-level BPE on the world's text (ctu.text.world_texts) and the tool outputs of
--episodes scripted episodes (ctu.text.episode_texts), and writes a Hugging
Face tokenizer directory (tokenizer.json, tokenizer_config.json with the chat template).
The same data and vocab_size give a byte-identical tokenizer.json.
"""

from absl import app, flags

from ctu import text

_DATA = flags.DEFINE_string("data", None, "World directory (companies.json, ...).", required=True)
_OUT = flags.DEFINE_string("out", None, "Directory to write the tokenizer into.", required=True)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 4096, "Upper bound on the vocabulary size.")
_EPISODES = flags.DEFINE_integer(
    "episodes", 200, "Scripted train episodes whose tool outputs join the training text."
)


def main(argv):
    del argv
    from ctu.world.tools import TOOL_SCHEMAS

    tokenizer = text.make_world_tokenizer(
        _DATA.value, _OUT.value, _VOCAB_SIZE.value, tools=TOOL_SCHEMAS, num_episodes=_EPISODES.value
    )
    print(f"{_OUT.value}: {len(tokenizer)} tokens")


if __name__ == "__main__":
    app.run(main)
