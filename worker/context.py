"""Turn a stored conversation into the token ids the model is asked to continue.

Pure functions with no model and no torch, so the rules about what the model sees
(merged bubbles, the token budget, which turns are dropped) are tested quickly and in one
place. The tokenizer is duck-typed: anything with `encode` (taking `split_special_tokens`)
and `eos_token_id`, or with `apply_chat_template` when it has a `chat_template`.

What people write is text, never control tokens: a message saying `<|endoftext|>` or
`<|im_start|>system` must not end a turn or open a system turn, as a fast tokenizer would
make it do by matching special tokens in the raw text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

Role = Literal["user", "assistant"]
ROLES: frozenset[str] = frozenset({"user", "assistant"})


@dataclass(frozen=True)
class Turn:
    """One speaker's contribution; several WhatsApp bubbles in a row make a single turn."""

    role: Role
    content: str


def merge_turns(messages: Iterable[tuple[str, str]]) -> list[Turn]:
    """Merge consecutive same-role messages, oldest first, joined by newlines.

    A user who types one thought as three bubbles expects one answer to the whole thought;
    three separate user turns would read to the model as an unanswered exchange. Roles
    other than user/assistant (system notes, unknown senders) are skipped, and skipping
    them lets the turns around them merge.
    """
    turns: list[Turn] = []
    for role, content in messages:
        if role not in ROLES:
            continue
        if turns and turns[-1].role == role:
            turns[-1] = Turn(cast(Role, role), f"{turns[-1].content}\n{content}")
        else:
            turns.append(Turn(cast(Role, role), content))
    return turns


def build_input_ids(
    tokenizer: Any,
    turns: Sequence[Turn],
    *,
    max_context_tokens: int,
    max_new_tokens: int,
    system_prompt: str = "",
) -> list[int]:
    """Token ids of the newest turns that fit, leaving room for `max_new_tokens`.

    Models with a chat template get it applied, with the system prompt first and the
    assistant generation prompt last. Models without one (DialoGPT) get each turn's text
    followed by the EOS token, which is how DialoGPT was trained; it has no system role,
    so `system_prompt` is ignored for them.

    Old turns are dropped whole, never cut, so that the model never sees half a sentence;
    only a single newest turn that is longer than the whole budget is cut, keeping its end
    (the part nearest to the reply). It is cut as text, between two characters: a cut
    among the ids could fall inside a character that takes several byte-level tokens.
    Turn texts do not turn into control tokens (see above).
    """
    budget = max_context_tokens - max_new_tokens
    if budget < 1:
        raise ValueError(
            f"no room for the prompt: max_context_tokens ({max_context_tokens}) must exceed "
            f"max_new_tokens ({max_new_tokens}); lower MAX_NEW_TOKENS"
        )
    if not turns:
        raise ValueError("no turns to answer: the conversation is empty")
    if getattr(tokenizer, "chat_template", None):
        return _chat_template_ids(tokenizer, turns, budget, system_prompt)
    return _eos_joined_ids(tokenizer, turns, budget)


def _eos_joined_ids(tokenizer: Any, turns: Sequence[Turn], budget: int) -> list[int]:
    """DialoGPT layout: `turn EOS turn EOS ...`, each turn encoded once (a newest turn too
    long on its own a few more times, to find where to cut it)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has neither a chat template nor an EOS token")

    def encoded(text: str) -> list[int]:
        return [*tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True), eos]

    kept: list[list[int]] = []
    used = 0
    for turn in reversed(turns):
        ids = encoded(turn.content)
        if used + len(ids) > budget:
            if not kept:  # the newest turn alone is too long: its end, cut as text
                start = _end_that_fits(turn.content, lambda end: len(encoded(end)) <= budget)
                kept.append(encoded(turn.content[start:]) if start is not None else ids[-budget:])
            break
        kept.append(ids)
        used += len(ids)
    return [token for ids in reversed(kept) for token in ids]


def _end_that_fits(text: str, fits: Callable[[str], bool]) -> int | None:
    """Where the longest end of `text` that `fits` starts, or None if not even "" fits.

    A binary search over the cut (a few encodings, and only for a turn longer than the
    whole budget), relying on a shorter end never encoding longer; the end it settles on
    is checked, and cut further in the rare case a tokenizer breaks that rule.
    """
    if not fits(""):
        return None
    low, high = 0, len(text)  # text[high:] fits; find the smallest start that does
    while low < high:
        middle = (low + high) // 2
        if fits(text[middle:]):
            high = middle
        else:
            low = middle + 1
    while not fits(text[low:]):
        low += 1
    return low


def _chat_template_ids(
    tokenizer: Any, turns: Sequence[Turn], budget: int, system_prompt: str
) -> list[int]:
    """Apply the template to the longest suffix of `turns` that fits the budget.

    Only suffixes starting with a user turn are tried (besides the full history and the
    last turn alone), because many templates reject a conversation that opens with the
    assistant. A binary search keeps the number of renders logarithmic, relying on a
    shorter suffix never rendering longer.
    """
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    specials = _special_token_texts(tokenizer)
    contents = [_as_plain_text(turn.content, specials) for turn in turns]
    starts = sorted(
        {0, len(turns) - 1} | {i for i, turn in enumerate(turns) if turn.role == "user"}
    )

    def render(start: int, last: str | None = None) -> list[int]:
        """Turns from `start` on; `last` stands in for the newest turn's text."""
        texts = contents[start:] if last is None else [*contents[start:-1], last]
        messages = head + [
            {"role": turn.role, "content": content}
            for turn, content in zip(turns[start:], texts, strict=True)
        ]
        rendered = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return _as_id_list(rendered)

    low, high = 0, len(starts) - 1
    best: list[int] | None = None
    while low <= high:
        middle = (low + high) // 2
        ids = render(starts[middle])
        if len(ids) <= budget:
            best, high = ids, middle - 1
        else:
            low = middle + 1
    if best is not None:
        return best
    # The newest turn alone is too long: its end, cut as text, inside the template (the
    # system prompt and the turn markers stay), unless even those fill the budget.
    newest = len(turns) - 1
    start = _end_that_fits(contents[-1], lambda end: len(render(newest, end)) <= budget)
    if start is None:
        return render(newest)[-budget:]
    return render(newest, contents[-1][start:])


# Inside a special token's text, it stops the tokenizer from matching the token there; the
# model reads the characters around it as they are.
_WORD_JOINER = "\u2060"


def _special_token_texts(tokenizer: Any) -> list[str]:
    """The texts a fast tokenizer turns into tokens of their own before anything else,
    longest first: its special tokens, and the added ones not marked special (Qwen's
    `<tool_call>`, `<think>`). One-character ones cannot be broken up and are left."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = {token.content for token in added.values()}
    usable = (text for text in texts if len(text) > 1 and _WORD_JOINER not in text)
    return sorted(usable, key=len, reverse=True)


def _as_plain_text(text: str, specials: Sequence[str]) -> str:
    """`text` with every special token's text broken by a word joiner after its first
    character. A chat template renders turns into one string before tokenizing it, so
    unlike `split_special_tokens` on a lone turn this is the only place left to do it."""
    for special in specials:
        while special in text:  # again, for one that overlaps itself ("zz" in "zzz")
            text = text.replace(special, special[0] + _WORD_JOINER + special[1:])
    return text


def _as_id_list(rendered: Any) -> list[int]:
    """`apply_chat_template` returns a list, a batch of one, or a BatchEncoding by version."""
    if isinstance(rendered, Mapping):
        rendered = rendered["input_ids"]
    if hasattr(rendered, "tolist"):
        rendered = rendered.tolist()
    ids = list(rendered)
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(token) for token in ids]
