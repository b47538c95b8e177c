"""What happens to a sampled token on the host: append, stop checks, finish, outputs and their text.

`OutputProcessor` is the engine's per-token path (vLLM v1's split: the engine core schedules and
runs, this turns samples into request outputs). `IncrementalDetokenizer` is the streaming side of
the same text, used wherever tokens are shown as they arrive (the serving ingress).
"""

from __future__ import annotations

from raymoe.engine.executor import TopLogprobs
from raymoe.engine.outputs import RequestOutput
from raymoe.engine.sequence import Sequence
from raymoe.model.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """One request's text as its tokens arrive: only complete characters, stop-string prefixes held back.

    hold: characters of the newest text kept back as the possible start of a stop string, so that
    what was sent never reaches into a match the engine cuts off. Built on `tokenizers`'
    DecodeStream: a push decodes only its new tokens (with the little context the decoder needs),
    not the whole output again.
    """

    __slots__ = ("_tokenizer", "_step", "_ids", "_tail", "_sent", "_pending", "hold", "_skip_special")

    def __init__(self, tokenizer: Tokenizer, hold: int = 0, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._step = tokenizer.decode_stream(skip_special_tokens)
        self._ids: list[int] = []  # for the final decode when the last character stays incomplete
        self._tail = ""  # complete text decoded but not sent yet (at most `hold` characters between pushes)
        self._sent = 0  # characters returned so far
        self._pending = False  # the newest token ends inside a character
        self.hold = hold

    def push(self, ids: list[int]) -> str:
        """The new text that can be shown now (possibly empty)."""
        self._ids.extend(ids)
        for i in ids:
            piece = self._step(i)
            self._pending = piece is None
            if piece:
                self._tail += piece
        end = len(self._tail) - self.hold
        if end <= 0:
            return ""
        out, self._tail = self._tail[:end], self._tail[end:]
        self._sent += end
        return out

    def finish(self, final_text: str | None) -> str:
        """The rest of the text. final_text: the engine's whole output text (a stop string's match cut off),
        or None for that of every token pushed (an incomplete last character as U+FFFD, as `decode` has it)."""
        if final_text is not None:
            out = final_text[self._sent :]
        elif self._pending:
            out = self._tokenizer.decode(self._ids, self._skip_special)[self._sent :]
        else:
            out = self._tail
        self._sent += len(out)
        self._tail = ""
        return out


class OutputProcessor:
    """Appends each sampled token to its sequence, decides whether it ends the request, builds the outputs.

    eos_token_ids: the model's and the tokenizer's end tokens (ignored with `ignore_eos`). Stop
    strings need the tokenizer; the engine refuses them at admission without one.
    """

    __slots__ = ("tokenizer", "eos_token_ids")

    def __init__(self, tokenizer: Tokenizer | None, eos_token_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids

    def append_token(
        self, seq: Sequence, token: int, logprob: float | None, top: TopLogprobs | None = None
    ) -> bool:
        """Add a generated token; True when it ends the request (finish_reason set)."""
        seq.token_ids.append(token)
        p = seq.params
        if p.logprobs and logprob is not None:
            seq.logprobs.append(logprob)
        if p.top_logprobs:
            seq.top_logprobs.append(top)
        if not p.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif token in p.stop_token_ids:  # type: ignore[operator]
            seq.finish_reason = "stop"
        elif p.stop_strings and self.tokenizer is not None and self._hit_stop_string(seq):
            seq.finish_reason = "stop"
        elif len(seq.token_ids) >= seq.max_total:
            seq.finish_reason = "length"
        return seq.finish_reason is not None

    def _hit_stop_string(self, seq: Sequence) -> bool:
        """Whether the newest token completed a stop string; then output_text is the text before it.

        Only a window of the latest tokens is decoded per step (a match ending at the newest token
        spans at most that many), so the check costs O(stop length), not O(output length).
        """
        assert self.tokenizer is not None
        p = seq.params
        stops = p.stop_strings
        longest = max(len(x) for x in stops)
        window = self.tokenizer.decode(
            seq.token_ids[max(seq.num_prompt_tokens, len(seq.token_ids) - longest - 8) :], p.skip_special_tokens
        )
        if not any(x in window for x in stops):
            return False
        text = self.tokenizer.decode(seq.output_token_ids, p.skip_special_tokens)
        # the earliest match (the longest stop among those starting there); kept with include_stop_str_in_output
        at, stop = min(((i, -len(x)) for x in stops if (i := text.find(x)) >= 0), default=(len(text), 0))
        seq.output_text = text[: at - stop] if p.include_stop_str_in_output else text[:at]
        seq.stop_string_hit = True
        return True

    def new_tokens(self, seq: Sequence) -> RequestOutput:
        """The tokens generated since the last report of a running request."""
        new = seq.token_ids[seq.num_prompt_tokens + seq.num_emitted :]
        first = seq.num_emitted == 0
        seq.num_emitted += len(new)
        lps = seq.logprobs[-len(new) :] if seq.params.logprobs and seq.logprobs else None
        out = RequestOutput(seq.request_id, new, lps, False, None, seq.num_prompt_tokens)
        if first:
            out.prompt_logprobs = seq.prompt_logprobs
        if seq.params.top_logprobs and new:
            out.new_top_logprobs = seq.top_logprobs[-len(new) :]
        return out

    def finish(self, seq: Sequence) -> RequestOutput:
        """The last report of a request: its unreported tokens, why it ended and its whole text."""
        text = None
        if self.tokenizer is not None:
            # a stop string's match (and what follows it) is cut off; otherwise the whole output
            text = (
                seq.output_text if seq.stop_string_hit
                else self.tokenizer.decode(seq.output_token_ids, seq.params.skip_special_tokens)
            )
        new = seq.output_token_ids[seq.num_emitted :]
        first = seq.num_emitted == 0
        lps = seq.logprobs[len(seq.logprobs) - len(new) :] if seq.params.logprobs and seq.logprobs else None
        seq.num_emitted = seq.num_output_tokens
        out = RequestOutput(seq.request_id, new, lps, True, seq.finish_reason, seq.num_prompt_tokens, text)
        if first:
            out.prompt_logprobs = seq.prompt_logprobs
        if seq.params.top_logprobs and new:
            out.new_top_logprobs = seq.top_logprobs[len(seq.top_logprobs) - len(new) :]
        return out
