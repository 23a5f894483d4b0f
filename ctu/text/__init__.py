"""Text layer: tokenizers, the chat template, the tool-call parser, conversation ids."""

from ctu.text.chat_template import (
    CHAT_TEMPLATE,
    END_OF_TURN,
    GENERATION_PROMPT,
    SPECIAL_TOKENS,
)
from ctu.text.conversation import ConversationBuilder, assistant_completion
from ctu.text.parser import ParseResult, ToolCall, clean_text, parse_tool_calls
from ctu.text.tokenizer import (
    build_tokenizer,
    episode_texts,
    load_tokenizer,
    make_world_tokenizer,
    world_texts,
)

__all__ = [
    "CHAT_TEMPLATE",
    "END_OF_TURN",
    "GENERATION_PROMPT",
    "SPECIAL_TOKENS",
    "ConversationBuilder",
    "ParseResult",
    "ToolCall",
    "assistant_completion",
    "build_tokenizer",
    "clean_text",
    "episode_texts",
    "load_tokenizer",
    "make_world_tokenizer",
    "parse_tool_calls",
    "world_texts",
]
