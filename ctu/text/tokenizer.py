"""Build and load tokenizers in Hugging Face format.

The tiny CPU model uses a small byte-level BPE tokenizer trained on the world's own text
with the `tokenizers` library; Qwen checkpoints bring their own. Either way the rest of
ctu only sees a `transformers` tokenizer loaded with `AutoTokenizer.from_pretrained`.
"""

import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from ctu import prompts
from ctu.text import chat_template

# Qwen2's pre-tokenisation regex, with numbers cut into pieces of up to `{digits}`
# digits (1 is Qwen2's; 3 is GPT-4's and Llama 3's); newlines stay apart from words,
# so the text after `<|im_start|>assistant\n` starts a fresh piece.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|\p{Lu}\p{L}*|[^\r\n\p{L}\p{N}]?(?!\p{Lu})\p{L}+"
    r"|\p{N}{1,DIGITS}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The 256 byte symbols plus the special tokens must fit.
MIN_VOCAB_SIZE = 256 + len(chat_template.SPECIAL_TOKENS) + 1
MAX_MODEL_LENGTH = 32768

_SPECIAL_SPLIT = re.compile("|".join(re.escape(t) for t in chat_template.SPECIAL_TOKENS))


def _training_pieces(texts: Iterable[str]) -> Iterable[str]:
    """Texts with the special-token strings cut out, so BPE never learns pieces of them."""
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"tokenizer training texts must be str, got {type(text).__name__}")
        for piece in _SPECIAL_SPLIT.split(text):
            if piece:
                yield piece


def build_tokenizer(
    texts: Sequence[str], out_dir: str, vocab_size: int = 4096, *, max_digits: int = 1
) -> Any:
    """Trains a byte-level BPE tokenizer on `texts` and saves it in Hugging Face format.

    Numbers are pre-split into pieces of at most `max_digits` digits. Longer pieces
    make a phone or account number a few distinctive tokens instead of a run of
    single digits, which a small model copies far more easily.

    `out_dir` gets tokenizer.json and tokenizer_config.json (eos `<|im_end|>`, pad
    `<|endoftext|>`, the tool-capable chat template). Every string in
    `chat_template.SPECIAL_TOKENS` is one token, ids 0..8 in that order. Same texts and
    vocab_size give a byte-identical tokenizer.json.

    Returns the tokenizer loaded back with `transformers.AutoTokenizer`.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + special tokens); pass a larger --vocab_size."
        )
    if not texts:
        raise ValueError("build_tokenizer needs at least one training text; got none.")
    if not 1 <= max_digits <= 9:
        raise ValueError(f"max_digits must be in 1..9, got {max_digits}")
    pattern = PRETOKENIZE_PATTERN.replace("DIGITS", str(max_digits))

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(chat_template.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_pieces(texts), trainer)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in chat_template.CONTROL_TOKENS]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in chat_template.MARKUP_TOKENS]
    )
    return _save_hf(tokenizer, out_dir)


def _save_hf(tokenizer: Tokenizer, out_dir: str) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=chat_template.END_OF_TURN,
        pad_token=chat_template.END_OF_TEXT,
        chat_template=chat_template.CHAT_TEMPLATE,
        model_max_length=MAX_MODEL_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    os.makedirs(out_dir, exist_ok=True)
    # Keep the chat template inside tokenizer_config.json, where every loader looks.
    hf_tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    # transformers 5 writes its own class name; the 4.x name loads in both (vLLM included).
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    return AutoTokenizer.from_pretrained(out_dir)


def load_tokenizer(path: str) -> Any:
    """Loads a Hugging Face tokenizer directory (ours or a Qwen checkpoint's), offline."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"tokenizer directory {path!r} does not exist; build one with "
            "`python -m launch.make_tokenizer --data=data/world --out=DIR`."
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer at {path!r} has no chat template; ctu needs one.")
    return tokenizer


def _read_json(path: str) -> Any:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"world file {path!r} not found; generate the world with "
            "`python -m launch.make_data --out=DIR`."
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_jsonl(path: str) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def world_texts(data_dir: str, tools: Sequence[dict] | None = None) -> list[str]:
    """The world's text, in a fixed order, for training a tokenizer.

    Company names, aliases, industries, department names, descriptions, phone numbers
    and request types; user names and addresses; every task's user request; the tool
    schemas as rendered in the system turn; and the chat template's fixed wording.
    """
    texts: list[str] = []
    for company in _read_json(os.path.join(data_dir, "companies.json")):
        texts.append(company["name"])
        texts.extend(company.get("aliases", []))
        texts.append(company.get("industry", ""))
        for dept in company["departments"]:
            texts.extend([dept["name"], dept["description"], dept["phone_number"]])
            texts.append(" ".join(dept.get("handles", [])))
            texts.append(" ".join(dept.get("auth_fields", [])))
    for profile in _read_json(os.path.join(data_dir, "user_profiles.json")):
        texts.extend(str(profile.get(k) or "") for k in ("name", "address", "date_of_birth"))
    for split in ("train", "val", "test"):
        path = os.path.join(data_dir, f"{split}_tasks.jsonl")
        if os.path.exists(path):
            texts.extend(task["user_request"] for task in _read_jsonl(path))
    for tool in tools or ():
        texts.append(json.dumps(tool, ensure_ascii=False))
    texts.extend([chat_template.TOOLS_PREAMBLE, chat_template.TOOLS_POSTAMBLE])
    return [t for t in texts if t]


def episode_texts(data_dir: str, num_episodes: int, seed: int = 0) -> list[str]:
    """What a policy reads and writes in scripted episodes on the first train tasks (the
    oracle's and the heuristic's, alternating): tool outputs, user replies, final reports.
    Deterministic for a world and seed."""
    from ctu.world import agents, data
    from ctu.world.env import Environment

    world = data.load_world(data_dir)
    env = Environment(world, seed=seed)
    texts: list[str] = []
    for i, task in enumerate(world.split("train")[:num_episodes]):
        policy = agents.Oracle(world) if i % 2 == 0 else agents.Heuristic(seed=seed + i)
        observation = env.reset(task.task_id)
        policy.reset(task.task_id, observation)
        texts.append(observation)
        while True:
            action = policy.act(observation)
            texts.append(json.dumps(dict(action.kwargs), ensure_ascii=False))
            step = env.step(action)
            texts.append(step.observation)
            if step.done:
                break
            observation = step.observation
    return texts


def make_world_tokenizer(
    data_dir: str,
    out_dir: str,
    vocab_size: int,
    tools: Sequence[dict] | None = None,
    *,
    num_episodes: int = 0,
    max_digits: int = 1,
) -> Any:
    """`build_tokenizer` on `world_texts(data_dir, tools)` plus, when num_episodes > 0,
    `episode_texts(data_dir, num_episodes)` and the system turn (instructions and tool
    schemas) once per episode, as often as a policy reads it."""
    texts = world_texts(data_dir, tools)
    if num_episodes > 0:
        texts += episode_texts(data_dir, num_episodes)
        system_turn = [prompts.SYSTEM_PROMPT, chat_template.TOOLS_PREAMBLE]
        system_turn += [json.dumps(tool, ensure_ascii=False) for tool in tools or ()]
        texts += system_turn * num_episodes
    return build_tokenizer(texts, out_dir, vocab_size=vocab_size, max_digits=max_digits)
