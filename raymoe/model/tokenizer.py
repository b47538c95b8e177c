"""The checkpoint's tokenizer: `tokenizer.json` (Hugging Face `tokenizers`) plus `tokenizer_config.json`.

No `transformers` at run time: special tokens and the chat template come from
`tokenizer_config.json`, and the template is rendered with jinja2 the way transformers does it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from raymoe.model.config import ModelConfig


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"tokenizer_config.json: cannot read special token {value!r}")


class Tokenizer:
    """Encode/decode text and render chat prompts for one checkpoint."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
        add_bos_token: bool = True,
    ) -> None:
        self._tok = tokenizer
        self.add_bos_token = add_bos_token
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.bos_token_id = self._id(bos_token, "bos_token")
        eos_id = self._id(eos_token, "eos_token")
        ids = ([] if eos_id is None else [eos_id]) + [i for i in extra_eos_token_ids if i != eos_id]
        self.eos_token_ids: list[int] = ids
        self._templates: dict[str, Any] = {}  # template source -> compiled

    def _id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer_config.json: {field} {token!r} is not in tokenizer.json")
        return i

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> Tokenizer | None:
        """The checkpoint's tokenizer, or None when it has no tokenizer.json."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            return None
        try:
            tok = HFTokenizer.from_str(file.read_text())
        except Exception as e:
            if type(e) is not Exception:  # tokenizers reports a malformed file as a bare Exception, nothing else
                raise
            raise ValueError(f"{file}: cannot load ({e})") from e
        cfg: dict[str, Any] = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
            if not isinstance(cfg, dict):
                raise ValueError(f"{cfg_file}: expected a JSON object")
        extra_eos: list[int] = []
        if (path / "config.json").is_file():
            extra_eos = ModelConfig.from_checkpoint(path).eos_token_ids
        gen_file = path / "generation_config.json"
        if gen_file.is_file():  # generation may stop on more ids than the model config names
            try:
                gen = json.loads(gen_file.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{gen_file}: not valid JSON ({e})") from e
            if not isinstance(gen, dict):
                raise ValueError(f"{gen_file}: expected a JSON object")
            gen_eos = gen.get("eos_token_id")
            for i in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
                if isinstance(i, int) and i not in extra_eos:
                    extra_eos.append(i)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return cls(
            tok,
            bos_token=_token_content(cfg.get("bos_token")),
            eos_token=_token_content(cfg.get("eos_token")),
            chat_template=template,
            extra_eos_token_ids=extra_eos,
            add_bos_token=bool(cfg.get("add_bos_token", True)),
        )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids, BOS first (add_bos None: as tokenizer_config.json's add_bos_token says, True
        when absent), not doubled when the text already starts with it, as a rendered chat prompt does."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos_token
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> Callable[[int], str | None]:
        """Incremental `decode`: feed ids one by one, get each step's new text (None while a character is
        incomplete); the pieces join to `decode` of all ids once the last character is complete."""
        return partial(DecodeStream(skip_special_tokens=skip_special_tokens).step, self._tok)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def to_str(self) -> str:
        """The tokenizer.json text (what a grammar library reads the vocabulary from)."""
        return self._tok.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render messages with the checkpoint's chat template, or `chat_template` (jinja2, sandboxed, as
        transformers does)."""
        source = chat_template if chat_template is not None else self.chat_template
        if source is None:
            raise ValueError("this checkpoint's tokenizer_config.json has no chat_template")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError(f"messages[{i}] must be a dict with a 'role'")
        template = self._templates.get(source)
        if template is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            template = self._templates[source] = env.from_string(source)
        return template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )
