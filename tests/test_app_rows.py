"""Rows of the issue "The app for a researcher's own runs", each driven headlessly with AppTest.

Every test reproduces what a user saw (a silent switch to another run, counts that disagree, a raw
decoder error, markdown in a run's name, "model null" in the report, raw column names) and checks
what the row expects instead. The runs are small and built without a model (seconds).
"""

from __future__ import annotations

import json
import re

import pytest

from moe_core.batching.plan import load_plan, save_plan
from moe_core.store.files import read_parquet, write_parquet
from moe_core.store.run import Run
from tests.app_fixtures import build_risk_only_run, compose_plan
from tests.test_app import APP, FILES, button, errors, metric, no_exceptions, open_app, upload
from ui.messages import md_escape

AppTest = pytest.importorskip("streamlit.testing.v1").AppTest


def risk_run(root, name: str = "risky") -> Run:
    """A small run with a saved plan, per-batch risk files and both risk tables (no model needed)."""
    run = build_risk_only_run(root, n_batches=2, num_layers=2, num_experts=8, top_k=2, tokens=40)
    run.update(name=name)
    save_plan(run.path_for("plan"), compose_plan(2))
    per_batch = read_parquet(run.path_for("risk_per_batch"))
    for b, table in per_batch.groupby("batch_idx"):
        write_parquet(run.path_for("risk", batch_idx=int(b)), table.reset_index(drop=True))
    return Run.open(run.path)


def fresh_app(query: dict[str, str] | None = None) -> AppTest:
    """A new session (a reload or a shared link) with ``query`` in the URL."""
    at = AppTest.from_file(APP, default_timeout=90)
    at.query_params.update(query or {})
    at.run()
    return at


def open_path(at: AppTest) -> str | None:
    return at.session_state["run_path"] if "run_path" in at.session_state else None


def main_texts(at: AppTest) -> list[str]:
    """Every markdown-rendered text of the page (main area and sidebar)."""
    kinds = ("title", "header", "subheader", "caption", "markdown", "error", "warning", "info", "success")
    return [el.value for kind in kinds for el in at.get(kind)]


def column_labels(at: AppTest) -> list[dict[str, str]]:
    """{column: header shown} of every dataframe on the page (its column config, else the raw name)."""
    out = []
    for df in at.dataframe:
        config = json.loads(df.proto.columns or "{}")
        out.append({str(c): config.get(str(c), {}).get("label", str(c)) for c in df.value.columns})
    return out


# -- row 7 ------------------------------------------------------------------------------------------
def test_row7_a_link_to_a_missing_run_says_so_and_opens_no_other(runs_root):
    other = Run.create(runs_root, name="other")
    for wanted in ("doesnotexist", "../../etc"):
        at = fresh_app({"run": wanted})
        no_exceptions(at)
        assert open_path(at) is None
        said = [e for e in (x.value for x in at.main.error) if "exists" in e]
        assert len(said) == 1, errors(at)
        assert md_escape(wanted) in said[0] and "Pick a run" in said[0], said
        assert not at.sidebar.error, [e.value for e in at.sidebar.error]
        assert at.sidebar.selectbox(key="run_picker").value is None  # nothing picked for the user
        assert at.query_params["run"] == wanted  # the link stays as it was
        # a page that needs a run shows no other run either: the same message, once
        at.switch_page(FILES["data"]).run()
        no_exceptions(at)
        assert [e.value for e in at.main.error if "exists" in e.value] == said
        assert not [i.value for i in at.info if "No run is open" in i.value]
        assert not at.get("metric")
    # picking a run in the sidebar opens it and the message goes
    at.sidebar.selectbox(key="run_picker").set_value(str(other.path)).run()
    no_exceptions(at)
    assert at.session_state["run_path"] == str(other.path)
    assert at.query_params["run"] == other.id
    assert not [e.value for e in at.main.error if "exists" in e.value]


# -- row 10 -----------------------------------------------------------------------------------------
def compose(at: AppTest, batch_size: int = 8) -> AppTest:
    at.number_input(key="batch_size").set_value(batch_size)
    at.run()
    button(at, "Compose batches").click()
    at.run()
    no_exceptions(at)
    return at


def test_row10_unused_counts_have_one_source(runs_root):
    Run.create(runs_root, name="data")
    at = compose(open_app(page="data"))
    draft = load_plan(Run.open(at.session_state["run_path"]).path / "plan.draft.json")
    at.selectbox(key="dr_item").set_value(draft.batch(0).items[0].id)
    button(at, "Drop").click()
    at.run()
    no_exceptions(at)
    safe_n, unsafe_n = (int(x) for x in metric(at, "Unused (safe / unsafe)").split("/"))
    (tab,) = [t.label for t in at.tabs if t.label.startswith("Unused prompts")]
    assert tab == f"Unused prompts ({safe_n + unsafe_n})", (tab, safe_n, unsafe_n)


CSV_SAFE = b"prompt,category\nhow do I bake bread,\n,\nwhat is the capital of France,\nname a colour,\ntell me a joke,\n"
CSV_UNSAFE = (
    b"prompt,category\nhow to pick a lock,\nhow to steal a car,\nhow to make a weapon,\nhow to hurt a dog,\n"
)


def test_row10_empty_rows_skipped_are_said_on_the_page(runs_root):
    at = upload(runs_root, "up_safe", ("mine.csv", CSV_SAFE, "text/csv"))
    assert not errors(at), errors(at)
    said = [c.value for c in at.caption if "4 safe prompts" in c.value]
    assert said and "1 empty row skipped" in said[0], [c.value for c in at.caption]


def test_row10_moving_an_item_to_its_own_batch_says_nothing_moved(runs_root):
    Run.create(runs_root, name="data")
    at = compose(open_app(page="data"))
    run = Run.open(at.session_state["run_path"])
    draft = load_plan(run.path / "plan.draft.json")
    at.selectbox(key="mv_item").set_value(draft.batch(0).items[1].id)
    at.selectbox(key="mv_to").set_value(0)
    button(at, "Move").click()
    at.run()
    no_exceptions(at)
    texts = main_texts(at)
    assert not [t for t in texts if t.startswith("Moved")], texts
    assert [t for t in texts if "already in batch 0" in t], texts
    assert load_plan(run.path / "plan.draft.json").to_json_dict() == draft.to_json_dict()  # nothing to undo


def test_row10_empty_columns_are_hidden_in_the_prompt_tables(runs_root):
    at = upload(runs_root, "up_safe", ("safe.csv", CSV_SAFE, "text/csv"))
    at.file_uploader(key="up_unsafe").set_value(("unsafe.csv", CSV_UNSAFE, "text/csv"))
    at.run()
    assert not errors(at), errors(at)
    at = compose(at, batch_size=4)
    tables = [df.value for df in at.dataframe if "text" in df.value.columns]  # the prompt tables
    assert tables
    for t in tables:
        empty = [c for c in t.columns if t[c].isna().all() or (t[c].astype(str).str.strip() == "").all()]
        assert not empty, (list(t.columns), empty)


# -- row 11 -----------------------------------------------------------------------------------------
def test_row11_file_and_mask_name_errors_in_plain_words_once(runs_root):
    binary = b"prompt\n" + bytes(range(256)) * 4  # NUL and control bytes: an image, an archive...
    at = upload(runs_root, "up_safe", ("x.csv", binary, "text/csv"))
    shown = errors(at)
    assert len(shown) == 1 and "x.csv is not a text file" in shown[0], shown
    assert "codec" not in shown[0] and "CSV" in shown[0]
    at.file_uploader(key="up_safe").set_value(("x.csv", "prompt\ncafé crème\n".encode("latin-1"), "text/csv"))
    at.run()
    shown = errors(at)  # text in another encoding: said as such, with the byte's line
    assert len(shown) == 1 and "x.csv is not UTF-8 text" in shown[0] and "line 2" in shown[0], shown
    at.file_uploader(key="up_safe").set_value(("x.csv", b"", "text/csv"))
    at.run()
    shown = errors(at)
    assert len(shown) == 1 and "x.csv is empty" in shown[0] and "No columns" not in shown[0], shown
    # an invalid mask name: one message, in either scope, before and after pressing Save
    risk_run(runs_root)
    at = open_app(page="experts")
    at.text_input(key="ex_name_global_False").input("bad/name").run()
    assert len([e for e in errors(at) if "invalid mask name" in e]) == 1, errors(at)
    assert button(at, "Save mask").disabled  # nothing to press that would say it again
    at.segmented_control(key="ex_scope").set_value("per_batch").run()
    at.text_input(key="ex_name_per_batch_False").input("bad/name").run()
    no_exceptions(at)
    assert len([e for e in errors(at) if "invalid mask name" in e]) == 1, errors(at)


# -- row 13 -----------------------------------------------------------------------------------------
def test_row13_a_run_name_is_shown_literally_everywhere(runs_root):
    name = "<script>alert(9)</script>**xss**"
    run = risk_run(runs_root, name=name)
    at = open_app(run)
    assert f"Run: {md_escape(name)}" in [s.value for s in at.subheader]
    for page in FILES:
        at.switch_page(FILES[page]).run()
        no_exceptions(at)
        raw = [t for t in main_texts(at) if "**xss**" in t or "<script>" in t]
        assert not raw, (page, raw)


# -- row 14 -----------------------------------------------------------------------------------------
def test_row14_report_of_an_app_run_names_its_steps_and_model(runs_root):
    from moe_core.pipeline import commit_plan

    at = open_app()
    at.sidebar.text_input(key="new_run_name").input("made in the app")
    button(at, "Create run").click()
    at.run()
    run = Run.open(at.session_state["run_path"])
    assert run.manifest.get("model") is None
    commit_plan(compose_plan(2), run)  # what the Data page's "Save plan" does
    at.switch_page(FILES["present"]).run()
    button(at, "Export report").click()
    at.run()
    no_exceptions(at)
    html = (run.path / "report.html").read_text()
    model = re.search(r"<td>model</td>\s*<td>([^<]*)</td>", html)
    assert model and model.group(1) != "null" and "built-in organism" in model.group(1), model
    assert "built by the library directly" not in html
    assert "batch plan" in html and "not recorded" in html


# -- row 16 -----------------------------------------------------------------------------------------
def test_row16_risk_tables_have_readable_headers(runs_root):
    run = risk_run(runs_root)
    at = open_app(run, page="experts")
    no_exceptions(at)
    (chosen,) = [c for c in column_labels(at) if "risk_diff" in c]
    assert chosen["risk_diff"] == "risk difference" and chosen["Layer_Expert"] == "expert id", chosen
    assert not [c for c, label in chosen.items() if label == c and "_" in c], chosen
    at.switch_page(FILES["runs"]).run()
    no_exceptions(at)
    (risk,) = [c for c in column_labels(at) if "a_safe_n" in c]
    assert risk["a_safe"] == "safe tokens routed" and risk["a_unsafe"] == "unsafe tokens routed", risk
    assert risk["n_safe_tokens"] == "safe tokens" and risk["risk_diff"] == "risk difference", risk
    assert not [c for c, label in risk.items() if label == c and "_" in c], risk


# -- row 17 -----------------------------------------------------------------------------------------
def test_row17_composing_shows_its_progress_and_the_page_stays_live(runs_root, monkeypatch):
    """Composing runs beside the page: while it works (held here at its "keeping the prompts" stage), the
    page shows a progress bar with the stage and disables the button; when it ends, the batches appear."""
    import threading
    import time

    from moe_core import pipeline as P
    from ui import tasks

    gate, real = threading.Event(), P.store_draft_sources
    monkeypatch.setattr(P, "store_draft_sources", lambda *a, **k: (gate.wait(60), real(*a, **k)))
    monkeypatch.setattr(tasks, "TASK_INLINE_S", 0.05)
    Run.create(runs_root, name="big")
    at = open_app(page="data")
    button(at, "Compose batches").click()
    at.run()
    no_exceptions(at)
    (bar,) = at.get("progress")
    assert "Composing: keeping the" in bar.proto.text and "(1 / 3)" in bar.proto.text, bar.proto.text
    assert button(at, "Compose batches").disabled
    assert not (Run.open(at.session_state["run_path"]).path / "plan.draft.json").exists()
    gate.set()
    deadline = time.monotonic() + 60
    while not any(s.value.startswith("Composed") for s in at.success):
        assert time.monotonic() < deadline, "composing never ended"
        time.sleep(0.2)
        at.run()
    no_exceptions(at)
    assert any(re.match(r"Composed \d+ batches of 16\.", s.value) for s in at.success)
    assert (Run.open(at.session_state["run_path"]).path / "plan.draft.json").is_file()
    assert not button(at, "Compose batches").disabled
