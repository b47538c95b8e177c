"""Tool calls in DeepSeek-V3's format: the tools in the prompt, the forcing grammar, the parser.

DeepSeek-V3 writes a turn's calls as
`<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>`
(more calls joined by "\\n") `<｜tool▁calls▁end｜>`, and reads tool results as
`<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>...<｜tool▁output▁end｜><｜tool▁outputs▁end｜>`.
The published chat template does not render `tools` (and leaves a single call unclosed), so a
request that uses tools is rendered with `TOOL_CHAT_TEMPLATE` (DeepSeek-V3's, tool calls closed,
content before calls kept) and the tools are described in the system prompt (vLLM's DeepSeek-V3
tool template's wording). tool_choice "required" or a named function is forced with a grammar
over that text whose arguments follow each function's `parameters` schema (`tool_call_grammar`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from raymoe.model.tokenizer import Tokenizer

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"

# DeepSeek-V3's template with the tool calls of an assistant turn rendered after its content and
# closed (calls joined by "\n", then calls-end and EOS), and the tool outputs of each turn counted afresh.
TOOL_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{%- else %}{{'<｜Assistant｜>'}}{%- endif %}"
    "{%- set ns.is_tool = false -%}{%- set ns.is_output_first = true -%}{{message['content']}}"
    "{%- if message['tool_calls'] %}{{'<｜tool▁calls▁begin｜>'}}"
    "{%- for tool in message['tool_calls'] %}{%- if not loop.first %}{{'\\n'}}{%- endif %}"
    "{{'<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json'"
    " + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- endfor %}{{'<｜tool▁calls▁end｜>'}}{%- endif %}{{'<｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)

_TOOLS_PREAMBLE = (
    "You are a helpful assistant with tool calling capabilities. When a tool call is needed, you MUST use the "
    "following format to issue the call:\n"
    f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}FUNCTION_NAME\n```json\n"
    '{"param1": "value1", "param2": "value2"}\n'
    f"```{CALL_END}{CALLS_END}\n\n"
    "Make sure the JSON is valid.\n## Tools\n\n### Function\n\nYou have the following functions available:\n\n"
)


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The system-prompt text that describes `tools` (OpenAI's [{"type": "function", "function": {...}}])."""
    parts = [_TOOLS_PREAMBLE]
    for tool in tools:
        fn = tool["function"]
        parts.append(f"- `{fn['name']}`:\n```json\n{json.dumps(fn, ensure_ascii=False)}\n```\n")
    return "".join(parts)


@dataclass(slots=True)
class ToolTokens:
    """The ids of DeepSeek-V3's tool-call special tokens in this tokenizer."""

    calls_begin: int
    calls_end: int
    call_begin: int
    call_end: int
    sep: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> ToolTokens | None:
        """None when the tokenizer lacks one of them (tools are then refused)."""
        ids = [tokenizer.token_to_id(t) for t in (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)]
        if any(i is None for i in ids):
            return None
        return cls(*ids)  # type: ignore[arg-type]


def tool_call_grammar(tools: list[dict[str, Any]], name: str | None, parallel: bool, tokens: ToolTokens) -> str:
    """Lark (llguidance's, `%json` for the arguments) for a turn that is only tool calls: one call of
    `name`, or of any tool (name None); several, joined by "\\n", when `parallel`."""
    fns = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    lines = [
        f"start: <[{tokens.calls_begin}]> call " + ('("\\n"? call)* ' if parallel else "") + f"<[{tokens.calls_end}]>",
        f'call: <[{tokens.call_begin}]> "function" <[{tokens.sep}]> fn <[{tokens.call_end}]>',
        "fn: " + " | ".join(f"fn_{i}" for i in range(len(fns))),
    ]
    for i, fn in enumerate(fns):
        # compact JSON, as the format's example: whitespace a model could pad without end is not offered
        schema = {**(fn.get("parameters") or {"type": "object"}), "x-guidance": {"whitespace_flexible": False}}
        lines.append(f'fn_{i}: {json.dumps(fn["name"] + chr(10) + "```json" + chr(10))} args_{i} "\\n```"')
        lines.append(f"args_{i}: %json {json.dumps(schema)}")
    return "\n".join(lines) + "\n"


@dataclass(slots=True)
class ToolCall:
    """One parsed call: OpenAI's `tool_calls` entry."""

    name: str
    arguments: str  # JSON text, as the model wrote it
    id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex}")

    def body(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:  # a streamed delta names its call's position
            out = {"index": index, **out}
        return out


_CALL = re.compile(
    re.escape(CALL_BEGIN) + r"(?P<type>[^\n]*?)" + re.escape(SEP) + r"(?P<name>[^\n]*)\n```json\n(?P<args>.*?)\n```"
    + re.escape(CALL_END),
    re.DOTALL,
)


def parse_tool_calls(text: str, parallel: bool = True) -> tuple[str, list[ToolCall]]:
    """(content before the calls, the calls) of a model output with special tokens kept; no calls:
    (text, []). `parallel` False keeps the first call only."""
    at = text.find(CALLS_BEGIN)
    if at < 0:
        return text, []
    calls = [ToolCall(m["name"].strip(), m["args"].strip()) for m in _CALL.finditer(text, at)]
    if not calls:
        return text, []
    return text[:at], calls if parallel else calls[:1]


class ToolCallStream:
    """One choice's output while tools may be called: content shown until the calls begin, then held;
    each call parsed as soon as its `<｜tool▁call▁end｜>` arrives (streamed whole, in one delta)."""

    __slots__ = ("_tokenizer", "_tokens", "_parallel", "_ids", "_calls_at", "_sent", "num_calls")

    def __init__(self, tokenizer: Tokenizer, tokens: ToolTokens, parallel: bool) -> None:
        self._tokenizer = tokenizer
        self._tokens = tokens
        self._parallel = parallel
        self._ids: list[int] = []
        self._calls_at: int | None = None  # index in the output of the calls-begin token
        self._sent = 0  # content characters given out
        self.num_calls = 0  # calls given out

    def push(self, ids: list[int], text: str) -> tuple[str, list[ToolCall]]:
        """(content to show now, calls completed now) for a chunk whose tokens decode to `text`."""
        start = len(self._ids)
        self._ids.extend(ids)
        if self._calls_at is None:
            if self._tokens.calls_begin not in ids:
                self._sent += len(text)
                return text, []
            self._calls_at = start + ids.index(self._tokens.calls_begin)
        if self._tokens.call_end not in ids:
            return "", []
        return self._complete()

    def _complete(self) -> tuple[str, list[ToolCall]]:
        """The content before the calls not given out yet and the complete calls not given out yet."""
        assert self._calls_at is not None
        tok = self._tokenizer
        before = tok.decode(self._ids[: self._calls_at])
        content, calls = parse_tool_calls(before + tok.decode(self._ids[self._calls_at :], skip_special_tokens=False),
                                          self._parallel)
        if not calls:
            return "", []
        rest, self._sent = content[self._sent :], max(self._sent, len(content))
        new, self.num_calls = calls[self.num_calls :], len(calls)
        return rest, new

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not shown yet, calls not given out yet) once the output is complete; an output whose
        calls never came out well-formed is content, as written."""
        if self._calls_at is None:
            return "", []
        rest, new = self._complete()
        if not self.num_calls:
            return self._tokenizer.decode(self._ids)[self._sent :], []
        return rest, new
