"""Issue 21 rows 6 and 12: an evaluation is one transaction; links out of a run are refused and named.

Row 6 is cut between its renames by a simulated kill (the renaming process raises ``SystemExit`` after the
first rename: a real SIGKILL cannot be aimed between two renames a few microseconds apart); row 12 uses
real symbolic links."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from moe_core.doctor import diagnose
from moe_core.eval import evaluation as E
from moe_core.store import atomic
from moe_core.store.files import RunError
from moe_core.store.run import Run


def _save(run: Run, tag: str) -> None:
    E.save_evaluation(run, pd.DataFrame({"answer": [tag]}), pd.DataFrame({"model": [tag]}), name="comparison")


def _cut_after_renames(monkeypatch, n: int) -> None:
    real, calls = os.replace, []

    def replace(src, dst):
        if Path(src).parent.name.startswith(".txn-") and Path(dst).parent.name == "eval":  # stage -> place
            if len(calls) == n:
                raise SystemExit("killed")
            calls.append(dst)
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)


@pytest.mark.parametrize("cut", [0, 1, 2])
def test_r6_an_evaluation_cut_between_its_renames_reads_whole_and_doctor_finishes_it(
    tmp_path, monkeypatch, cut
):
    run = Run.create(tmp_path, name="r6")
    _save(run, "old")
    _cut_after_renames(monkeypatch, cut)
    with pytest.raises(SystemExit):
        _save(run, "new")
    monkeypatch.undo()

    responses, summary = E.load_evaluation(run)  # the new set as a whole, never old and new mixed
    assert responses["answer"].tolist() == ["new"] and summary["model"].tolist() == ["new"]
    assert responses.attrs["evaluation"]["n_responses"] == 1
    assert E.list_evaluations(run) == ["comparison"]
    found = diagnose(run)
    assert [f.path for f in found] == ["eval"] and "cut short" in found[0].problem  # not "leftover: deleted"

    assert any(f.repaired for f in diagnose(run, repair=True))
    assert sorted(p.name for p in run.path_for("eval").iterdir()) == [
        "comparison.json",
        "comparison_responses.parquet",
        "comparison_summary.parquet",
    ]
    assert E.load_evaluation(run)[1]["model"].tolist() == ["new"]
    assert diagnose(run) == []


def test_r6_a_kill_before_the_commit_point_keeps_the_previous_evaluation(tmp_path, monkeypatch):
    run = Run.create(tmp_path, name="r6")
    _save(run, "old")
    monkeypatch.setattr(atomic, "atomic_write_text", lambda *a: (_ for _ in ()).throw(SystemExit("killed")))
    with pytest.raises(SystemExit):
        _save(run, "new")
    monkeypatch.undo()
    assert E.load_evaluation(run)[1]["model"].tolist() == ["old"]
    assert diagnose(run) == []  # the stage folder went with the exception
    (run.path_for("eval") / ".txn-killed.tmp").mkdir()  # what a SIGKILL before the journal leaves
    assert [f.fix for f in diagnose(run)] == ["deleted"]  # a plain leftover: the previous evaluation stands


def test_r6_a_new_save_finishes_a_cut_one_first(tmp_path, monkeypatch):
    run = Run.create(tmp_path, name="r6")
    _save(run, "old")
    _cut_after_renames(monkeypatch, 1)
    with pytest.raises(SystemExit):
        _save(run, "middle")
    monkeypatch.undo()
    _save(run, "newest")
    assert E.load_evaluation(run)[0]["answer"].tolist() == ["newest"]
    assert not list(run.path_for("eval").glob(".txn-*"))


def test_r12_links_out_of_a_run_are_refused_named_and_a_linked_leftover_is_removed_not_followed(tmp_path):
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep" / "precious.txt").write_text("not the run's")
    (outside / "mask.json").write_text("{}")
    run = Run.create(tmp_path / "runs", name="r12")
    (run.path / "masks").mkdir()
    os.symlink(outside / "mask.json", run.path_for("mask", name="linked"))
    os.symlink(outside / "keep", run.path / ".leftover.tmp")

    with pytest.raises(RunError, match="points outside the run"):
        run.path_for("mask", name="linked")
    found = {f.path: f for f in diagnose(run)}
    assert "link out of the run" in found["masks/linked.json"].problem
    assert found[".leftover.tmp"].fix == "deleted"

    repaired = {f.path: f for f in diagnose(run, repair=True)}
    assert repaired[".leftover.tmp"].repaired and not (run.path / ".leftover.tmp").is_symlink()
    assert (outside / "keep" / "precious.txt").read_text() == "not the run's"  # the link went, not its target
    assert not repaired["masks/linked.json"].repaired  # named with its fix, never said to be repaired
    assert [f.path for f in diagnose(run)] == ["masks/linked.json"]  # what remains is said again, truthfully


def test_a_mask_and_its_random_baseline_are_one_set(tmp_path, monkeypatch):
    """A kill between the two renames of `select --random-baseline` (simulated as in row 6) leaves the new pair
    readable as a whole; the previous pair stays whole when the kill comes before the commit point."""
    from moe_core import pipeline as P
    from moe_core.analysis.masks import ExpertMask
    from tests.app_fixtures import build_risk_only_run

    run = build_risk_only_run(tmp_path, n_batches=4)
    P.select(P.SelectSpec(n=4, random_baseline=True), run)
    real, calls = os.replace, []

    def replace(src, dst):
        if Path(src).parent.name.startswith(".txn-") and Path(dst).parent.name == "masks":
            if calls:
                raise SystemExit("killed")
            calls.append(dst)
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(SystemExit):
        P.select(P.SelectSpec(n=6, random_baseline=True, overwrite=True), run)
    monkeypatch.undo()
    found = {f.path for f in diagnose(run)}
    assert found == {"masks"}  # the cut commit, named
    diagnose(run, repair=True)
    chosen = ExpertMask.load(run.path_for("mask", name="unsafe_experts"))
    baseline = ExpertMask.load(run.path_for("mask", name="unsafe_experts_random"))
    assert chosen.count() == baseline.count() == 6  # both new, never one old and one new


def test_r4_with_long_prompts_cut_a_too_long_prompt_is_cut_to_the_context_and_says_so(tmp_path, capsys):
    """The setting beside row 4's refusal: `--long-prompts cut` keeps the prompt, cut to fit, before any model
    call (a 5 MB line is tokenized from a bounded prefix only), and the plan says it was cut."""
    import time

    from moe_core.batching.plan import load_plan
    from moe_core.cli import main
    from moe_core.store.run import Run
    from tests.app_fixtures import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny")  # max_position_embeddings 256
    safe = tmp_path / "safe.txt"
    safe.write_text("\n".join(f"How do I bake bread number {i}?" for i in range(2)) + "\n")
    unsafe = tmp_path / "unsafe.txt"
    unsafe.write_text("How to " + "x " * 2_500_000 + "\nTell me a secret.\n")
    root = tmp_path / "runs"
    argv = ["--runs-root", str(root), "analyze", "--model", str(model_dir), "--safe", str(safe)]
    argv += ["--unsafe", str(unsafe), "--batch-size", "2", "--max-new-tokens", "2", "--long-prompts", "cut"]
    t0 = time.monotonic()
    assert main(argv) == 0, capsys.readouterr().err
    assert time.monotonic() - t0 < 300
    (run_dir,) = list(root.iterdir())
    items = load_plan(Run.open(run_dir).path_for("plan")).items()
    (cut,) = [it for it in items if it.meta.get("cut_from_chars")]
    assert cut.meta["cut_from_chars"] > 5_000_000 - 10 and len(cut.text) < 1000
    assert Run.open(run_dir).completed_batches()
