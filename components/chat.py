"""Chat conversations: the ChatML template, checking OpenAI-style messages, rendering them for a
prompt or for training (assistant turns marked as loss targets), and the template's place in a
model folder.

A template is a Jinja string in the form Hugging Face `transformers` keeps as `chat_template`
in `tokenizer_config.json`; it is rendered the way `apply_chat_template` renders it (a sandboxed
Jinja environment, `trim_blocks` and `lstrip_blocks`, `raise_exception` and a JSON `tojson`),
so a model folder written here renders the same in either library.
"""
from __future__ import annotations

import json
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from components import storage

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
"""ChatML's special tokens: a turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`."""
ROLES = ("system", "user", "assistant")
"""The roles a message may have."""
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML as a `transformers` chat template; with add_generation_prompt it ends in `<|im_start|>assistant\\n`."""

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # where transformers keeps `chat_template`
_ASSISTANT = "assistant"


class ChatError(ValueError):
    """A conversation or template that cannot be used; the message names the field (`messages[2].role`)."""


def check_messages(messages: object, where: str) -> list[dict]:
    """Check an OpenAI-style conversation: a non-empty list of {"role": str, "content": str}.

    Args:
        messages: the value to check (parsed JSON, say).
        where: how the caller names this value in messages, e.g. "chat.jsonl:3" or "request";
            every error starts with it.

    Returns:
        The messages as plain dicts holding only "role" and "content" (extra keys, such as
        "name", are dropped).

    Raises:
        ChatError: not a list, empty, an item not an object, a role not in ROLES, or content
            not a string; named as `{where}: messages[i].role=...`.
    """
    if not isinstance(messages, list):
        raise ChatError(f"{where}: messages must be a list of {{'role', 'content'}} objects, "
                        f"not {type(messages).__name__}")
    if not messages:
        raise ChatError(f"{where}: messages is empty; give at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatError(f"{where}: messages[{i}] must be an object with 'role' and 'content', "
                            f"not {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatError(f"{where}: messages[{i}].role={role!r}: must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatError(f"{where}: messages[{i}].content must be a string, not {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def render_prompt(messages: list[dict], template: str) -> str:
    """The conversation rendered with the generation prompt, ready for the model to continue.

    Args:
        messages: checked messages (see `check_messages`).
        template: a Jinja chat template, e.g. CHATML_TEMPLATE.

    Raises:
        ChatError: the template does not compile or fails while rendering.
    """
    return _render(template, messages, add_generation_prompt=True)


def render_for_training(messages: list[dict], template: str) -> list[tuple[str, bool]]:
    """The whole conversation as consecutive text segments, each marked as a loss target or not.

    The segments join to the template's rendering of the conversation. An assistant turn's
    content and what closes it (ChatML: `<|im_end|>`) are targets; role headers, other roles'
    turns and whitespace after a closing `<|im_end|>` (the model stops on that token) are not.

    Supported templates are those that render a conversation prefix-stably, which ChatML and
    most chat templates do: the rendering of messages[:i] begins that of messages[:i] with the
    generation prompt, which begins that of messages[:i+1]. Each turn is then the difference of
    two prefix renderings, and an assistant turn's header is its generation prompt. Templates
    that rewrite earlier turns (drop past reasoning, insert a default system message only in
    some renderings) break this and are refused.

    Args:
        messages: checked messages (see `check_messages`).
        template: a Jinja chat template.

    Returns:
        [(text, is_assistant_target), ...]; empty texts left out.

    Raises:
        ChatError: the template fails, or is not prefix-stable for this conversation.
    """
    segments: list[tuple[str, bool]] = []
    done = _render(template, [], add_generation_prompt=False)
    segments.append((done, False))
    for i, message in enumerate(messages):
        whole = _render(template, messages[: i + 1], add_generation_prompt=False)
        start = done
        if message["role"] == _ASSISTANT:
            header = _render(template, messages[:i], add_generation_prompt=True)
            _require_prefix(done, header, i, "its generation prompt")
            segments.append((header[len(done):], False))
            start = header
        _require_prefix(start, whole, i, "the conversation through it")
        turn = whole[len(start):]
        if message["role"] == _ASSISTANT:
            target, tail = _split_tail(turn)
            segments += [(target, True), (tail, False)]
        else:
            segments.append((turn, False))
        done = whole
    return [(text, target) for text, target in segments if text]


def load_chat_template(model_folder: str) -> str | None:
    """The `chat_template` of a model folder's tokenizer_config.json (path or storage URI), or None.

    Raises:
        ChatError: as `parse_chat_template`.
    """
    uri = storage.join(model_folder, TOKENIZER_CONFIG_FILE)
    return parse_chat_template(storage.read_bytes(uri), uri) if storage.exists(uri) else None


def parse_chat_template(config: bytes, where: str) -> str | None:
    """The `chat_template` in the bytes of a tokenizer_config.json (`where` names it in errors), or None.

    Raises:
        ChatError: not a JSON object, or a chat_template that is not a string (transformers
            also allows a list of named templates; only a single one is read).
    """
    try:
        parsed = json.loads(config)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ChatError(f"{where}: not a JSON tokenizer config ({error})") from None
    if not isinstance(parsed, dict):
        raise ChatError(f"{where}: not a JSON object")
    template = parsed.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise ChatError(f"{where}: chat_template must be a single template string, not {type(template).__name__}")
    return template


def save_chat_template(model_folder: str, template: str | None) -> None:
    """Store `template` as `chat_template` in the folder's tokenizer_config.json, keeping its other keys.

    None writes the file without a template (removing one it held): a model without a chat format.

    Raises:
        ChatError: the template does not compile.
    """
    if template is not None:
        _compile(template)
    uri = storage.join(model_folder, TOKENIZER_CONFIG_FILE)
    config = json.loads(storage.read_text(uri)) if storage.exists(uri) else {}
    config.pop("chat_template", None)
    config |= {"chat_template": template} if template is not None else {}
    storage.write_bytes(uri, (json.dumps(config, indent=2) + "\n").encode("utf-8"))


def _split_tail(turn: str) -> tuple[str, str]:
    """An assistant turn into (target, trailing whitespace after its closing token)."""
    end = turn.rfind(CHAT_TOKENS[1])
    if end < 0 or turn[end + len(CHAT_TOKENS[1]):].strip():
        return turn, ""
    cut = end + len(CHAT_TOKENS[1])
    return turn[:cut], turn[cut:]


def _require_prefix(prefix: str, text: str, i: int, what: str) -> None:
    if not text.startswith(prefix):
        raise ChatError(f"the chat template is not prefix-stable at messages[{i}]: rendering the earlier "
                        f"messages does not begin the rendering of {what}, so the assistant's tokens cannot "
                        "be marked for training; use a prefix-stable template such as ChatML")


def _render(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as error:
        raise ChatError(f"the chat template failed to render: {error}") from None


def _compile(template: str) -> jinja2.Template:
    if not isinstance(template, str):
        raise ChatError(f"chat template must be a string, not {type(template).__name__}")
    return _compile_str(template)


@lru_cache(maxsize=16)
def _compile_str(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateError as error:  # TemplateSyntaxError and friends
        raise ChatError(f"the chat template does not compile: {error}") from None


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON, as transformers gives.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)
