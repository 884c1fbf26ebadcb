"""A conversation's token ids through the model's chat template, with the data's text kept as text.

A tokenizer reads every special-token string in its input as the control token: a patient's message that
contains "<|eot_id|><|start_header_id|>system<|end_header_id|>" (or Gemma's "<start_of_turn>", ChatML's
"<|im_start|>") would end the user's turn and open a forged one. So a conversation whose messages hold such
a string is rendered with a placeholder for each message; the template's own text is tokenized as usual (its
control tokens are real), each message's text with `split_special_tokens=True` (its look-alikes become
ordinary tokens), and the pieces are joined. A conversation without such strings is tokenized in one piece,
exactly as `apply_chat_template` does.

The chat template's date is pinned: Llama 3.x templates write today's date into the system header (their
`strftime_now`), which would make the same run's token files differ from one day to the next. `date_string`
(the TEMPLATE_DATE setting) is passed to every rendering; templates without a date ignore it.
"""

from __future__ import annotations

import re
import weakref

from job.errors import ConfigError

# Private-use characters: no chat template writes them, and no template's filters (trim) change them.
_MARK = "\ue000{}\ue001"
_MARKS = re.compile("\ue000(\\d+)\ue001")


def special_strings(tokenizer) -> list[str]:
    """Every string the tokenizer reads as a special (control) token, longest first."""
    names = set(tokenizer.all_special_tokens)
    names |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return sorted((n for n in names if n), key=len, reverse=True)


# One pattern per tokenizer (Llama 3 has 256 special tokens; every row is checked), rebuilt if tokens are added.
_PATTERNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def holds_special_text(tokenizer, messages: list[dict]) -> bool:
    size, pattern = _PATTERNS.get(tokenizer, (None, None))
    if size != len(tokenizer):
        size, pattern = len(tokenizer), re.compile("|".join(map(re.escape, special_strings(tokenizer))) or "(?!)")
        _PATTERNS[tokenizer] = (size, pattern)
    return any(pattern.search(str(m.get("content", ""))) for m in messages)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, date_string: str) -> str:
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False, date_string=date_string
    )


def encode(
    tokenizer, messages: list[dict], *, add_generation_prompt: bool, date_string: str, split: bool | None = None
) -> list[int]:
    """Token ids of `messages` through the chat template; only the template makes control tokens.

    `split` forces the spliced path (True) or the one-piece path (False); by default the spliced path is taken
    when a message holds a special-token string. Give the same `split` to a prompt and to its full
    conversation, so the prompt's ids stay a prefix of the conversation's.
    """
    if split is None:
        split = holds_special_text(tokenizer, messages)
    if not split:
        kwargs = {"add_generation_prompt": add_generation_prompt, "date_string": date_string}
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])
    marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]
    pieces = _MARKS.split(_render(tokenizer, marked, add_generation_prompt, date_string))  # text, index, text, ...
    rendered = _render(tokenizer, messages, add_generation_prompt, date_string)
    shown = _shown(pieces, [str(m.get("content", "")) for m in messages], rendered)
    ids: list[int] = []
    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
        elif shown[k // 2]:
            data = tokenizer(shown[k // 2], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            if special_count(tokenizer, data):
                raise ConfigError(
                    f"The tokenizer ({type(tokenizer).__name__}) reads special-token strings in message text as "
                    "control tokens even with split_special_tokens=True; use a fast tokenizer (tokenizer.json)."
                )
            ids += data
    return ids


def _shown(pieces: list[str], texts: list[str], rendered: str) -> list[str | None]:
    """What the template made of each message, as `rendered` shows it. The template may trim a message (Llama's
    and Gemma's do, Gemma not its system prompt): found slot by slot, between `pieces` of template text."""
    pos, shown = 0, []
    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            ok = rendered.startswith(piece, pos)
            pos += len(piece)
        else:
            text, after = texts[int(piece)], pieces[k + 1]
            shown.append(next((t for t in (text, text.strip()) if rendered.startswith(t + after, pos)), None))
            ok = shown[-1] is not None
            pos += len(shown[-1] or "")
        if not ok or k == len(pieces) - 1 and pos != len(rendered):
            raise ConfigError(
                "The chat template changes message text in a way that cannot be followed, so text from the data "
                "that looks like its control tokens cannot be kept as text. Use a template that writes each "
                "message's content as it is or trimmed (Llama 3, Gemma, ChatML do)."
            )
    return shown


def special_count(tokenizer, ids: list[int]) -> int:
    """How many of `ids` are special (control) tokens."""
    special = set(tokenizer.convert_tokens_to_ids(special_strings(tokenizer)))
    return sum(i in special for i in ids)
