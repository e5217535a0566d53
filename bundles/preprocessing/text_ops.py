"""Text op: tokenize, with a Hugging Face ``tokenizer.json`` carried in the bundle.

Padding and truncation are set here explicitly, overriding whatever the tokenizer.json
says (the MiniLM one pads to 128 by itself), so the ids are a function of the spec
alone. ``params`` carries the resource's SHA-256: a bundle whose tokenizer.json differs
from the one the model was trained with is refused instead of producing other ids.
``tokenizers`` is imported lazily so image and tabular devices need not install it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from bundles.errors import PreprocessingError
from bundles.preprocessing import _params as P
from bundles.preprocessing.base import Op, register

OUTPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_TEXT_CHARS = 1_000_000


def _load(op: str, payload: bytes) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise PreprocessingError(
            "op 'tokenize' needs the 'tokenizers' package: pip install 'edgepack[agent]'"
        ) from None
    try:
        return Tokenizer.from_str(payload.decode("utf-8"))
    except Exception as exc:  # tokenizers raises plain Exception for bad JSON; translate at the seam.
        raise PreprocessingError(
            f"op {op!r}: the tokenizer resource does not load: {str(exc)[:200]}"
        ) from None


@register
@dataclass(frozen=True)
class Tokenize(Op):
    """list[str] -> {"input_ids", "attention_mask", "token_type_ids"}, each int64 (N, max_length).

    ``padding="max_length"`` pads every text to ``max_length``; ``"longest"`` pads to the
    longest text of the batch. With ``truncation=false`` a text longer than
    ``max_length`` tokens is refused rather than cut.
    """

    name: ClassVar[str] = "tokenize"
    version: ClassVar[int] = 1
    since: ClassVar[str] = "0.1.0"
    kinds: ClassVar[frozenset[str]] = frozenset({"text"})
    private_fields: ClassVar[frozenset[str]] = frozenset({"tokenizer_json", "_cache"})

    tokenizer_json: bytes = field(repr=False)
    max_length: int = 128
    padding: str = "max_length"
    truncation: bool = True
    add_special_tokens: bool = True
    pad_token: str = "[PAD]"
    resource: str = "tokenizer.json"
    sha256: str = ""
    outputs: tuple[str, ...] = OUTPUTS
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.tokenizer_json, (bytes, bytearray)) or not self.tokenizer_json:
            raise P.fail(
                self.name,
                "tokenizer_json",
                "the tokenizer.json content as bytes",
                type(self.tokenizer_json).__name__,
            )
        object.__setattr__(self, "tokenizer_json", bytes(self.tokenizer_json))
        P.as_int(self.name, "max_length", self.max_length, 1, 65536)
        P.as_choice(self.name, "padding", self.padding, ("max_length", "longest"))
        P.as_bool(self.name, "truncation", self.truncation)
        P.as_bool(self.name, "add_special_tokens", self.add_special_tokens)
        P.as_str(self.name, "pad_token", self.pad_token)
        name = P.as_str(self.name, "resource", self.resource)
        if "/" in name or "\\" in name or name.startswith("."):
            raise P.fail(self.name, "resource", "a plain file name", name)
        digest = hashlib.sha256(self.tokenizer_json).hexdigest()
        if self.sha256 and self.sha256 != digest:
            raise PreprocessingError(
                f"op 'tokenize': resource {name!r} is not the tokenizer this pipeline was built with",
                expected=f"sha256 {self.sha256}",
                found=f"sha256 {digest}",
            )
        object.__setattr__(self, "sha256", digest)
        outputs = tuple(P.as_seq(self.name, "outputs", self.outputs, max_len=3))
        if not outputs or not set(outputs) <= set(OUTPUTS) or len(set(outputs)) != len(outputs):
            raise P.fail(self.name, "outputs", f"a non-empty subset of {list(OUTPUTS)}", self.outputs)
        object.__setattr__(self, "outputs", outputs)

    @classmethod
    def from_file(cls, path: str, **params: Any) -> Tokenize:
        with open(path, "rb") as fh:
            return cls(tokenizer_json=fh.read(), **params)

    @classmethod
    def _build(cls, params: dict[str, object], resources: Mapping[str, bytes]) -> Op:
        name = params.get("resource", "tokenizer.json")
        if not isinstance(name, str) or name not in resources:
            raise PreprocessingError(
                f"op 'tokenize' needs resource {str(name)[:64]!r}, which the bundle does not carry",
                expected="the tokenizer.json passed in Pipeline.from_dict(spec, resources)",
                found=sorted(resources)[:10],
            )
        payload = resources[name]
        if not isinstance(payload, (bytes, bytearray)):
            raise PreprocessingError(f"resource {name!r} must be bytes", found=type(payload).__name__)
        if not params.get("sha256"):
            raise PreprocessingError("op 'tokenize' is missing parameter 'sha256' (the resource's digest)")
        return cls(tokenizer_json=bytes(payload), **params)  # type: ignore[arg-type]

    def resources(self) -> dict[str, bytes]:
        return {self.resource: self.tokenizer_json}

    def _tokenizer(self) -> Any:
        if "tok" not in self._cache:
            tok = _load(self.name, self.tokenizer_json)
            pad_id = tok.token_to_id(self.pad_token)
            if pad_id is None:
                raise PreprocessingError(
                    "op 'tokenize': pad_token is not in the vocabulary", found=self.pad_token
                )
            if self.add_special_tokens and self.max_length <= tok.num_special_tokens_to_add(False):
                raise PreprocessingError(
                    "op 'tokenize': max_length leaves no room for text after the special tokens",
                    expected=f"max_length > {tok.num_special_tokens_to_add(False)}",
                    found=self.max_length,
                )
            tok.no_padding()
            tok.no_truncation()
            if self.truncation:
                tok.enable_truncation(max_length=self.max_length)
            fixed = self.max_length if self.padding == "max_length" else None
            tok.enable_padding(direction="right", pad_id=pad_id, pad_token=self.pad_token, length=fixed)
            self._cache["tok"] = tok
        return self._cache["tok"]

    def apply(self, value: object) -> object:
        if not isinstance(value, (list, tuple)) or not value:
            hint = "; wrap a single text in a list" if isinstance(value, str) else ""
            raise PreprocessingError(
                f"op 'tokenize': expected a non-empty list of str{hint}", found=type(value).__name__
            )
        for i, text in enumerate(value):
            if not isinstance(text, str):
                raise PreprocessingError(f"op 'tokenize': item {i} is not a str", found=type(text).__name__)
            if len(text) > MAX_TEXT_CHARS:
                raise PreprocessingError(
                    f"op 'tokenize': text {i} is too long",
                    expected=f"<= {MAX_TEXT_CHARS} characters",
                    found=len(text),
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise PreprocessingError(
                    f"op 'tokenize': text {i} is not valid Unicode (lone surrogate)"
                ) from None
        tok = self._tokenizer()
        try:
            encodings = tok.encode_batch(list(value), add_special_tokens=self.add_special_tokens)
        except (
            BaseException
        ) as exc:  # tokenizers raises Exception, and pyo3 panics derive from BaseException.
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise PreprocessingError(f"op 'tokenize': tokenizer failed: {str(exc)[:200]}") from None
        if not self.truncation:
            for i, enc in enumerate(encodings):
                if len(enc.ids) > self.max_length:
                    raise PreprocessingError(
                        f"op 'tokenize': text {i} is longer than max_length tokens and truncation is off",
                        expected=self.max_length,
                        found=len(enc.ids),
                    )
        columns = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
        return {
            out: np.array([getattr(enc, columns[out]) for enc in encodings], dtype=np.int64).reshape(
                len(value), -1
            )
            for out in self.outputs
        }
