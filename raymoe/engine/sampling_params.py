"""How one request is decoded: length, randomness, stop conditions (vLLM's names and defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from raymoe.engine.structured import StructuredOutputsParams

INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)
MAX_STOP_STRINGS = 16  # the OpenAI edge allows 4; more is the offline API's
MAX_STOP_STRING_CHARS = 1024  # each step decodes a window of this many tokens per request
MAX_STOP_TOKEN_IDS = 1024  # checked per generated token
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's bound)
MAX_LOGIT_BIAS = 1024  # entries per request: each becomes one element of the step's bias tensor
MAX_ALLOWED_TOKEN_IDS = 1 << 18  # allowed_token_ids per request (more than any vocabulary served)
MAX_BAD_WORDS = 64  # bad_words per request: each is checked against the output's tail per step


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    """Per-request decoding parameters; every bad value is a ValueError naming its field.

    temperature 0 is greedy. top_k -1 (or 0) and top_p 1 switch those filters off. seed makes the
    request's draws reproducible whatever else is in the batch. stop strings end the output before
    the match (the matched text is not returned); stop_token_ids and the model's EOS end it after
    the token (EOS unless ignore_eos). logprobs=True returns the log-probability, under the model's
    raw distribution, of every generated token; top_logprobs > 0 (with logprobs) also the most
    likely `top_logprobs` tokens of each step and their log-probabilities.

    Logits processing (vLLM's semantics, applied in the sampler before temperature, greedy too):
    repetition_penalty (1 off) divides a positive logit and multiplies a negative one of every
    token seen in the prompt or the output; frequency_penalty subtracts its value times the
    token's count in the output, presence_penalty its value once for a token in the output;
    logit_bias adds to the named token ids' logits (OpenAI's [-100, 100]); min_tokens keeps EOS
    and stop_token_ids from being drawn before that many tokens are generated; allowed_token_ids
    masks every other token; bad_words (strings, tokenized with and without a leading space) ban
    a word's last token whenever the output ends with the rest of it (a one-token word always);
    min_p drops the tokens whose probability, after temperature, is below min_p times the most
    likely one's.

    prompt_logprobs=N (vLLM's): the logprob and rank of every prompt token after the first and its
    N most likely alternatives (N=0: none), under the raw model; such a request is prefilled in
    full (the prefix cache is not read for it: its positions must be computed).
    include_stop_str_in_output keeps the matched stop string in the text; skip_special_tokens=False
    shows special tokens (EOS...) in it; spaces_between_special_tokens=False joins adjacent ones
    without a space (the tokenizer's decoder decides: DeepSeek-V3's byte-level one never adds one).
    structured_outputs: the output must match this grammar (JSON schema, regex, choice, Lark/GBNF;
    `raymoe.engine.structured`), enforced by masking every token it does not allow.

    Every value fits the tensor it becomes (int64, finite float32), so nothing a request carries
    can fail a batch: the engine checks again (`validate`) when it admits a request, since a
    dataclass that crossed a process boundary was not re-constructed.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    prompt_logprobs: int | None = None
    min_p: float = 0.0
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check (and normalise) every field; ValueError starting with the field's name. Idempotent."""
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT64_MAX:
            raise ValueError(f"max_tokens must be an integer in [1, 2**63 - 1], got {self.max_tokens!r}")
        if not _is_number(self.temperature):
            raise ValueError(f"temperature must be a number, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or not 0 <= self.temperature <= 1e6:
            raise ValueError(f"temperature must be finite and in [0, 1e6], got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:  # NaN fails the comparison too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= INT64_MAX:
            raise ValueError(f"top_k must be -1 (off), 0 (off) or a positive integer below 2**63, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not INT64_MIN <= self.seed <= INT64_MAX):
            raise ValueError(f"seed must be an integer in [-2**63, 2**63 - 1] or None, got {self.seed!r}")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop if isinstance(self.stop, list | tuple) else None
        if stop is None and self.stop is not None:
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        stop = list(stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in stop):
            raise ValueError(
                f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_STRING_CHARS} characters"
            )
        self.stop_strings = tuple(stop)
        ids = self.stop_token_ids if self.stop_token_ids is not None else []
        if not isinstance(ids, list | tuple) or not all(_is_int(i) and 0 <= i <= INT64_MAX for i in ids):
            raise ValueError(f"stop_token_ids must be non-negative integers below 2**63, got {self.stop_token_ids!r}")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}")
        self.stop_token_ids = list(ids)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs must be a bool, got {self.logprobs!r}")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
            setattr(self, name, float(v))
        rp = self.repetition_penalty
        if not _is_number(rp) or not 0 < rp <= 1e6:
            raise ValueError(f"repetition_penalty must be in (0, 1e6], got {rp!r}")
        self.repetition_penalty = float(rp)
        bias = self.logit_bias if self.logit_bias is not None else {}
        if not isinstance(bias, dict) or not all(
            _is_int(k) and 0 <= k <= INT64_MAX and _is_number(v) and -100 <= v <= 100 for k, v in bias.items()
        ):
            raise ValueError(f"logit_bias must map token ids to numbers in [-100, 100], got {self.logit_bias!r}")
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} entries, got {len(bias)}")
        self.logit_bias = {k: float(v) for k, v in bias.items()} or None
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        self._validate_extensions()
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got {self.structured_outputs!r}")
            self.structured_outputs.validate()
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        if self.top_k == 0:
            self.top_k = -1

    def _validate_extensions(self) -> None:
        """vLLM's prompt_logprobs, min_p, allowed_token_ids, bad_words and detokenization switches."""
        n = self.prompt_logprobs
        if n is not None and (not _is_int(n) or not 0 <= n <= MAX_TOP_LOGPROBS):
            raise ValueError(f"prompt_logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}], got {n!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        self.min_p = float(self.min_p)
        ids = self.allowed_token_ids
        if ids is not None and (
            not isinstance(ids, list | tuple) or not ids or len(ids) > MAX_ALLOWED_TOKEN_IDS
            or not all(_is_int(i) and 0 <= i <= INT64_MAX for i in ids)
        ):
            raise ValueError(
                f"allowed_token_ids must be None or 1 to {MAX_ALLOWED_TOKEN_IDS} non-negative token ids, got {ids!r}"[:300]
            )
        self.allowed_token_ids = list(ids) if ids is not None else None
        words = self.bad_words if self.bad_words is not None else []
        if (
            not isinstance(words, list | tuple) or len(words) > MAX_BAD_WORDS
            or not all(isinstance(w, str) and w.strip() and len(w) <= MAX_STOP_STRING_CHARS for w in words)
        ):
            raise ValueError(
                f"bad_words must be at most {MAX_BAD_WORDS} non-blank strings of at most {MAX_STOP_STRING_CHARS} "
                f"characters, got {self.bad_words!r}"[:300]
            )
        self.bad_words = list(words) or None
        for name in ("include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        """Whether the sampler needs this request's token counts (any penalty is on)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
