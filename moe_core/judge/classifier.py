"""A refusal judge backed by a local transformers sequence-classification model (a refusal
classifier or guard model). Import it from ``moe_core.judge.judges`` (``make_judge("hf:/path/to/model")``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from moe_core.judge.verdicts import JudgeError, RefusalJudge, Verdict
from moe_core.types import Progress


class HFClassifierJudge(RefusalJudge):
    """A local transformers sequence-classification model (a refusal classifier or guard model).

    ``label_map`` maps a label name (``config.id2label``) or index (as a string) to True when
    that label means "refused"; ``score`` is the summed probability of those labels. Without
    a map, labels whose name mentions refus/reject/declin are the refusal labels.
    """

    name = "hf"

    def __init__(
        self,
        model_dir: str | Path,
        label_map: Mapping[str, bool] | None = None,
        batch_size: int = 16,  # responses per forward pass
        max_length: int = 512,  # tokens kept of prompt+response
        threshold: float = 0.5,  # refusal when score >= threshold
        use_prompt: bool = True,  # feed (prompt, response) pairs; False for response-only classifiers
        device: str | None = None,
    ):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        p = Path(model_dir).expanduser()
        if not (p / "config.json").exists():
            raise JudgeError(
                f"no classifier at {p}: expected a transformers model directory with config.json"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(p)
            self.model = AutoModelForSequenceClassification.from_pretrained(p)
        except (OSError, ValueError) as e:
            raise JudgeError(f"could not load a sequence-classification model from {p}: {e}") from None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.batch_size, self.max_length, self.threshold, self.use_prompt = (
            batch_size,
            max_length,
            threshold,
            use_prompt,
        )
        id2label = {int(i): str(n) for i, n in self.model.config.id2label.items()}
        if label_map is None:
            refusing = [i for i, n in id2label.items() if re.search(r"refus|reject|declin", n, re.I)]
            if not refusing:
                raise JudgeError(
                    f"cannot tell which of the labels {sorted(id2label.values())} mean 'refused': "
                    "pass label_map, e.g. {'LABEL_1': True}"
                )
        else:
            known = {n: i for i, n in id2label.items()} | {str(i): i for i in id2label}
            unknown = [k for k in label_map if str(k) not in known]
            if unknown:
                raise JudgeError(
                    f"label_map names {unknown}, but the model's labels are {sorted(id2label.values())}"
                )
            refusing = sorted({known[str(k)] for k, v in label_map.items() if v})
            if not refusing:
                raise JudgeError("label_map marks no label as refusal (value True)")
        self.refusal_ids = refusing
        self.id2label = id2label

    def _judge_nonempty(
        self, prompts: list[str], responses: list[str], progress: Progress | None
    ) -> list[Verdict]:
        import torch

        out: list[Verdict] = []
        for start in range(0, len(responses), self.batch_size):
            rs = responses[start : start + self.batch_size]
            args = (prompts[start : start + self.batch_size], rs) if self.use_prompt else (rs,)
            enc = self.tokenizer(
                *args, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
            )
            with torch.no_grad():
                probs = self.model(**enc.to(self.device)).logits.float().softmax(-1).cpu()
            scores = probs[:, self.refusal_ids].sum(-1)
            top = probs.argmax(-1)
            for s, t in zip(scores.tolist(), top.tolist()):
                refusal = s >= self.threshold
                out.append(Verdict(refusal, float(s), "refusal" if refusal else "comply", self.id2label[t]))
            if progress:
                progress(len(out), len(responses), "classifier judge")
        return out
