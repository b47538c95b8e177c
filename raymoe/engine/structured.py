"""Structured output: a request's grammar (JSON schema, regex, choice, Lark/GBNF) enforced token by token.

vLLM v1's design over llguidance (MIT, Rust, CPU; no torch/transformers pulled in). The grammar
matchers live in the engine (the driver), one per constrained request, compiled from a cache keyed
by the grammar spec. Each step the engine fills a packed token bitmask ([rows, ceil(vocab/32)]
int32, bit t of a row set = token t allowed; -1 for a row without a grammar) for the step's
sampled rows and ships it in `SamplingMetadata.grammar_bitmask`, None when no row has a grammar;
the `Sampler` masks the disallowed tokens to -inf, on whichever process samples (the local runner
or TP rank 0 of an expert-parallel unit's workers). After sampling, the engine advances each
matcher with the accepted token; a matcher that has reached its end state finishes the request
(finish_reason "stop"), and EOS is allowed by the mask only where the grammar may end. Across the
prefill -> decode handoff the decode engine replays the output tokens into a fresh matcher.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import llguidance

    from raymoe.model.tokenizer import Tokenizer

GRAMMAR_CACHE_SIZE = 256  # compiled matchers kept (a request deep-copies one)
MAX_GRAMMAR_CHARS = 1 << 20  # a spec longer than this is refused before compiling

_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def _is_str_list(v: object) -> bool:
    return isinstance(v, list | tuple) and bool(v) and all(isinstance(s, str) for s in v)


@dataclass(slots=True)
class StructuredOutputsParams:
    """What a request's output must match: exactly one of json (a JSON schema, dict or JSON text),
    regex, choice (the output is one of the strings), grammar (Lark as llguidance reads it, or GBNF)
    or json_object (any JSON object). vLLM's `StructuredOutputsParams` names.

    whitespace_flexible: JSON may carry whitespace between tokens (vLLM's `disable_any_whitespace`
    false); off by default: compact JSON, which a model cannot pad forever. whitespace_pattern: the
    regex JSON whitespace must match (vLLM's `guided_whitespace_pattern`).
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    whitespace_flexible: bool = False
    whitespace_pattern: str | None = None

    def validate(self) -> None:
        """Shape checks (ValueError starting with the field's name); `compile_grammar` checks the grammar itself."""
        kinds = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError(
                f"structured_outputs needs exactly one of {', '.join(_KINDS)}, got {', '.join(kinds) or 'none'}"
            )
        if self.json is not None and not isinstance(self.json, dict | str):
            raise ValueError("structured_outputs.json must be a JSON schema (an object or its JSON text)")
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError("structured_outputs.regex must be a string")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise ValueError("structured_outputs.grammar must be a string")
        if self.choice is not None and not _is_str_list(self.choice):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")
        if not isinstance(self.json_object, bool) or not isinstance(self.whitespace_flexible, bool):
            raise ValueError("structured_outputs.json_object and whitespace_flexible are booleans")
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            raise ValueError("structured_outputs.whitespace_pattern must be a string")
        if len(self.key()) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"structured_outputs: the grammar spec is longer than {MAX_GRAMMAR_CHARS} characters")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def key(self) -> str:
        """The spec as canonical JSON: the compile cache's key."""
        return json.dumps(
            [self.json, self.regex, self.choice, self.grammar, self.json_object, self.whitespace_flexible,
             self.whitespace_pattern],
            sort_keys=True, separators=(",", ":"),
        )


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The spec as an llguidance grammar (not checked yet); ValueError naming the field when it is not readable."""
    import llguidance as llg

    kind = spec.kind
    if kind in ("json", "json_object"):
        schema: Any = {"type": "object"} if kind == "json_object" else spec.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
        if not isinstance(schema, dict | bool):
            raise ValueError("structured_outputs.json must be a JSON schema object")
        options: dict[str, Any] = {"whitespace_flexible": spec.whitespace_flexible}
        if spec.whitespace_pattern is not None:
            options["whitespace_pattern"] = spec.whitespace_pattern
        try:
            return llg.LLMatcher.grammar_from_json_schema(schema, overrides=options)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"structured_outputs.json: {exc}") from None
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec.regex or "")
    if kind == "choice":
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice or []))
    try:
        return llg.grammar_from("grammar", spec.grammar or "")  # Lark, or GBNF converted to Lark
    except ValueError as exc:
        raise ValueError(f"structured_outputs.grammar: {exc}") from None


def check_grammar(spec: StructuredOutputsParams) -> None:
    """ValueError naming the field when the spec does not compile (no tokenizer needed: the edge's check)."""
    import llguidance as llg

    spec.validate()
    error = llg.LLMatcher.validate_grammar(grammar_text(spec))
    if error:
        raise ValueError(f"structured_outputs.{spec.kind}: cannot be compiled: {error.strip()[:500]}")


def _first_line(matcher: llguidance.LLMatcher) -> str:
    """The matcher's error without the parser state it appends (what a client can read)."""
    return matcher.get_error().strip().split("\n", 1)[0][:300]


class StructuredOutputManager:
    """The engine's grammar matchers, per request id; the step's bitmask; token acceptance.

    tokenizer: the checkpoint's (llguidance reads its tokenizer.json vocabulary, special tokens
    included), or None for a checkpoint without one (then structured requests are refused).
    The llguidance tokenizer is built at the first structured request (about a second for a
    128k-token vocabulary, a few ms for the tiny one), not at engine start.
    """

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self.words = -(-vocab_size // 32)  # int32 words per bitmask row

    @property
    def active(self) -> bool:
        """Whether any admitted request has a grammar (otherwise a step builds no bitmask at all)."""
        return bool(self._matchers)

    def has(self, request_id: str) -> bool:
        return request_id in self._matchers

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            if self._hf_tokenizer is None:
                raise ValueError("structured output needs the checkpoint's tokenizer.json")
            import llguidance as llg

            self._tokenizer = llg.LLTokenizer(
                self._hf_tokenizer.to_str(), n_vocab=self.vocab_size, eos_token=self.eos_token_ids or None
            )
            self._executor = llg.LLExecutor()
        return self._tokenizer

    def compile(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A fresh matcher for the spec (compiled once per distinct spec, then copied)."""
        import llguidance as llg

        key = spec.key()
        base = self._compiled.get(key)
        if base is None:
            base = llg.LLMatcher(self._llg_tokenizer(), grammar_text(spec), log_level=0)
            if base.is_error():
                raise ValueError(
                    f"structured_outputs.{spec.kind}: cannot be compiled: {base.get_error().strip()[:500]}"
                )
            self._compiled[key] = base
            if len(self._compiled) > GRAMMAR_CACHE_SIZE:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return base.deep_copy()

    def add(self, request_id: str, spec: StructuredOutputsParams, output_ids: Sequence[int] = ()) -> bool:
        """Start the request's matcher, replaying `output_ids` already generated (the decode side of a
        handoff); True when those tokens already complete the grammar. ValueError for a bad spec."""
        matcher = self.compile(spec)
        if output_ids and not matcher.consume_tokens(list(output_ids)):
            raise ValueError(f"structured output: the handed-off tokens do not match the grammar ({_first_line(matcher)})")
        self._matchers[request_id] = matcher
        return matcher.is_stopped()

    def accept(self, request_id: str, token: int) -> bool:
        """Advance the request's matcher by its sampled token; True when the grammar is complete."""
        matcher = self._matchers[request_id]
        if not matcher.consume_token(token):
            raise ValueError(f"structured output: token {token} is not allowed by the grammar ({_first_line(matcher)})")
        return matcher.is_stopped()

    def release(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def bitmask(self, request_ids: Sequence[str]) -> torch.Tensor | None:
        """[len(request_ids), words] int32 of the step's sampled rows (-1: no grammar); None when no row has one."""
        rows = [(m, i) for i, rid in enumerate(request_ids) if (m := self._matchers.get(rid)) is not None]
        if not rows:
            return None
        import llguidance.torch as llt

        mask = torch.full((len(request_ids), self.words), -1, dtype=torch.int32)
        assert self._executor is not None
        llt.fill_next_token_bitmask_par(self._executor, rows, mask)
        return mask
