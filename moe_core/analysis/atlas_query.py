"""Reading the expert atlas: an expert's card, the experts a word fires, a map of all experts.

Queries run with DuckDB over the index's Parquet files (``analysis.atlas``); nothing is written, so no
lease is needed and the app can read while a job extends the index.

    atlas = Atlas.open(run)                 # AtlasError when the run has no index yet
    card = atlas.card(3, 7, tokenizer)      # dict: stats, top tokens, contexts, co-activation, series
    print(card_text(card))
    atlas.search([1234, 99])                # experts ranked by rate and by risk difference
    atlas.map()                             # 2-D PCA of every expert's token profile
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moe_core.analysis.analyse import SCOPE_SPAN
from moe_core.analysis.atlas import INDEX_FILES, AtlasError, atlas_dir, writes_path
from moe_core.model.routing import load_batch_routing
from moe_core.store.atomic import atomic_write_json
from moe_core.store.files import read_json, read_parquet
from moe_core.store.run import Run

WINDOW = 6  # tokens shown either side of a context's routed token
MAP_TOKENS = 512  # the map's token profile: the most frequent tokens over all experts' top tokens


class Atlas:
    """One run's atlas index, queried in process with DuckDB."""

    def __init__(self, run: Run | None, index: Path):
        import duckdb

        self.run, self.index = run, Path(index)
        self.meta = read_json(self.index / "meta.json")
        self._con = duckdb.connect()
        self._lock = threading.Lock()  # one DuckDB connection: one query at a time (app threads)

    @classmethod
    def open(cls, run: Run) -> Atlas:
        index = atlas_dir(run) / "index"
        if not all((index / f).is_file() for f in (*INDEX_FILES, "meta.json")):
            raise AtlasError(
                f"run {run.id} has no expert atlas yet: build it with `python -m moe_core atlas --run {run.path}`"
            )
        return cls(run, index)

    def sql(self, query: str, *params: Any) -> pd.DataFrame:
        with self._lock:
            return self._con.execute(query, list(params)).df()

    def _file(self, name: str) -> str:
        return str(self.index / name).replace("'", "''")

    # -- the table of all experts ----------------------------------------------------------------
    def experts(self) -> pd.DataFrame:
        """Every expert: counts and activation rates on safe / unsafe tokens, mean router weight, risk difference."""
        m = self.meta
        k = m["top_k"]
        return self.sql(
            f"""SELECT layer, expert, safe_n, unsafe_n,
                safe_n / greatest(?, 1) AS safe_rate, unsafe_n / greatest(?, 1) AS unsafe_rate,
                unsafe_n / greatest(?, 1) - safe_n / greatest(?, 1) AS risk_diff,
                CASE WHEN ? THEN weight_sum / greatest(safe_n + unsafe_n, 1) END AS mean_weight
                FROM read_parquet('{self._file("experts.parquet")}') ORDER BY layer, expert""",
            m["safe_tokens"],
            m["unsafe_tokens"],
            m["unsafe_tokens"],
            m["safe_tokens"],
            m["has_weights"],
        ).assign(share_of_tokens=lambda d: (d["safe_n"] + d["unsafe_n"]) / max(1, k * self.tokens))

    @property
    def tokens(self) -> int:
        return int(self.meta["safe_tokens"] + self.meta["unsafe_tokens"])

    # -- one expert --------------------------------------------------------------------------------
    def card(self, layer: int, expert: int, tokenizer: Any = None, top: int = 8) -> dict[str, Any]:
        """Everything the atlas knows of one expert (``tokenizer``: token strings and context text)."""
        layer, expert = int(layer), int(expert)
        E, layers = self.meta["num_experts"], self.meta["moe_layers"]
        if layer not in layers or not 0 <= expert < E:
            raise AtlasError(
                f"no expert {expert} in layer {layer}: this run's MoE layers are {layers}, with {E} experts each"
            )
        row_of = layers.index(layer)
        row = self.experts().query("layer == @layer and expert == @expert").to_dict("records")[0]
        tokens = self.sql(
            f"SELECT token_id, n FROM read_parquet('{self._file('tokens.parquet')}') "
            "WHERE layer = ? AND expert = ? ORDER BY n DESC, token_id",
            layer,
            expert,
        )
        contexts = self.sql(
            f"SELECT * FROM read_parquet('{self._file('contexts.parquet')}') WHERE layer = ? AND expert = ? "
            "ORDER BY weight DESC, batch_idx, in_batch_idx, position",
            layer,
            expert,
        )
        coact = np.load(self.index / "coact.npy", mmap_mode="r")
        card = {
            "layer": layer,
            "expert": expert,
            "stats": row,
            "has_weights": bool(self.meta["has_weights"]),
            "tokens": _with_text(tokens, tokenizer),
            "contexts": self._contexts(contexts, tokenizer),
            "coactive_same_layer": _partners(coact[0, row_of, expert], expert, top),
            "coactive_next_layer": _partners(coact[1, row_of, expert], None, top)
            if row_of + 1 < len(layers)
            else [],
            "next_layer": layers[row_of + 1] if row_of + 1 < len(layers) else None,
            "writes": self._writes(layer, expert, tokenizer),
            "risk_series": self._series(layer, expert),
            "shift": self._shift(layer, expert),
        }
        return card

    def _contexts(self, contexts: pd.DataFrame, tokenizer: Any) -> list[dict[str, Any]]:
        """Each context with its window of tokens (from the batch's routing file), safe and unsafe alike."""
        out = []
        span = SCOPE_SPAN.get(self.meta.get("scope", "generated"))
        cache: dict[int, Any] = {}
        for c in contexts.to_dict("records"):
            item = {k: (v.item() if hasattr(v, "item") else v) for k, v in c.items()}
            path = self.run.path_for("routing", batch_idx=int(c["batch_idx"])) if self.run else None
            if path is not None and path.is_file():
                routing = cache.setdefault(int(c["batch_idx"]), load_batch_routing(path))
                ids = routing[int(c["in_batch_idx"])].select(span).token_ids
                p = int(c["position"])
                left, right = ids[max(0, p - WINDOW) : p], ids[p + 1 : p + 1 + WINDOW]
                item |= {"left": _decode(left, tokenizer), "right": _decode(right, tokenizer)}
            item["token"] = _decode([int(c["token_id"])], tokenizer)
            out.append(item)
        return out

    def _writes(self, layer: int, expert: int, tokenizer: Any) -> pd.DataFrame | None:
        """The tokens the expert's mean output promotes (None where ``atlas --writes`` has not run)."""
        path = writes_path(self.run) if self.run is not None else None
        if path is None or not path.is_file():
            return None
        df = self.sql(
            f"SELECT token_id, logit FROM read_parquet('{str(path).replace(chr(39), chr(39) * 2)}') "
            "WHERE layer = ? AND expert = ? ORDER BY rank",
            layer,
            expert,
        )
        return _with_text(df, tokenizer)

    def _series(self, layer: int, expert: int) -> pd.DataFrame:
        """The expert's risk difference batch by batch (the analysis's per-batch table)."""
        if self.run is None or not self.run.path_for("risk_per_batch").is_file():
            return pd.DataFrame(columns=["batch_idx", "risk_diff"])
        df = read_parquet(self.run.path_for("risk_per_batch"))
        return df[(df["layer"] == layer) & (df["expert"] == expert)][["batch_idx", "risk_diff"]].reset_index(
            drop=True
        )

    def _shift(self, layer: int, expert: int) -> list[dict[str, Any]]:
        """For each trained model whose routing shift was measured: this expert's risk difference before/after."""
        if self.run is None:
            return []
        out = []
        for path in sorted(self.run.path_for("eval").glob("shift_*.parquet")):
            df = read_parquet(path)
            hit = df[(df["layer"] == layer) & (df["expert"] == expert)]
            if len(hit):
                r = hit.iloc[0]
                out.append(
                    {
                        "training": path.stem[len("shift_") :],
                        "before": float(r["risk_diff_before"]),
                        "after": float(r["risk_diff_after"]),
                    }
                )
        return out

    # -- search and map ----------------------------------------------------------------------------
    def search(self, token_ids: list[int], limit: int = 20) -> pd.DataFrame:
        """The experts these tokens are routed to: ``rate`` = share of the tokens' occurrences sent to the
        expert, with its risk difference; ranked by rate (``rank_by_risk`` gives the other order)."""
        if not token_ids:
            return pd.DataFrame(columns=["layer", "expert", "n", "rate", "risk_diff", "rank_by_risk"])
        ids = ", ".join(str(int(t)) for t in sorted(set(token_ids)))
        hits = self.sql(
            f"""SELECT layer, expert, sum(n)::BIGINT AS n, sum(n) / sum(token_n / ?) AS rate
            FROM read_parquet('{self._file("token_experts.parquet")}') WHERE token_id IN ({ids})
            GROUP BY ALL ORDER BY rate DESC, layer, expert LIMIT ?""",
            self.meta["top_k"],
            limit,
        )
        out = hits.merge(self.experts()[["layer", "expert", "risk_diff"]], on=["layer", "expert"])
        out["rank_by_risk"] = out["risk_diff"].rank(ascending=False, method="first").astype(int)
        return out

    def map(self) -> pd.DataFrame:
        """Every expert placed in 2-D by PCA of its token profile (share of its routed tokens per token, over
        the ``MAP_TOKENS`` most common of all experts' top tokens), with its risk difference."""
        tokens = self.sql(
            f"SELECT layer, expert, token_id, n FROM read_parquet('{self._file('tokens.parquet')}')"
        )
        experts = self.experts()
        common = tokens.groupby("token_id")["n"].sum().nlargest(MAP_TOKENS).index
        col = {t: i for i, t in enumerate(common)}
        E = self.meta["num_experts"]
        X = np.zeros((len(experts), len(col)), np.float32)
        t = tokens[tokens["token_id"].isin(col)]
        X[t["layer"].to_numpy() * E + t["expert"].to_numpy(), t["token_id"].map(col).to_numpy()] = t[
            "n"
        ].to_numpy()
        X /= np.maximum(X.sum(axis=1, keepdims=True), 1)
        X -= X.mean(axis=0)
        u, s, _ = np.linalg.svd(X, full_matrices=False)
        xy = u[:, :2] * s[:2] if s.size >= 2 else np.zeros((len(experts), 2))
        return experts.assign(x=xy[:, 0], y=xy[:, 1])


def present_experts(run: Run) -> list[tuple[int, int]]:
    """The (layer, expert) cards a researcher added to the run's Present story and report (atlas page)."""
    path = run.path / "present.draft.json"
    return [(int(a), int(b)) for a, b in read_json(path).get("experts", [])] if path.is_file() else []


def add_present_expert(run: Run, layer: int, expert: int, keep: bool = True) -> list[tuple[int, int]]:
    """Add (``keep``) or remove an expert card of the Present story; draft area, no writer lease."""
    now = [p for p in present_experts(run) if p != (layer, expert)] + ([(layer, expert)] if keep else [])
    atomic_write_json(run.path / "present.draft.json", {"experts": [list(p) for p in now[-12:]]})
    return now[-12:]


def _partners(row: np.ndarray, self_index: int | None, top: int) -> list[dict[str, int]]:
    counts = np.asarray(row, dtype=np.int64).copy()
    if self_index is not None:
        counts[self_index] = 0
    order = np.argsort(-counts, kind="stable")[:top]
    return [{"expert": int(e), "n": int(counts[e])} for e in order if counts[e] > 0]


def _decode(ids: Any, tokenizer: Any) -> str:
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return " ".join(f"#{i}" for i in ids)
    return tokenizer.decode(ids)


def _with_text(tokens: pd.DataFrame, tokenizer: Any) -> pd.DataFrame:
    return tokens.assign(token=[_decode([t], tokenizer) for t in tokens["token_id"]])


def card_text(card: dict[str, Any]) -> str:
    """An expert's card as plain text (``python -m moe_core atlas --layer L --expert E``)."""
    s = card["stats"]
    lines = [
        f"expert {card['expert']} of layer {card['layer']}",
        f"  routed tokens: {s['safe_n']} safe ({s['safe_rate']:.3f} of safe tokens), {s['unsafe_n']} unsafe "
        f"({s['unsafe_rate']:.3f}); risk difference {s['risk_diff']:+.3f}",
        f"  mean router weight: {s['mean_weight']:.3f}"
        if card["has_weights"]
        else "  mean router weight: not recorded (routing without weights, e.g. vLLM's routed experts: counts only)",
        "  top tokens: "
        + ", ".join(f"{t!r} x{n}" for t, n in zip(card["tokens"]["token"], card["tokens"]["n"])),
        "  top contexts (router weight, label: left [token] right):",
    ]
    if card["writes"] is not None:
        lines.insert(
            4,
            "  writes (tokens its mean output promotes): "
            + ", ".join(repr(t) for t in card["writes"]["token"]),
        )
    for c in card["contexts"]:
        lines.append(
            f"    {c['weight']:.3f} {c['label']:>6}: {c.get('left', '')}[{c['token']}]{c.get('right', '')}"
        )
    for what, key in (
        ("same layer", "coactive_same_layer"),
        (f"layer {card['next_layer']}", "coactive_next_layer"),
    ):
        partners = ", ".join(f"{p['expert']} ({p['n']})" for p in card[key]) or "-"
        lines.append(f"  fires with ({what}): {partners}")
    series = card["risk_series"]
    if len(series):
        lines.append("  risk difference per batch: " + " ".join(f"{v:+.2f}" for v in series["risk_diff"]))
    for sh in card["shift"]:
        lines.append(
            f"  after training {sh['training']}: risk difference {sh['before']:+.3f} -> {sh['after']:+.3f}"
        )
    return "\n".join(lines)


def search_text(hits: pd.DataFrame, words: str) -> str:
    """Ranked experts of a search as plain text."""
    if hits.empty:
        return f"no expert in the atlas saw the tokens of {words!r}"
    lines = [f"experts the tokens of {words!r} are routed to (rate: share of their occurrences):"]
    lines += [
        f"  layer {r.layer:>2} expert {r.expert:>3}: rate {r.rate:.2f} ({r.n} tokens), risk difference "
        f"{r.risk_diff:+.3f} (#{r.rank_by_risk} by risk)"
        for r in hits.itertuples()
    ]
    return "\n".join(lines)


def atlas_answer(atlas: Atlas, spec: Any, tokenizer: Any) -> str:
    """What ``python -m moe_core atlas`` prints for ``--layer/--expert`` (a card) and ``--token`` (a search)."""
    out = []
    if spec.layer is not None:
        out.append(card_text(atlas.card(spec.layer, spec.expert, tokenizer)))
    if spec.token is not None:
        if tokenizer is None:
            raise AtlasError("searching by word needs the run's tokenizer (the run's model directory)")
        ids = tokenizer(spec.token, add_special_tokens=False)["input_ids"]
        out.append(search_text(atlas.search(ids, spec.limit), spec.token))
    return "\n\n".join(out)
