"""The reference study: reproduce it, compare with the committed one, or promote a finished study to it.

    .venv/bin/python bench/bench_reference_study.py                       # rerun the recorded commands, compare
    .venv/bin/python bench/bench_reference_study.py --promote RUN [NAME]  # a finished study becomes the reference

The reference (``moe_core/resources/reference_study``) is what a fresh clone shows as the result across
seeds (``make demo``, the Home page, the report) before it has a study of its own; its settings.json
records the commands that made it (``commands``: a study extended by later commands, in order) and the
commit of its last arm. Rerunning prints, per arm, the across-seed table of the
committed reference and of the rerun side by side, and the wall time.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_core.eval.study_summary import (  # noqa: E402
    REFERENCE_DIR,
    STUDY_NAME,
    across_seed_headline,
    reference_study,
    study_commands,
)
from moe_core.store.files import read_json, read_parquet  # noqa: E402
from moe_core.store.run import Run  # noqa: E402
from moe_core.study import stored_study  # noqa: E402

FILES = ("settings.json", "results.parquet", "curves.parquet", "summary.parquet")


def promote(run_dir: str, name: str) -> int:
    out = Run.open(run_dir).path_for("study", name=name)
    stored = stored_study(out)
    if stored is None or not stored[0].get("complete"):
        print(f"{out} holds no finished study; finish it first (the same command resumes it)")
        return 2
    with tempfile.TemporaryDirectory(dir=REFERENCE_DIR.parent) as tmp:
        for f in FILES:
            shutil.copy2(out / f, Path(tmp) / f)
        shutil.rmtree(REFERENCE_DIR, ignore_errors=True)
        shutil.copytree(tmp, REFERENCE_DIR)
        REFERENCE_DIR.chmod(0o755)  # mkdtemp made the copy's folder private
    print(
        f"reference study <- {out}\n\n{across_seed_headline(read_parquet(REFERENCE_DIR / 'results.parquet'))}"
    )
    return 0


def rerun_commands(commands: list[str], root: Path) -> Path:
    """Run a study's recorded commands in order into one new run under ``root`` (each extends what the ones
    before made: the first makes the run, the rest get its ``--run``); the study's folder."""
    root.mkdir(parents=True, exist_ok=True)
    there, run_dir, name = set(root.iterdir()), None, STUDY_NAME
    for command in commands:
        argv = shlex.split(command)[3:]  # after "python -m moe_core": "study", then its flags
        where = ["--run", str(run_dir)] if run_dir else []
        cmd = [sys.executable, "-m", "moe_core", "--runs-root", str(root), argv[0], *where, *argv[1:]]
        subprocess.run(cmd, cwd=ROOT, check=True)
        name = argv[argv.index("--name") + 1] if "--name" in argv else STUDY_NAME
        run_dir = run_dir or next(iter(set(root.iterdir()) - there))  # the run the first command made
    if run_dir is None:
        raise ValueError("a study records at least one command")
    return Run.open(run_dir).path_for("study", name=name)


def rerun(runs_root: str | None) -> int:
    reference = reference_study()
    if reference is None:
        print("no reference study is committed yet")
        return 2
    settings, results = reference
    with tempfile.TemporaryDirectory(prefix="bench-reference-") as tmp:
        t0 = time.perf_counter()
        out = rerun_commands(study_commands(settings), Path(runs_root or tmp))
        seconds = time.perf_counter() - t0
        print("committed reference:\n" + across_seed_headline(results))
        print("\nthis rerun:\n" + across_seed_headline(read_parquet(out / "results.parquet")))
        print(f"\nrerun took {seconds / 60:.1f} min; reference made at commit {settings.get('commit')}")
        print(f"settings recorded: {read_json(out / 'settings.json')['defining']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--promote", nargs="+", metavar=("RUN", "NAME"), help="a finished study's run (and name)")
    ap.add_argument("--runs-root", help="keep the rerun here (default: a temporary folder)")
    args = ap.parse_args(argv)
    if args.promote:
        return promote(args.promote[0], args.promote[1] if len(args.promote) > 1 else "selection")
    return rerun(args.runs_root)


if __name__ == "__main__":
    raise SystemExit(main())
