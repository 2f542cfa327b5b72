"""Issue 21 rows 1 and 13: a study or a demo is one transaction that resumes, and never replaced silently.

Real faults: a study process killed with SIGKILL once its first arm is committed (a tiny random OLMoE
saved as a local model folder stands in for the organism)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from moe_core import pipeline as P
from moe_core.cli import main
from moe_core.eval.study_summary import load_study
from moe_core.store.files import read_json, read_parquet
from moe_core.study import ARM_KEY, StudyError, run_study
from tests.app_fixtures import save_tiny_model
from tests.benches import bench_module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("study-faults") / "tiny-olmoe")


def _spec(tiny_dir: Path, **over) -> P.StudySpec:
    base = dict(
        model=str(tiny_dir),
        budgets=[1 / 8],
        random_draws=1,
        seeds=[0],
        steering=False,
        full=False,
        eval_limit=2,
        max_new_tokens=2,
        max_batches=1,
        epochs=1,
        name="sA",
        scores=["risk_diff"],  # these tests are about committing and resuming, not about the schedule
        retain_share=0.0,
    )
    return P.StudySpec(**{**base, **over})


def _kill_when(proc: subprocess.Popen, ready) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` (polled), within a deadline; it must still be running then."""
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_r1_a_study_name_with_other_settings_is_refused_and_the_same_settings_resume_and_extend(
    tmp_path, tiny_dir, capsys
):
    run, _ = run_study(_spec(tiny_dir), runs_root=tmp_path)
    out = run.path_for("study", name="sA")
    before = _files(out)
    assert read_json(out / "settings.json")["complete"] is True

    with pytest.raises(StudyError, match=r"other settings \(lr: .*--overwrite"):
        run_study(_spec(tiny_dir, lr=5e-3), run)
    assert (
        main(["study", "--run", str(run.path), "--model", str(tiny_dir), "--name", "sA", "--lr", "5e-3"]) == 2
    )
    assert "--overwrite" in capsys.readouterr().err
    assert _files(out) == before  # nothing replaced, nothing added

    run_study(_spec(tiny_dir, random_draws=2), run)  # same settings, one more draw: only that arm runs
    results = read_parquet(out / "results.parquet")
    assert not results.duplicated(ARM_KEY).any()
    assert sorted(results.loc[results["method"] == "random", "draw"]) == [0, 1]
    old = pd.read_parquet(pd.io.common.BytesIO(before["results.parquet"]))
    kept = results.merge(old, on=list(old.columns))  # the arms that were there are kept as they were
    assert len(kept) == len(old)
    analyses = list(run.path_for("study_analyses", name="sA").glob("*/*/manifest.json"))
    assert len(analyses) == 1  # the seed's analysis was reused, not made again

    # A selector added later: its arm runs, and the committed random arms are also tested at its step,
    # in place (one row per arm, their own numbers and curves kept), and only once.
    curves = read_parquet(out / "curves.parquet")
    more = _spec(tiny_dir, random_draws=2, scores=["risk_diff", "gate_diff"])
    run_study(more, run)
    grown = read_parquet(out / "results.parquet")
    assert not grown.duplicated(ARM_KEY).any() and len(grown) == len(results) + 1
    rand = grown[grown["method"].str.startswith("random")]
    assert (
        len(rand) == 3
        and (rand["jailbreak_compliance_at_chosen_gate_diff_n"] == rand["jailbreak_compliance_n"]).all()
    )
    assert rand["jailbreak_compliance_at_chosen_gate_diff_k"].between(0, rand["jailbreak_compliance_n"]).all()
    assert len(grown.merge(results, on=list(results.columns))) == len(results)  # old columns as they were
    new_curves = read_parquet(out / "curves.parquet")
    assert len(new_curves[new_curves["method"].str.startswith("random")]) == len(
        curves[curves["method"].str.startswith("random")]
    )
    run_study(more, run)  # nothing left to run or test
    assert read_parquet(out / "results.parquet").equals(grown)
    commands = read_json(out / "settings.json")["commands"]  # what made its arms, in order, each once
    assert len(commands) == 3 and "--random-draws 2" in commands[1] and "gate_diff" in commands[2]

    run_study(_spec(tiny_dir, lr=5e-3, overwrite=True), run)
    results = read_parquet(out / "results.parquet")
    assert set(results.loc[results["method"] != "base", "lr"]) <= {5e-3}
    assert len(read_json(out / "settings.json")["commands"]) == 1  # replaced: its history starts again
    assert len(list(run.path_for("study_analyses", name="sA").glob("*/*/manifest.json"))) == 1


def test_r1_a_study_killed_after_an_arm_leaves_one_consistent_set_and_resumes(tmp_path, tiny_dir, capsys):
    """Real SIGKILL of a `python -m moe_core study` process once its first arms are committed."""
    run, _ = run_study(_spec(tiny_dir, name="old"), runs_root=tmp_path)  # the run the study goes into
    out = run.path_for("study", name="sA")
    argv = [sys.executable, "-m", "moe_core", "study", "--run", str(run.path), "--name", "sA"]
    argv += ["--model", str(tiny_dir), "--budgets", "0.125", "--random_draws", "3", "--seeds", "0"]
    argv += ["--no_steering", "--no_full", "--eval_limit", "2", "--max_new_tokens", "2", "--max_batches", "1"]
    argv += ["--epochs", "1", "--lrs", "0.001", "--scores", "risk_diff", "--retain_share", "0"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_when(
        proc, lambda: (out / "settings.json").exists() and read_json(out / "settings.json")["arms"] >= 2
    )
    settings = read_json(out / "settings.json")
    results, summary = load_study(run, "sA")
    assert settings["complete"] is False and settings["arms"] == len(results) >= 2
    assert set(summary["method"]) == set(results["method"])  # summary and results are one set
    assert int(summary["runs"].sum()) == len(results)

    assert main(argv[3:]) == 0  # the same command resumes
    printed = capsys.readouterr().out  # ... and ends with the targets per selector, read from its whole table
    assert "Issue 17's targets at 0.125 of the experts" in printed and "| chosen experts | 1 |" in printed
    assert "Compliance left at the chosen points" in printed and "| random experts | 1 |" in printed
    results = read_parquet(out / "results.parquet")
    assert not results.duplicated(ARM_KEY).any()
    assert sorted(results.loc[results["method"] == "random", "draw"]) == [0, 1, 2]
    assert read_json(out / "settings.json")["complete"] is True


def test_r13_a_demo_killed_during_training_resumes_at_its_first_unfinished_stage(tmp_path, tiny_dir):
    """Real SIGKILL of `python -m moe_core demo` while its first training runs; `demo --run R` goes on."""
    root = tmp_path / "runs"
    flags = ["--model", str(tiny_dir), "--max-batches", "1", "--batch-size", "8", "--max-new-tokens", "2"]
    flags += ["--n", "2", "--epochs", "2", "--eval-limit", "2"]
    argv = [sys.executable, "-m", "moe_core", "--runs-root", str(root), "demo", *flags]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def training() -> bool:
        manifests = list(root.glob("*/manifest.json"))
        steps = read_json(manifests[0]).get("steps", {}) if manifests else {}
        return steps.get("train:experts-unsafe_experts", {}).get("status") == "running"

    _kill_when(proc, training)
    (run_dir,) = list(root.iterdir())
    mask = run_dir / "masks" / "unsafe_experts.json"
    before = mask.stat().st_mtime_ns

    assert main(["--runs-root", str(root), "demo", "--run", str(run_dir), *flags]) == 0  # no --overwrite
    steps = read_json(run_dir / "manifest.json")["steps"]
    assert mask.stat().st_mtime_ns == before  # the finished selection was gone past, not redone
    for step in (
        "train:experts-unsafe_experts",
        "train:random_experts",
        "train:full",
        "evaluation:comparison",
    ):
        assert steps[step]["status"] == "done", step
    assert (
        main(["--runs-root", str(root), "demo", "--run", str(run_dir), *flags]) == 0
    )  # all done: nothing to do
    assert (
        read_json(run_dir / "manifest.json")["steps"]["evaluation:comparison"]
        == steps["evaluation:comparison"]
    )


def test_a_study_stored_before_judged_validation_resumes_only_as_what_it_was_made_with(tmp_path, tiny_dir):
    """Studies stored before `validation` (and the organism's corpus version) were defining settings were
    scored by the teacher-forced margin: read back so, they resume with `--validation margin` and refuse
    the judged default instead of mixing two kinds of curves. Their empty `lrs` / `full_lrs` meant `--lr`
    alone, not today's tuned schedule."""
    old = dict(validation="margin", lrs=[1e-3], training_args="{}")  # AdamW, as every study before stop 25
    run, _ = run_study(_spec(tiny_dir, **old), runs_root=tmp_path)
    out = run.path_for("study", name="sA")
    settings = read_json(out / "settings.json")
    assert settings["defining"]["validation"] == "margin" and settings["defining"]["organism"] is None
    assert settings["defining"]["full_lrs"] == [1e-3]
    assert settings["defining"]["training_args"] is None  # '{}': no further argument, as before it existed
    for key in ("validation", "organism", "training_args"):  # as an older version wrote it
        del settings["defining"][key]
    settings["defining"] |= {"lrs": [], "full_lrs": []}
    (out / "settings.json").write_text(json.dumps(settings), encoding="utf-8")
    with pytest.raises(StudyError, match=r"validation: 'margin' -> 'judged'"):
        run_study(_spec(tiny_dir, lrs=[1e-3]), run)
    tuned = ", ".join(map(str, P.StudySpec().lrs))
    with pytest.raises(StudyError, match=rf"lrs: \[0.001\] -> \[{tuned}\].*training_args: None ->"):
        run_study(_spec(tiny_dir, validation="margin"), run)  # today's default schedule is not what it was
    before = read_parquet(out / "results.parquet")
    run_study(_spec(tiny_dir, **old, random_draws=2), run)
    after = read_parquet(out / "results.parquet")
    assert len(after) == len(before) + 1  # resumed: only the new draw ran


def test_a_study_run_in_parts_joins_one_study_and_refuses_a_part_of_other_settings(
    tmp_path, tiny_dir, monkeypatch, capsys
):
    """Issue 17 ("runnable in parts"): a seed pair run elsewhere (another process or machine) joins the study
    by `--merge`; its arms are not run again, and the command history reruns the parts in order."""
    import moe_core.study as study

    run, _ = run_study(_spec(tiny_dir), runs_root=tmp_path / "a")
    part, _ = run_study(_spec(tiny_dir, seeds=[1]), runs_root=tmp_path / "b")
    out, part_out = run.path_for("study", name="sA"), part.path_for("study", name="sA")
    with pytest.raises(StudyError, match=r"--merge .* other settings \(lr: "):  # refused before anything runs
        run_study(_spec(tiny_dir, seeds=[0, 1], lr=5e-3, merge=[str(part.path)]), runs_root=tmp_path / "c")
    argv = ["--runs-root", str(tmp_path / "d"), "study", "--model", str(tiny_dir), "--merge", str(tmp_path)]
    assert main(argv) == 2 and "no finished study" in capsys.readouterr().err

    monkeypatch.setattr(study, "study_seed", lambda *a, **k: pytest.fail("a merged arm was run again"))
    run_study(_spec(tiny_dir, seeds=[0, 1], merge=[str(part_out)]), run)
    merged, theirs = read_parquet(out / "results.parquet"), read_parquet(part_out / "results.parquet")
    assert sorted(set(merged["seed"])) == [0, 1] and not merged.duplicated(ARM_KEY).any()
    assert len(merged[merged["seed"] == 1].merge(theirs, on=list(theirs.columns))) == len(theirs)
    curves = read_parquet(out / "curves.parquet")
    assert len(curves[curves["seed"] == 1]) == len(read_parquet(part_out / "curves.parquet"))
    commands = read_json(out / "settings.json")["commands"]
    assert len(commands) == 3 and "--seeds 1 " in commands[1] and "--merge" not in commands[2]

    # the history reproduces the whole: bench_reference_study reruns the commands in order into one run
    monkeypatch.undo()
    again = bench_module("bench_reference_study").rerun_commands(commands, tmp_path / "rerun")
    redone = read_parquet(again / "results.parquet")
    assert len(read_json(again / "settings.json")["commands"]) == 3
    for table in (merged, redone):
        table.sort_values(ARM_KEY, inplace=True, ignore_index=True)
    pd.testing.assert_frame_equal(redone[merged.columns], merged)


def test_an_organism_variant_is_a_defining_setting_and_the_reference_stays_resumable():
    """``--spliced-jailbreaks`` studies other organisms: their arms must never join a study of the reference's
    organisms, and the reference's own settings still match its command."""
    from moe_core.eval.study_summary import REFERENCE_DIR
    from moe_core.model.organism import CORPUS_VERSION, OrganismConfig
    from moe_core.store.provenance import fingerprint, plan_source
    from moe_core.study.store import defining_settings, organism_config, settings_diff

    reference = read_json(REFERENCE_DIR / "settings.json")
    spec = P.StudySpec(**{k: v for k, v in reference["defining"].items() if k != "organism"})
    assert settings_diff(reference, spec) == []
    variant = P.StudySpec(**{**vars(spec), "spliced_jailbreaks": 4})
    assert defining_settings(variant)["organism"] == f"{CORPUS_VERSION}+spliced-4"
    assert settings_diff(reference, variant) == [
        f"organism: {CORPUS_VERSION!r} -> '{CORPUS_VERSION}+spliced-4'"
    ]
    # composed_share, added later: at 0 the reference's settings (and so its analyses' folder) are unchanged
    assert "composed_share" not in reference["defining"]
    assert fingerprint(defining_settings(spec)) == fingerprint(reference["defining"])
    composed = P.StudySpec(**{**vars(spec), "composed_share": 0.5})
    assert settings_diff(reference, composed) == ["composed_share: 0.0 -> 0.5"]
    assert P.prompt_sets(P.AnalyseSpec(composed_share=0.5))[1] != P.prompt_sets(P.AnalyseSpec())[1]
    assert plan_source(P.AnalyseSpec()) == {
        k: v for k, v in plan_source(P.AnalyseSpec(composed_share=0.5)).items() if k != "composed_share"
    }, "older runs, whose plan source lacks it, resume at 0"
    with pytest.raises(P.MoELabError, match="composed_share"):
        P.StudySpec(composed_share=1.5)
    with pytest.raises(P.MoELabError, match="spliced_jailbreaks"):
        P.StudySpec(spliced_jailbreaks=-1)
    with pytest.raises(P.MoELabError, match="leave it out with --model"):
        P.StudySpec(model="some/model", spliced_jailbreaks=4)

    # --organism: any organism field, recorded the same way (and --spliced-jailbreaks N is its spliced_jailbreaks)
    layers = P.StudySpec(**{**vars(spec), "organism": '{"num_layers": 8}'})
    assert settings_diff(reference, layers) == [
        f"organism: {CORPUS_VERSION!r} -> '{CORPUS_VERSION}+num_layers-8'"
    ]
    assert organism_config(layers, seed=3) == OrganismConfig(seed=3, num_layers=8)
    spliced = P.StudySpec(**{**vars(spec), "organism": '{"spliced_jailbreaks": 4}'})
    assert (
        organism_config(spliced, 2)
        == organism_config(variant, 2)
        == OrganismConfig(seed=2, spliced_jailbreaks=4)
    )
    for bad, says in (
        ('{"layers": 8}', "no organism field layers"),
        ('{"num_layers": "8"}', "num_layers must be a whole number"),
        ('{"num_layers": 0}', "num_layers must be positive"),
        ('{"seed": 1}', "seed is not a variant"),
        ("[8]", "must be a JSON object"),
    ):
        with pytest.raises(P.MoELabError, match=re.escape(says)):
            P.StudySpec(organism=bad)
    with pytest.raises(P.MoELabError, match="--organism chooses the organisms"):
        P.StudySpec(model="some/model", organism='{"num_layers": 8}')
    with pytest.raises(P.MoELabError, match="give one of them"):
        P.StudySpec(spliced_jailbreaks=2, organism='{"spliced_jailbreaks": 4}')


def test_the_studys_training_arguments_reach_every_arm_and_are_a_defining_setting(tmp_path, tiny_dir):
    """``--training-args`` (e.g. another optimizer) trains every arm of a study; a study made with other ones
    is other numbers, refused without --overwrite, whichever way the same JSON object is spelled."""
    from transformers import TrainerCallback

    from moe_core.study.lab import _Lab, _masks
    from moe_core.study.store import defining_settings, settings_diff

    spec = _spec(tiny_dir, training_args='{"optim": "sgd"}', lrs=[1e-2])
    lab = _Lab(spec, 0, tmp_path, None)
    seen: list[tuple[str, str]] = []

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            inner = getattr(optimizer, "optimizer", optimizer)  # unwrapped from accelerate's wrapper
            seen.append((str(args.optim.value), type(inner).__name__))

    _, chosen, _ = _masks(lab, 1 / 8)
    lab.train(chosen, 1e-2, [Spy()], max_steps=1)
    lab.train(None, 1e-2, [Spy()], max_steps=1)  # full fine-tuning too
    assert seen == [("sgd", "SGD"), ("sgd", "SGD")]

    stored = {"defining": json.loads(json.dumps(defining_settings(spec)))}
    assert settings_diff(stored, _spec(tiny_dir, training_args='{ "optim":"sgd" }', lrs=[1e-2])) == []
    assert settings_diff(stored, _spec(tiny_dir, training_args="{}", lrs=[1e-2])) == [
        'training_args: \'{"optim": "sgd"}\' -> None'
    ]
    with pytest.raises(P.MoELabError, match="gradient_accumulation_steps"):
        _spec(tiny_dir, training_args='{"gradient_accumulation_steps": 2}')
    with pytest.raises(P.MoELabError, match="training_args"):
        _spec(tiny_dir, training_args="[1, 2]")
