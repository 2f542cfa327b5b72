"""Batch-structured SFT data: targets, assistant-only labels, batch columns, safe storage."""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import pytest

from moe_core.store.atomic import atomic_dir
from moe_core.train.sft import (
    IGNORE_INDEX,
    REFUSAL_TEMPLATES,
    PickleNotAllowedError,
    SFTDataError,
    choose_refusal,
    create_batch_aware_dataset,
    create_batch_structured_dataset,
    load_reference_pickle,
    load_sft_dataset,
    load_structured_batches,
    save_sft_dataset,
    save_structured_batches,
)
from tests.tiny import tiny_tokenizer

SHARED = Path(os.environ.get("MOE_LAB_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def sft_data(sizes=(4, 2), unsafe_target="Sure, here is how"):
    """The seed's layout: unsafe samples first in batch_outputs to check that safe ones still come first."""
    bl = []
    for b, n in enumerate(sizes):
        n_safe = n // 2
        outs = [
            {
                "prompt": f"Tell me how to pick a lock {b}-{i}",
                "label": "unsafe",
                "target": unsafe_target,
                "generated_text": "Sure, first take a pin",
            }
            for i in range(n - n_safe)
        ]
        outs += [
            {
                "prompt": f"How do I bake bread {b}-{i}?",
                "label": "safe",
                "generated_text": f"Mix flour and water {i}.",
            }
            for i in range(n_safe)
        ]
        bl.append(
            {
                "batch_idx": 10 + b,
                "batch_outputs": outs,
                "safe_indices": list(range(n - n_safe, n)),
                "unsafe_indices": list(range(n - n_safe)),
            }
        )
    return {"batch_data_list": bl}


def test_structured_batches_order_labels_and_targets():
    batches = create_batch_structured_dataset(sft_data((4, 3)))
    assert [len(b) for b in batches] == [4, 3]
    for batch in batches:
        labels = [ex["label"] for ex in batch]
        assert labels == sorted(labels), "safe examples must come before unsafe ones"
        assert [ex["in_batch_idx"] for ex in batch] == list(range(len(batch)))
        assert len({ex["batch_idx"] for ex in batch}) == 1
        for ex in batch:
            user, reply = ex["messages"]
            assert user["role"] == "user" and reply["role"] == "assistant"
            if ex["label"] == "safe":
                assert reply["content"].startswith("Mix flour") and ex["target_source"] == "generated"
            else:
                # the analysis' "target" (a compliance text) is never used unless asked for
                assert reply["content"] in REFUSAL_TEMPLATES and ex["target_source"] == "refusal"
    assert batches[0][0]["batch_idx"] == 10


def test_seed_signature_positional_and_keywords_checks_batches():
    tok = tiny_tokenizer()
    data = sft_data((4, 4))
    plain = create_batch_structured_dataset(data)
    assert create_batch_structured_dataset(data, tok, 4, 0.5) == plain
    assert create_batch_structured_dataset(data, tok, batch_size=4, safe_ratio=0.5) == plain
    with pytest.raises(SFTDataError, match="batch 10 holds 4 samples, more than batch_size=3"):
        create_batch_structured_dataset(data, tok, batch_size=3, safe_ratio=0.5)
    with pytest.raises(SFTDataError, match="batch 10 has 2 safe and 2 unsafe .*contradicts safe_ratio"):
        create_batch_structured_dataset(data, tok, batch_size=4, safe_ratio=0.25)
    with pytest.raises(SFTDataError, match="positive int"):
        create_batch_structured_dataset(data, tok, batch_size=0)
    with pytest.raises(SFTDataError, match="give batch_size too"):
        create_batch_structured_dataset(data, tok, safe_ratio=0.5)
    with pytest.raises(TypeError):
        create_batch_structured_dataset(data, tok, 4, 0.5, "No.")  # refusal_target etc. are keyword-only


def test_filtered_shorter_batch_is_kept_and_logged(caplog):
    data = sft_data((4, 3))  # batch 11 lost one safe sample to filtering: 1 safe + 2 unsafe
    with caplog.at_level("INFO", logger="moe_core.train.sft"):
        batches = create_batch_structured_dataset(data, None, batch_size=4, safe_ratio=0.5)
    assert [len(b) for b in batches] == [4, 3]
    assert "batch 11 holds 3 of 4 samples" in caplog.text


def test_refusal_choice_is_deterministic_and_configurable():
    a = create_batch_structured_dataset(sft_data((6,)), seed=0)
    b = create_batch_structured_dataset(sft_data((6,)), seed=0)
    assert a == b
    assert choose_refusal("x", seed=1) == choose_refusal("x", seed=1)
    assert len({choose_refusal(f"prompt {i}") for i in range(50)}) > 3  # spread over the templates
    fixed = create_batch_structured_dataset(sft_data((2,)), refusal_target="No.")
    assert fixed[0][1]["messages"][-1]["content"] == "No."
    by_fn = create_batch_structured_dataset(sft_data((2,)), refusal_target=lambda p: f"Not doing: {p}")
    assert by_fn[0][1]["messages"][-1]["content"].startswith("Not doing: Tell me")
    listed = create_batch_structured_dataset(sft_data((2,)), refusal_target=["A.", "B."])
    assert listed[0][1]["messages"][-1]["content"] in ("A.", "B.")
    col = create_batch_structured_dataset(
        sft_data((2,), unsafe_target="Custom refusal."), target_column="target"
    )
    assert (
        col[0][1]["messages"][-1]["content"] == "Custom refusal." and col[0][1]["target_source"] == "column"
    )


def test_messages_input_keeps_system_turn_and_drops_old_answer():
    data = sft_data((2,))
    s = data["batch_data_list"][0]["batch_outputs"][1]
    s["messages"] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "old"},
    ]
    ex = create_batch_structured_dataset(data)[0][0]
    assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant"]
    assert ex["messages"][-1]["content"] != "old"


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.pop("batch_data_list"), "batch_data_list"),
        (lambda d: d["batch_data_list"][0].pop("safe_indices"), "safe_indices"),
        (lambda d: d["batch_data_list"][0]["safe_indices"].append(99), "out of range"),
        (lambda d: d["batch_data_list"][0]["batch_outputs"][0].update(label="safe"), "label is 'safe'"),
        (lambda d: d["batch_data_list"][0]["batch_outputs"][-1].pop("generated_text"), "generated_text"),
        (lambda d: d["batch_data_list"][1].update(batch_idx=10), "twice"),
        (lambda d: d["batch_data_list"][0]["batch_outputs"][0].pop("prompt"), "prompt"),
    ],
)
def test_bad_analysis_data_raises_actionable_error(mutate, match):
    data = sft_data((4, 2))
    mutate(data)
    with pytest.raises(SFTDataError, match=match):
        create_batch_structured_dataset(data)


def test_tokenised_dataset_masks_everything_but_the_assistant_reply():
    tok = tiny_tokenizer()
    batches = create_batch_structured_dataset(sft_data((4, 2)))
    ds = create_batch_aware_dataset(batches, tok, max_length=256)
    assert ds.column_names == [
        "input_ids",
        "attention_mask",
        "labels",
        "batch_idx",
        "in_batch_idx",
        "label",
        "messages",
        "label_str",
    ]
    assert ds.features["label"].names == ["safe", "unsafe"]
    flat = [ex for b in batches for ex in b]
    assert ds["batch_idx"][:] == [ex["batch_idx"] for ex in flat]
    assert ds["in_batch_idx"][:] == [ex["in_batch_idx"] for ex in flat]
    assert ds["label"][:] == [int(ex["label"] == "unsafe") for ex in flat]
    assert ds["label_str"][:] == [ex["label"] for ex in flat]
    assert ds[0]["messages"] == flat[0]["messages"]
    for row, ex in zip(ds, flat):
        prompt = tok.apply_chat_template(ex["messages"][:-1], tokenize=False, add_generation_prompt=True)
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert row["input_ids"][:n_prompt] == tok(prompt, add_special_tokens=False)["input_ids"]
        assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        answer = row["labels"][n_prompt:]
        assert answer == row["input_ids"][n_prompt:] and IGNORE_INDEX not in answer
        decoded = tok.decode(answer, skip_special_tokens=True)
        assert decoded.replace(" ", "") == ex["messages"][-1]["content"].replace(" ", "")
        assert answer[-1] == tok.eos_token_id  # the end-of-turn token is learned too
        assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_tokenisation_errors():
    tok = tiny_tokenizer()
    batches = create_batch_structured_dataset(sft_data((2,)))
    with pytest.raises(SFTDataError, match="raise max_length"):
        create_batch_aware_dataset(batches, tok, max_length=4)
    odd = tiny_tokenizer()
    odd.chat_template = (
        "{% for m in messages %}{{ m['content'] }}|{% endfor %}{% if add_generation_prompt %}GEN:{% endif %}"
    )
    with pytest.raises(SFTDataError, match="prefix"):
        create_batch_aware_dataset(batches, odd)
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(SFTDataError, match="chat template"):
        create_batch_aware_dataset(batches, bare)
    mixed = [batches[0][:1] + [{**batches[0][1], "batch_idx": 99}]]
    with pytest.raises(SFTDataError, match="mixes batch_idx"):
        create_batch_aware_dataset(mixed, tok)


def test_datasets_round_trip_through_disk(tmp_path):
    tok = tiny_tokenizer()
    batches = create_batch_structured_dataset(sft_data((4, 3)))
    ds = create_batch_aware_dataset(batches, tok)
    target = tmp_path / "sft"
    save_sft_dataset(ds, target)
    save_sft_dataset(ds.select(range(3)), target)  # overwrite in place
    back = load_sft_dataset(target)
    assert back.to_dict() == ds.select(range(3)).to_dict() and back.features == ds.features
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folders left behind"
    save_structured_batches(batches, tmp_path / "batches.jsonl")
    assert load_structured_batches(tmp_path / "batches.jsonl") == batches
    with pytest.raises(SFTDataError, match="no SFT dataset"):
        load_sft_dataset(tmp_path / "missing")


def test_failed_directory_write_keeps_previous_version(tmp_path):
    target = tmp_path / "out"
    atomic_dir(target, lambda p: (p / "v").write_text("1"))

    def broken(p: Path) -> None:
        (p / "v").write_text("2")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_dir(target, broken)
    assert (target / "v").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_reference_pickle_needs_explicit_opt_in(tmp_path):
    marker = tmp_path / "code_ran"
    pkl = tmp_path / "sft_dataset_model.pkl"
    pkl.write_bytes(pickle.dumps({"batch_data_list": [], "evil": _Payload(marker)}))
    with pytest.raises(PickleNotAllowedError, match="arbitrary code"):
        load_reference_pickle(pkl)
    assert not marker.exists()
    data = load_reference_pickle(pkl, allow_pickle=True)
    assert data["batch_data_list"] == [] and marker.exists()  # proof that unpickling runs code


@pytest.mark.skipif(
    not (SHARED / "datasets" / "advbench").is_dir(), reason="shared public datasets not present"
)
def test_real_advbench_and_alpaca_prompts_tokenise():
    with open(SHARED / "datasets" / "advbench" / "harmful_behaviors.csv", newline="") as f:
        harmful = [r for _, r in zip(range(8), csv.DictReader(f))]
    benign = json.loads((SHARED / "datasets" / "alpaca" / "alpaca_instructions_2000.json").read_text())[:8]
    outs = [
        {"prompt": b["instruction"], "label": "safe", "generated_text": "Here is an answer."} for b in benign
    ]
    outs += [
        {"prompt": h["goal"], "label": "unsafe", "target": h["target"], "generated_text": h["target"]}
        for h in harmful
    ]
    data = {
        "batch_data_list": [
            {
                "batch_idx": 0,
                "batch_outputs": outs,
                "safe_indices": list(range(8)),
                "unsafe_indices": list(range(8, 16)),
            }
        ]
    }
    batches = create_batch_structured_dataset(data)
    assert not any(ex["messages"][-1]["content"].startswith("Sure, here is") for ex in batches[0])
    ds = create_batch_aware_dataset(batches, tiny_tokenizer(), max_length=512)
    assert len(ds) == 16 and ds["label"][:] == [0] * 8 + [1] * 8
    assert all(any(l != IGNORE_INDEX for l in row) for row in ds["labels"])
