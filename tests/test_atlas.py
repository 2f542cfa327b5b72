"""The expert atlas (issue 19): the index equals a brute-force count over the routing files, resumes and grows
by shards, answers the three CLI forms, and renders its page (card, search, map) in AppTest."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from moe_core import pipeline as P
from moe_core.analysis.analyse import SCOPE_SPAN
from moe_core.analysis.atlas import TOP_CONTEXTS, AtlasError, atlas_dir, build_atlas
from moe_core.analysis.atlas_query import Atlas
from moe_core.cli import main
from moe_core.model.routing import load_batch_routing
from moe_core.store.files import read_json
from tests.app_fixtures import build_finished_run, save_tiny_model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("atlas")
    model_dir = save_tiny_model(tmp / "tiny-olmoe")
    return build_finished_run(tmp / "runs", model_dir, n_batches=3, train=False)


def _entries(run) -> pd.DataFrame:
    """Every routing entry of the analysed (kept) tokens, read the slow obvious way."""
    rows = []
    for b in sorted(run.completed_batches()):
        routing = load_batch_routing(run.path_for("routing", batch_idx=b))
        for s in read_json(run.path_for("outputs", batch_idx=b))["samples"]:
            if not s["kept"]:
                continue
            r = routing[s["in_batch_idx"]].select(SCOPE_SPAN["generated"])
            for row, layer in enumerate(routing.moe_layers):
                for t in range(r.token_ids.size):
                    for j in range(r.expert_ids.shape[-1]):
                        rows.append(
                            dict(
                                layer=layer,
                                expert=int(r.expert_ids[row, t, j]),
                                token_id=int(r.token_ids[t]),
                                weight=float(r.weights[row, t, j]),
                                label=s["label"],
                                batch_idx=b,
                                in_batch_idx=s["in_batch_idx"],
                                position=t,
                            )
                        )
    return pd.DataFrame(rows)


def test_the_index_equals_a_brute_force_count_of_the_routing_files(run):
    build_atlas(run)
    atlas = Atlas.open(run)
    truth = _entries(run)
    ex = atlas.experts().set_index(["layer", "expert"])
    counts = truth.groupby(["layer", "expert", "label"]).size().unstack(fill_value=0)
    assert (ex.loc[counts.index, "safe_n"] == counts["safe"]).all()
    assert (ex.loc[counts.index, "unsafe_n"] == counts["unsafe"]).all()
    tokens = truth.drop_duplicates(["batch_idx", "in_batch_idx", "position", "label"])["label"].value_counts()
    assert atlas.meta["safe_tokens"] == tokens["safe"] and atlas.meta["unsafe_tokens"] == tokens["unsafe"]
    mean_w = truth.groupby(["layer", "expert"])["weight"].mean()
    assert np.allclose(ex.loc[mean_w.index, "mean_weight"], mean_w, atol=1e-3)

    layer, expert = counts.index[0]
    card = atlas.card(layer, expert)
    mine = truth[(truth["layer"] == layer) & (truth["expert"] == expert)]
    top = Counter(mine["token_id"]).most_common(1)[0]
    assert card["tokens"].iloc[0]["n"] == top[1]
    best = sorted(mine["weight"], reverse=True)[:TOP_CONTEXTS]
    assert np.allclose([c["weight"] for c in card["contexts"]], best, atol=1e-3)
    # co-activation: tokens routed to both experts of the same layer, counted the slow way
    keys = ["batch_idx", "in_batch_idx", "position"]
    same = truth[truth["layer"] == layer]
    sets = same.groupby(keys)["expert"].apply(set)
    for partner in card["coactive_same_layer"]:
        assert partner["n"] == sum(expert in s and partner["expert"] in s for s in sets)
    assert card["risk_series"]["batch_idx"].tolist() == [0, 1, 2]


def test_the_token_tables_equal_a_brute_force_ranking_ties_included(run):
    """Each expert's top tokens and each token's top experts (counts, the ranking, ties to the smaller id,
    each token's total) as a pandas group-by over every routing entry gives them."""
    from moe_core.analysis.atlas_tokens import TOKEN_EXPERTS, TOP_TOKENS

    build_atlas(run)
    index = atlas_dir(run) / "index"
    n = _entries(run).groupby(["layer", "expert", "token_id"]).size().rename("n").reset_index()
    top = n.sort_values(["layer", "expert", "n", "token_id"], ascending=[True, True, False, True])
    top = top.groupby(["layer", "expert"]).head(TOP_TOKENS).reset_index(drop=True)
    keys = ["layer", "expert", "token_id", "n"]
    got = pd.read_parquet(index / "tokens.parquet")[keys].sort_values(keys[:3]).reset_index(drop=True)
    assert got.astype("int64").equals(top.sort_values(keys[:3]).reset_index(drop=True).astype("int64"))
    n["token_n"] = n.groupby(["layer", "token_id"])["n"].transform("sum")
    best = n.sort_values(["layer", "token_id", "n", "expert"], ascending=[True, True, False, True])
    best = best.groupby(["layer", "token_id"]).head(TOKEN_EXPERTS)
    cols = ["layer", "token_id", "expert", "n", "token_n"]
    got = pd.read_parquet(index / "token_experts.parquet")[cols].sort_values(cols[:3]).reset_index(drop=True)
    assert got.astype("int64").equals(best[cols].sort_values(cols[:3]).reset_index(drop=True).astype("int64"))


def test_the_index_resumes_by_shard_and_grows_with_new_batches(run):
    meta = build_atlas(run)
    before = pd.read_parquet(atlas_dir(run) / "index" / "experts.parquet")
    for b in ("00000", "00002"):  # batches not indexed yet (a killed build, or analysed since)
        shutil.rmtree(atlas_dir(run) / "shards" / b)
    again = build_atlas(run)
    assert again["shards"] == meta["shards"] == [0, 1, 2]
    assert pd.read_parquet(atlas_dir(run) / "index" / "experts.parquet").equals(before)
    assert P.atlas(P.AtlasSpec(), run)["shards"] == [0, 1, 2]  # up to date: nothing rebuilt


def test_the_cli_builds_prints_a_card_and_searches(run, capsys):
    assert main(["atlas", "--run", str(run.path)]) == 0
    assert "3 batches" in capsys.readouterr().out
    top = Atlas.open(run).experts().sort_values("risk_diff").to_dict("records")[-1]
    layer, expert = int(top["layer"]), int(top["expert"])
    assert main(["atlas", "--run", str(run.path), "--layer", str(layer), "--expert", str(expert)]) == 0
    out = capsys.readouterr().out
    assert f"expert {expert} of layer {layer}" in out and "top contexts" in out and "risk difference" in out
    word = Atlas.open(run).card(int(layer), int(expert))["tokens"]["token_id"].iloc[0]
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(run.manifest["model"]).decode([int(word)])
    assert main(["atlas", "--run", str(run.path), "--token", text]) == 0
    assert f"expert {expert:>3}" in capsys.readouterr().out
    assert main(["atlas", "--run", str(run.path), "--layer", "99", "--expert", "0"]) == 2
    assert "MoE layers are" in capsys.readouterr().err


def test_a_run_without_analysis_has_no_atlas(tmp_path, capsys):
    from moe_core.store.run import Run

    empty = Run.create(tmp_path, name="empty")
    with pytest.raises(AtlasError, match="analyze"):
        build_atlas(empty)
    with pytest.raises(AtlasError, match="python -m moe_core atlas"):
        Atlas.open(empty)


def test_the_atlas_page_shows_a_card_a_search_and_the_map(run, monkeypatch):
    from tests.test_app import no_exceptions, open_app

    monkeypatch.setenv("MOE_LAB_RUNS", str(run.path.parent))
    build_atlas(run)
    at = open_app(run, "atlas")
    no_exceptions(at)
    assert [m.label for m in at.metric][:3] == ["On safe tokens", "On unsafe tokens", "Risk difference"]
    assert any("<mark>" in m.value for m in at.markdown)  # a context with its routed token highlighted
    at.text_input(key="atlas_search").input("the").run()
    no_exceptions(at)
    assert "atlas_hits" in [d.key for d in at.dataframe] or any("No expert" in i.value for i in at.info)
    assert at.get("arrow_vega_lite_chart") or at.get("vega_lite_chart")  # the Altair map


def test_what_an_expert_writes_is_its_mean_output_through_the_unembedding(run):
    """Recomputed from the fused expert weights directly (gate_up_proj, down_proj) on the routed tokens."""
    import torch

    from moe_core.analysis.expert_writes import expert_writes
    from moe_core.model.adapter import MoEAdapter, load_model

    model, _ = load_model(run.manifest["model"], device="cpu")
    table = expert_writes(model, run, [0])
    adapter = MoEAdapter.for_model(model)
    layer = adapter.moe_layers[-1]
    experts = adapter.experts(layer)
    captured = []
    hook = experts.register_forward_pre_hook(
        lambda m, a, k: captured.append((a or (k["hidden_states"],))[0]), with_kwargs=True
    )
    router = adapter.router(layer)
    picks = []
    rhook = router.register_forward_hook(lambda m, a, out: picks.append(out[2]))
    with torch.no_grad():
        for sample in load_batch_routing(run.path_for("routing", batch_idx=0)):
            model(torch.as_tensor(sample.token_ids)[None])
    hook.remove()
    rhook.remove()
    h, idx = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]), torch.cat(picks)
    e = int(idx[0, 0])
    x = h[(idx == e).any(dim=-1)]
    gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    out = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e]).mean(dim=0)
    with torch.no_grad():
        logits = model.lm_head(model.model.norm(out))
    expected = logits.topk(len(table[(table["layer"] == layer) & (table["expert"] == e)])).indices.tolist()
    got = table[(table["layer"] == layer) & (table["expert"] == e)].sort_values("rank")["token_id"].tolist()
    assert got == expected
    assert main(["atlas", "--run", str(run.path), "--layer", str(layer), "--expert", str(e)]) == 0


def test_an_expert_card_goes_into_the_present_story_and_the_report(run, monkeypatch):
    from moe_core.eval.report import build_report
    from tests.test_app import no_exceptions, open_app

    monkeypatch.setenv("MOE_LAB_RUNS", str(run.path.parent))
    build_atlas(run)
    at = open_app(run, "atlas")
    layer, expert = at.selectbox(key="atlas_layer").value, at.number_input(key="atlas_expert").value
    next(b for b in at.button if b.key == "atlas_present").click().run()
    no_exceptions(at)
    assert P.present_experts(run) == [(layer, expert)]
    assert next(b for b in at.button if b.key == "atlas_present").label == "Remove from the Present story"
    at.switch_page("pages/7_present.py").run()
    no_exceptions(at)
    assert any(f"expert {expert} of layer {layer}" in c.value for c in at.code)
    html = build_report(run)
    assert "Experts up close" in html and f"expert {expert} of layer {layer}" in html
    P.add_present_expert(run, layer, expert, keep=False)
    assert P.present_experts(run) == [] and "Experts up close" not in build_report(run)
