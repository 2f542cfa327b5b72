"""The typed pipeline is the single home of every default: CLI, app pages and jobs agree with it."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest

from moe_core import pipeline as P
from moe_core.analysis.analyse import AnalysisConfig
from moe_core.analysis.selection import SelectionConfig
from moe_core.cli import build_parser, spec_from_args
from moe_core.errors import MoELabError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", list(P.COMMANDS))
def test_cli_defaults_are_the_spec_defaults(command):
    args = build_parser().parse_args([command, "--run", "r"])
    assert spec_from_args(args) == P.COMMANDS[command]()


@pytest.mark.parametrize("command", list(P.COMMANDS))
def test_every_spec_field_has_help(command):
    for f in fields(P.COMMANDS[command]):
        assert f.metadata.get("help"), f"{command}: field {f.name} has no help text"


def test_library_configs_and_specs_share_defaults():
    a, s = P.AnalyseSpec(), P.SelectSpec()
    cfg = AnalysisConfig()
    assert (a.scope, a.max_new_tokens, a.quality_filter, a.judge) == (
        cfg.scope,
        cfg.max_new_tokens,
        cfg.quality_filter,
        cfg.judge,
    )
    sel = SelectionConfig()
    assert (s.method, s.n, s.threshold, s.per_layer_k, s.top_p) == (
        sel.method,
        sel.n,
        sel.threshold,
        sel.per_layer_k,
        sel.top_p,
    )
    d = P.DemoSpec()
    assert d.select_spec().n == s.n and d.train_spec("experts").lr == P.TrainSpec().lr


@pytest.mark.parametrize(
    "spec",
    [
        P.AnalyseSpec(
            model="/m", scope="prompt", max_new_tokens=7, quality_filter=True, batch_size=8, safe_ratio=0.25
        ),
        P.SelectSpec(method="per_layer", per_layer_k=3, per_batch=True, min_sign_consistency=0.8, name="m2"),
        P.TrainSpec(
            mask_mode="per_batch",
            baseline="random_experts",
            lr=3e-3,
            epochs=1.5,
            train_router=True,
            router_consistency="forward",
            weight_decay=0.01,
        ),
        P.EvaluateSpec(steer_mask="m", eval_limit=5, max_new_tokens=9, shift=True, name="e1"),
        P.DemoSpec(n=4, skip_training=True, scope="generated"),
    ],
)
def test_to_argv_round_trips_through_the_cli(spec):
    command = P.command_of(spec)
    args = build_parser().parse_args([command, "--run", "r", *P.to_argv(spec)])
    assert spec_from_args(args) == spec


def test_old_flag_spellings_still_parse():
    args = build_parser().parse_args(
        ["evaluate", "--run", "r", "--eval-max-new-tokens", "5", "--eval-judge", "keyword"]
    )
    assert spec_from_args(args).max_new_tokens == 5
    args = build_parser().parse_args(["demo", "--mask-name", "m", "--quality-filter", "--max-batches", "2"])
    spec = spec_from_args(args)
    assert spec.mask_name == "m" and spec.quality_filter and spec.max_batches == 2


def test_no_page_builds_a_cli_flag_list():
    """Pages launch specs (jobs.start_step); only the resume button replays a stored launch."""
    pages = sorted((ROOT / "pages").glob("*.py")) + [ROOT / "app.py", *sorted((ROOT / "ui").glob("*.py"))]
    assert len(pages) > 5, "the app's pages moved: point this test at them"
    for page in pages:
        tree = ast.parse(page.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("--"):
                pytest.fail(f"{page.name} builds a CLI flag by hand: {node.value!r}")


def test_bad_values_are_user_errors_before_any_work(tmp_path):
    with pytest.raises(MoELabError, match="max_batches"):
        P.compose(P.AnalyseSpec(max_batches=0))
    with pytest.raises(MoELabError, match="no run at"):
        P.open_run(tmp_path / "nope")
    with pytest.raises(MoELabError):
        P.command_of(object())
