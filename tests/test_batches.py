"""BatchPlan: composition, edits, validation and JSON (pure Python, runs in about a second)."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from moe_core.batching.batches import compose_batches
from moe_core.batching.edits import add, drop, drop_batch, move, renumber, replace, swap
from moe_core.batching.plan import (
    FRAME_COLUMNS,
    Batch,
    BatchPlan,
    BatchPlanError,
    load_plan,
    save_plan,
    split_counts,
)
from moe_core.batching.validation import check, validate
from moe_core.types import PromptItem

SHARED = Path(os.environ.get("MOE_LAB_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")


def items(label: str, n: int, paired: bool = False, start: int = 0) -> list[PromptItem]:
    p = label[0]
    return [
        PromptItem(
            id=f"{p}{i}",
            text=f"{label} prompt number {i}",
            label=label,  # type: ignore[arg-type]
            goal=f"goal {i}",
            pair_id=f"pair{i}" if paired else None,
            source="test",
            meta={"k": i},
        )
        for i in range(start, start + n)
    ]


def ids(plan: BatchPlan) -> list[str]:
    return [it.id for it in plan.items()]


def assert_blocks_ordered(plan: BatchPlan) -> None:
    """Every batch: safe block then unsafe block, and no id appears twice in the plan."""
    for b in plan.batches:
        assert b.labels == sorted(b.labels, key=lambda lab: lab != "safe")
        assert [it.label for it in b.items] == b.labels
    assert len(set(ids(plan))) == len(ids(plan))


def codes(plan: BatchPlan, severity: str | None = None) -> Counter:
    return Counter(i.code for i in validate(plan) if severity in (None, i.severity))


# -- composition ----------------------------------------------------------------------------
def test_sizes_ratio_and_safe_first():
    plan = compose_batches(items("safe", 40), items("unsafe", 45), batch_size=16, safe_ratio=0.5, seed=3)
    assert plan.batch_indices == [0, 1, 2, 3, 4]
    for b in plan.batches:
        assert (len(b.safe), len(b.unsafe), b.size) == (8, 8, 16)
        assert b.labels == ["safe"] * 8 + ["unsafe"] * 8
        assert b.items == b.safe + b.unsafe
    assert plan.meta["unused"] == {"safe": 0, "unsafe": 5}
    assert not plan.paired
    assert validate(plan) == []

    plan = compose_batches(items("safe", 40), items("unsafe", 40), batch_size=16, safe_ratio=0.25)
    assert {(len(b.safe), len(b.unsafe)) for b in plan.batches} == {(4, 12)}
    assert len(plan) == 3  # 40 unsafe / 12 per batch


@pytest.mark.parametrize(
    "batch_size, ratio, expected",
    [
        (16, 0.5, (8, 8)),
        (10, 0.25, (3, 7)),
        (10, 0.35, (4, 6)),
        (5, 0.5, (3, 2)),
        (7, 0.3, (2, 5)),
        (2, 0.5, (1, 1)),
    ],
)
def test_split_counts_rounds_half_up(batch_size, ratio, expected):
    assert split_counts(batch_size, ratio) == expected


@pytest.mark.parametrize("ratio, missing", [(0.02, "0 safe"), (0.98, "0 unsafe")])
def test_ratio_giving_zero_items_of_a_label_is_an_error(ratio, missing):
    with pytest.raises(BatchPlanError, match=missing) as e:
        compose_batches(items("safe", 50), items("unsafe", 50), batch_size=16, safe_ratio=ratio)
    assert "between 0.0625 and 0.938" in str(e.value)


@pytest.mark.parametrize("batch_size, ratio", [(1, 0.5), (16, 0.0), (16, 1.0), (16, -0.2), (True, 0.5)])
def test_bad_settings_are_rejected(batch_size, ratio):
    with pytest.raises(BatchPlanError):
        compose_batches(items("safe", 50), items("unsafe", 50), batch_size=batch_size, safe_ratio=ratio)


def test_too_few_prompts_says_how_many_are_needed():
    with pytest.raises(BatchPlanError) as e:
        compose_batches(items("safe", 5), items("unsafe", 20), batch_size=16)
    msg = str(e.value)
    assert "one batch of 16 (8 safe + 8 unsafe)" in msg
    assert "got 5 safe and 20 unsafe" in msg
    assert "add 3 more safe" in msg
    with pytest.raises(BatchPlanError, match="add 3 more safe"):  # keeping a lone small batch is no way out
        compose_batches(items("safe", 5), items("unsafe", 20), batch_size=16, drop_incomplete=False)


def test_every_item_used_at_most_once():
    safe, unsafe = items("safe", 37), items("unsafe", 50)
    plan = compose_batches(safe, unsafe, batch_size=10, safe_ratio=0.3, seed=1)
    used = ids(plan)
    assert len(used) == len(set(used)) == len(plan) * 10
    assert set(used) <= {it.id for it in safe + unsafe}
    assert plan.meta["unused"]["safe"] == 37 - 3 * len(plan)
    assert plan.meta["unused"]["unsafe"] == 50 - 7 * len(plan)


def test_deterministic_per_seed_and_different_across_seeds():
    safe, unsafe = items("safe", 64), items("unsafe", 64)
    a = compose_batches(safe, unsafe, seed=7)
    b = compose_batches(list(safe), list(unsafe), seed=7)
    c = compose_batches(safe, unsafe, seed=8)
    assert a.to_json_dict() == b.to_json_dict()
    assert ids(a) != ids(c)
    assert sorted(ids(a)) == sorted(ids(c))


def test_no_shuffle_keeps_input_order():
    safe, unsafe = items("safe", 16), items("unsafe", 16)
    plan = compose_batches(safe, unsafe, batch_size=8, shuffle=False)
    assert plan.batches[0].safe == safe[:4] and plan.batches[0].unsafe == unsafe[:4]
    assert plan.batches[3].safe == safe[12:] and plan.batches[3].unsafe == unsafe[12:]


def test_incomplete_last_batch_dropped_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger="moe_core.batching.batches"):
        plan = compose_batches(items("safe", 20), items("unsafe", 20), batch_size=16)
    assert len(plan) == 2
    assert "dropped the incomplete last batch (4 safe, 4 unsafe)" in caplog.text
    assert plan.meta["unused"] == {"safe": 4, "unsafe": 4}


def test_incomplete_last_batch_kept_on_request_gives_uneven_warning():
    plan = compose_batches(items("safe", 20), items("unsafe", 22), batch_size=16, drop_incomplete=False)
    assert [(len(b.safe), len(b.unsafe)) for b in plan.batches] == [(8, 8), (8, 8), (4, 6)]
    assert plan.meta["kept_incomplete_batch"] is True
    found = validate(plan)
    assert {(i.code, i.batch_idx, i.severity) for i in found} == {
        ("uneven_size", 2, "warning"),
        ("ratio", 2, "warning"),
    }
    assert "training sampler keeps it whole" in next(i.message for i in found if i.code == "uneven_size")


def test_incomplete_last_batch_without_one_label_is_not_kept():
    plan = compose_batches(items("safe", 20), items("unsafe", 16), batch_size=16, drop_incomplete=False)
    assert len(plan) == 2 and plan.meta["unused"] == {"safe": 4, "unsafe": 0}


def test_duplicate_or_mislabelled_inputs_are_rejected():
    safe = items("safe", 20)
    dup_text = PromptItem("s99", "  SAFE prompt   number 3 ", "safe")
    with pytest.raises(BatchPlanError, match="same text") as e:
        compose_batches(safe + [dup_text], items("unsafe", 20))
    assert "'s3'" in str(e.value) and "'s99'" in str(e.value)
    with pytest.raises(BatchPlanError, match="same id"):
        compose_batches(safe + [PromptItem("s1", "another text", "safe")], items("unsafe", 20))
    with pytest.raises(BatchPlanError, match="passed as safe carry another label"):
        compose_batches(safe + items("unsafe", 1, start=100), items("unsafe", 20))


# -- paired mode ----------------------------------------------------------------------------
def assert_pairs_aligned(plan: BatchPlan) -> None:
    for b in plan.batches:
        n = min(len(b.safe), len(b.unsafe))
        assert [it.pair_id for it in b.safe[:n]] == [it.pair_id for it in b.unsafe[:n]]


def test_paired_auto_places_twins_in_same_batch_and_position():
    safe, unsafe = items("safe", 40, paired=True), items("unsafe", 40, paired=True)
    unsafe.reverse()  # pairing must follow pair_id, not list position
    plan = compose_batches(safe, unsafe, seed=5)
    assert plan.paired
    assert len(plan) == 5
    assert_pairs_aligned(plan)
    assert ids(plan) != ids(compose_batches(safe, unsafe, seed=6))
    assert validate(plan) == []


def test_paired_off_by_request_or_when_some_item_lacks_a_pair():
    safe, unsafe = items("safe", 40, paired=True), items("unsafe", 40, paired=True)
    assert not compose_batches(safe, unsafe, paired=False).paired
    assert not compose_batches(safe, unsafe[:-1] + items("unsafe", 1, start=100)).paired


def test_paired_with_uneven_ratio_fills_extra_slots_with_unpaired_items():
    safe = items("safe", 12, paired=True) + items("safe", 30, start=50)  # 30 safe items without twin
    unsafe = items("unsafe", 12, paired=True)
    plan = compose_batches(safe, unsafe, batch_size=8, safe_ratio=0.75, paired=True, seed=2)
    assert [(len(b.safe), len(b.unsafe)) for b in plan.batches] == [(6, 2)] * 6
    assert_pairs_aligned(plan)
    for b in plan.batches:
        assert all(it.pair_id is None for it in b.safe[2:])


def test_paired_errors_are_actionable():
    with pytest.raises(BatchPlanError, match="pass paired=False"):
        compose_batches(items("safe", 20), items("unsafe", 20), paired=True)
    safe = items("safe", 20, paired=True)
    safe.append(PromptItem("extra", "another safe text", "safe", pair_id="pair3"))
    with pytest.raises(BatchPlanError, match="pair_id 'pair3' has 2 safe items"):
        compose_batches(safe, items("unsafe", 20, paired=True))
    # too few pairs although the label counts would suffice
    with pytest.raises(BatchPlanError, match="not enough complete pairs"):
        compose_batches(
            items("safe", 20, paired=True), items("unsafe", 20, paired=True, start=14), paired=True
        )


# -- edits ----------------------------------------------------------------------------------
@pytest.fixture
def plan() -> BatchPlan:
    return compose_batches(items("safe", 24), items("unsafe", 24), batch_size=8, seed=0)


def test_edits_return_new_plans_and_leave_the_old_one_alone(plan):
    before = plan.to_json_dict()
    some = plan.batches[0].safe[1].id
    for edited in (
        move(plan, some, 2),
        swap(plan, some, plan.batches[1].safe[0].id),
        replace(plan, some, PromptItem("new", "a brand new prompt", "safe")),
        drop(plan, some),
        add(plan, 1, PromptItem("new", "a brand new prompt", "unsafe")),
        drop_batch(plan, 0),
        renumber(drop_batch(plan, 0)),
    ):
        assert edited is not plan
        assert edited.to_json_dict() != before
        assert_blocks_ordered(edited)
    assert plan.to_json_dict() == before


def test_move_keeps_label_block(plan):
    item = plan.batches[0].unsafe[0]
    new = move(plan, item.id, to_batch=2, position=0)
    assert new.batches[2].unsafe[0] == item and new.batches[2].size == 9
    assert item not in new.batches[0].items
    assert new.batches[2].labels == ["safe"] * 4 + ["unsafe"] * 5
    assert {(i.code, i.batch_idx) for i in validate(new)} == {
        ("uneven_size", 0),
        ("uneven_size", 2),
    }  # 4+3, 4+5: closest to 0.5
    new = move(new, new.batches[1].unsafe[0].id, to_batch=2)
    assert ("ratio", 2) in {(i.code, i.batch_idx) for i in validate(new)}  # 4 safe + 6 unsafe
    with pytest.raises(BatchPlanError, match="no batch 9 in the plan"):
        move(plan, item.id, to_batch=9)
    with pytest.raises(BatchPlanError, match="no item with id 'nope'"):
        move(plan, "nope", to_batch=1)


def test_swap_exchanges_places_of_same_label(plan):
    a, b = plan.batches[0].safe[1], plan.batches[2].safe[3]
    new = swap(plan, a.id, b.id)
    assert new.batches[0].safe[1] == b and new.batches[2].safe[3] == a
    assert validate(new) == []
    with pytest.raises(BatchPlanError, match="use move"):
        swap(plan, a.id, plan.batches[1].unsafe[0].id)


def test_replace_same_slot_and_id_conflicts(plan):
    old = plan.batches[1].safe[2]
    fresh = PromptItem("fresh", "a fresh safe prompt", "safe")
    new = replace(plan, old.id, fresh)
    assert new.batches[1].safe[2] == fresh and old.id not in ids(new)
    same_id = PromptItem(old.id, "reworded prompt", "safe")
    assert replace(plan, old.id, same_id).batches[1].safe[2].text == "reworded prompt"
    with pytest.raises(BatchPlanError, match="already in the plan"):
        replace(plan, old.id, PromptItem(plan.batches[0].safe[0].id, "x", "safe"))
    flipped = replace(plan, old.id, PromptItem("flip", "now an unsafe prompt", "unsafe"))
    assert flipped.batches[1].unsafe[-1].id == "flip" and len(flipped.batches[1].safe) == 3
    assert_blocks_ordered(flipped)


def test_drop_add_and_uneven_batches(plan):
    victim = plan.batches[1].unsafe[0].id
    new = drop(plan, victim)
    assert victim not in ids(new) and new.batches[1].size == 7
    assert codes(new, "warning") == Counter({"uneven_size": 1})  # 4 + 3 is as close to 0.5 as 7 allows
    assert codes(drop(new, plan.batches[1].unsafe[1].id), "warning") == Counter(
        {"uneven_size": 1, "ratio": 1}
    )
    assert check(new)  # warnings only: returned, not raised
    back = add(new, 1, PromptItem("added", "an added unsafe prompt", "unsafe"), position=0)
    assert back.batches[1].unsafe[0].id == "added" and validate(back) == []
    with pytest.raises(BatchPlanError, match="already in the plan"):
        add(plan, 0, plan.batches[1].safe[0])


def test_drop_batch_keeps_indices_and_renumber_compacts(plan):
    new = drop_batch(plan, 1)
    assert new.batch_indices == [0, 2, 3, 4, 5]
    assert renumber(new).batch_indices == [0, 1, 2, 3, 4]
    assert renumber(new).batches[1].items == plan.batches[2].items
    with pytest.raises(BatchPlanError, match="no batch 1"):
        drop_batch(new, 1)


# -- validation -----------------------------------------------------------------------------
def test_validation_errors_and_messages(plan):
    def errors(p: BatchPlan) -> dict[str, str]:
        return {i.code: i.message for i in validate(p) if i.severity == "error"}

    s0 = plan.batches[0].safe[0]
    dup_id = add(plan, 2, PromptItem("zzz", "x", "safe"))
    dup_id.batches[2].safe[-1] = PromptItem(s0.id, "different text", "safe")  # bypassing the edit ops
    assert f"2 items share the same id {s0.id!r}" in errors(dup_id)["duplicate_id"]

    dup_text = add(plan, 2, PromptItem("twin", s0.text.upper() + "  ", "safe"))
    assert "'twin' (batch 2)" in errors(dup_text)["duplicate_text"]

    empty = plan
    for it in plan.batches[1].items:
        empty = drop(empty, it.id)
    assert "batch 1 is empty" in errors(empty)["empty_batch"]

    no_unsafe = plan
    for it in plan.batches[2].unsafe:
        no_unsafe = move(no_unsafe, it.id, 0)
    assert "batch 2 has no unsafe item" in errors(no_unsafe)["missing_label"]

    too_few = BatchPlan([Batch(0, items("safe", 3), items("unsafe", 4))], batch_size=16)
    assert "got 3 safe and 4 unsafe; add 5 more safe and 4 more unsafe" in errors(too_few)["too_few"]
    assert "no batches" in errors(BatchPlan([], batch_size=16))["too_few"]

    bad_ratio = BatchPlan(plan.batches, batch_size=8, safe_ratio=0.05)
    assert "0 safe" in errors(bad_ratio)["bad_ratio"]

    twice = BatchPlan([*plan.batches, plan.batches[0]], batch_size=8)
    assert "renumber" in errors(twice)["duplicate_batch_idx"]

    wrong = BatchPlan(
        [Batch(0, items("safe", 4), items("unsafe", 3) + items("safe", 1, start=50))], batch_size=8
    )
    assert "sits in the unsafe block" in errors(wrong)["wrong_block"]

    with pytest.raises(BatchPlanError) as e:
        check(empty)
    assert e.value.issues and all(i.severity == "error" for i in e.value.issues)
    assert "batch 1 is empty" in str(e.value)


def test_separated_pair_is_a_warning_only_in_paired_plans():
    plan = compose_batches(items("safe", 16, paired=True), items("unsafe", 16, paired=True), batch_size=8)
    item = plan.batches[0].safe[0]
    split = swap(plan, item.id, plan.batches[1].safe[0].id)
    found = [i for i in validate(split) if i.code == "pair_separated"]
    assert len(found) == 2 and all(i.severity == "warning" for i in found)
    assert f"pair {item.pair_id!r} is split" in " ".join(i.message for i in found)
    split.paired = False
    assert not [i for i in validate(split) if i.code == "pair_separated"]


# -- JSON and tables ------------------------------------------------------------------------
def test_json_round_trip(tmp_path, plan):
    edited = drop(move(plan, plan.batches[0].safe[0].id, 2), plan.batches[1].unsafe[3].id)
    path = save_plan(tmp_path / "run" / "plan.json", edited)
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temp file left
    loaded = load_plan(path)
    assert loaded.to_json_dict() == edited.to_json_dict()
    assert loaded.batches[2].items == edited.batches[2].items
    assert loaded.batches[0].safe[0].meta == edited.batches[0].safe[0].meta
    assert (loaded.batch_size, loaded.safe_ratio, loaded.seed, loaded.paired) == (8, 0.5, 0, False)
    assert json.loads(path.read_text())["format"] == "moe-safety-lab/batch-plan@1"


def test_load_plan_errors(tmp_path, plan):
    with pytest.raises(FileNotFoundError, match="no batch plan"):
        load_plan(tmp_path / "missing.json")
    torn = tmp_path / "torn.json"
    torn.write_text(json.dumps(plan.to_json_dict())[:200])
    with pytest.raises(BatchPlanError, match="not valid JSON"):
        load_plan(torn)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "moe-safety-lab/expert-mask@1", "experts": {}}))
    with pytest.raises(BatchPlanError, match="needs a 'batches' list"):
        load_plan(other)
    d = plan.to_json_dict()
    d["batches"][1]["safe"][0]["label"] = "unsafe"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(BatchPlanError, match="batch entry #1 .* sits in the safe block"):
        load_plan(bad)
    del d["batches"][0]["unsafe"][0]["text"]
    bad.write_text(json.dumps(d))
    with pytest.raises(BatchPlanError, match="lacks a required field"):
        load_plan(bad)


def test_to_frame(plan):
    df = plan.to_frame()
    assert list(df.columns) == FRAME_COLUMNS
    assert len(df) == 48
    first = df[df.batch_idx == 0]
    assert first.in_batch_idx.tolist() == list(range(8))
    assert first.label.tolist() == ["safe"] * 4 + ["unsafe"] * 4
    assert first.id.tolist() == [it.id for it in plan.batches[0].items]
    assert df.batch_idx.dtype == "int64"
    assert BatchPlan([]).to_frame().columns.tolist() == FRAME_COLUMNS


# -- a real public prompt set ---------------------------------------------------------------
def test_jailbreakbench_benign_harmful_pairs():
    """JailbreakBench's 100 benign/harmful behaviours are twins by row: a real paired set."""
    folder = SHARED / "datasets" / "jailbreakbench"
    if not folder.is_dir():
        pytest.skip(f"public prompt sets not found at {folder}")
    harmful = pd.read_csv(folder / "harmful_behaviors.csv")
    benign = pd.read_csv(folder / "benign_behaviors.csv")
    safe = [
        PromptItem(f"jbb-b{i}", g, "safe", goal=g, pair_id=f"jbb{i}", source="jbb")
        for i, g in enumerate(benign.Goal)
    ]
    unsafe = [
        PromptItem(f"jbb-h{i}", g, "unsafe", goal=g, pair_id=f"jbb{i}", source="jbb")
        for i, g in enumerate(harmful.Goal)
    ]
    plan = compose_batches(safe, unsafe, batch_size=16, seed=0)
    assert plan.paired and len(plan) == 100 // 8
    assert_pairs_aligned(plan)
    assert check(plan) == []
    df = plan.to_frame()
    assert (df.groupby("batch_idx").label.apply(lambda s: s.tolist() == ["safe"] * 8 + ["unsafe"] * 8)).all()
