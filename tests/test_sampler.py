"""AnalysisBatchSampler, BatchPreservingSampler (the seed's flat form) and BatchCollator: whole analysis batches,
fixed in-batch order, seeded batch order."""

from __future__ import annotations

import doctest

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from datasets import Dataset
from torch.utils.data import DataLoader

from moe_core.errors import MoELabError
from moe_core.train import sampler as sampler_mod
from moe_core.train.sampler import (
    AnalysisBatchSampler,
    BatchCollator,
    BatchPreservingSampler,
    BatchSamplerError,
)


def structured(sizes, shuffle_rows_within=False):
    """A dataset of analysis batches of the given sizes (batch ids 0..n-1), rows contiguous per batch."""
    batch_idx, in_batch, row_id = [], [], []
    for b, n in enumerate(sizes):
        order = list(range(n))[::-1] if shuffle_rows_within else list(range(n))
        for i in order:
            batch_idx.append(b)
            in_batch.append(i)
            row_id.append(f"{b}:{i}")
    return Dataset.from_dict({"batch_idx": batch_idx, "in_batch_idx": in_batch, "row_id": row_id})


def test_docstring_example_runs():
    assert doctest.testmod(sampler_mod).failed == 0


def test_uneven_batches_are_yielded_whole_and_len_matches():
    ds = structured([16, 10, 16])
    s = AnalysisBatchSampler(ds, shuffle_batches=True, seed=3)
    batches = list(s)
    assert len(batches) == len(s) == 3
    for rows in batches:
        ids = {ds[i]["batch_idx"] for i in rows}
        assert len(ids) == 1, "a yielded batch mixes analysis batches"
        assert [ds[i]["in_batch_idx"] for i in rows] == list(range(len(rows)))
    assert sorted(len(r) for r in batches) == [10, 16, 16]
    assert sorted(i for r in batches for i in r) == list(range(len(ds)))


def test_plain_batch_size_loader_would_mix_batches():
    """The trap the batch sampler avoids: a 10-row batch makes batch_size=16 chunks straddle batches."""
    ds = structured([16, 10, 16])
    plain = DataLoader(ds.with_format("torch", columns=["batch_idx"]), batch_size=16, shuffle=False)
    assert any(len(torch.unique(b["batch_idx"])) > 1 for b in plain)
    ours = DataLoader(
        ds.with_format("torch", columns=["batch_idx"]), batch_sampler=AnalysisBatchSampler(ds, seed=0)
    )
    assert all(len(torch.unique(b["batch_idx"])) == 1 for b in ours)


def test_batch_order_changes_per_epoch_but_in_batch_order_never_does():
    ds = structured(
        [4, 3, 4, 2, 4, 4, 3, 4], shuffle_rows_within=True
    )  # rows stored in reverse in-batch order
    s = AnalysisBatchSampler(ds, seed=11)
    epochs = []
    for epoch in range(4):
        s.set_epoch(epoch)
        batches = list(s)
        epochs.append([ds[r[0]]["batch_idx"] for r in batches])
        for rows in batches:
            assert [ds[i]["in_batch_idx"] for i in rows] == list(range(len(rows)))
    assert all(sorted(o) == list(range(8)) for o in epochs)
    assert len({tuple(o) for o in epochs}) > 1, "batch order never changed between epochs"
    # same seed and epoch -> same order on every process
    twin = AnalysisBatchSampler(ds, seed=11)
    twin.set_epoch(2)
    s.set_epoch(2)
    assert list(twin) == list(s)
    assert AnalysisBatchSampler(ds, shuffle_batches=False).order(5) == list(range(8))


def test_accelerate_shards_keep_whole_batches_and_equal_step_counts():
    """accelerate's BatchSamplerShard with our sampler: ranks get whole batches, the last round padded by whole ones."""
    ds = structured([16, 10, 16])
    s = AnalysisBatchSampler(ds, seed=0)
    per_rank = [
        list(BatchSamplerShard(s, num_processes=2, process_index=r, split_batches=False, even_batches=True))
        for r in range(2)
    ]
    whole = {tuple(rows) for rows in s}
    assert len(per_rank[0]) == len(per_rank[1]) == len(BatchSamplerShard(s, num_processes=2, process_index=0))
    for rank_batches in per_rank:
        assert all(tuple(rows) in whole for rows in rank_batches)
    assert {tuple(r) for rb in per_rank for r in rb} == whole


def test_dataset_rows_need_not_be_contiguous_with_in_batch_idx():
    ds = Dataset.from_dict({"batch_idx": [0, 1, 0, 1], "in_batch_idx": [0, 0, 1, 1]})
    assert list(AnalysisBatchSampler(ds, shuffle_batches=False)) == [[0, 2], [1, 3]]


@pytest.mark.parametrize(
    "source, match",
    [
        ([0, 1, 0], "not contiguous"),
        ({"batch_idx": [0, 0], "in_batch_idx": [1, 1]}, "in_batch_idx 1"),
        (Dataset.from_dict({"x": [1, 2]}), "no 'batch_idx' column"),
        ([], "non-empty"),
        ([0.5, 1.5], "integers"),
    ],
)
def test_ill_defined_structure_raises(source, match):
    with pytest.raises(BatchSamplerError, match=match):
        AnalysisBatchSampler(source)


def test_collator_pads_and_keeps_structure_columns():
    feats = [
        {
            "input_ids": [5, 6, 7],
            "attention_mask": [1, 1, 1],
            "labels": [-100, 6, 7],
            "batch_idx": 4,
            "in_batch_idx": 0,
            "label": "safe",
            "extra": "x",
        },
        {
            "input_ids": [5, 6],
            "attention_mask": [1, 1],
            "labels": [-100, 6],
            "batch_idx": 4,
            "in_batch_idx": 1,
            "label": 1,
        },
    ]
    out = BatchCollator(pad_token_id=0)(feats)
    assert set(out) == {"input_ids", "attention_mask", "labels", "batch_idx", "in_batch_idx", "label"}
    assert out["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [-100, 6, -100]]
    assert out["batch_idx"].tolist() == [4, 4] and out["in_batch_idx"].tolist() == [0, 1]
    assert out["label"].tolist() == [0, 1] and out["label"].dtype == torch.long
    left = BatchCollator(pad_token_id=9, padding_side="left", pad_to_multiple_of=4)(feats)
    assert left["input_ids"].tolist() == [[9, 5, 6, 7], [9, 9, 5, 6]]
    with pytest.raises(ValueError, match="safe"):
        BatchCollator(pad_token_id=0)([{**feats[0], "label": "harmful"}])


# -- the seed's flat sampler -------------------------------------------------------------
def test_flat_sampler_positional_meanings_are_the_seeds():
    ds = structured([4, 4, 4, 4, 4, 4])
    on = BatchPreservingSampler(ds, 4)  # (dataset, batch_size): shuffling on
    assert on.batch_size == 4 and on.shuffle_batches is True
    off = BatchPreservingSampler(ds, 4, False)  # (dataset, batch_size, False): no shuffling
    assert off.shuffle_batches is False and list(off) == list(range(len(ds)))
    assert len(on) == len(off) == len(ds)  # len() counts rows, as the seed's Sampler
    orders = set()
    for epoch in range(4):
        on.set_epoch(epoch)
        flat = list(on)
        assert sorted(flat) == list(range(len(ds)))
        chunks = [flat[i : i + 4] for i in range(0, len(flat), 4)]
        assert all(len({ds[i]["batch_idx"] for i in c}) == 1 for c in chunks)
        orders.add(tuple(ds[c[0]]["batch_idx"] for c in chunks))
    assert len(orders) > 1, "batch order never changed between epochs"
    with pytest.raises(TypeError):
        BatchPreservingSampler(ds, 4, True, 7)  # extras are keyword-only
    assert BatchPreservingSampler(ds, 4, seed=7).seed == 7


def test_flat_sampler_batch_groups_follow_in_batch_idx():
    ds = structured([3, 3], shuffle_rows_within=True)  # rows stored in reverse in-batch order
    s = BatchPreservingSampler(ds, 3, shuffle_batches=False)
    assert s.batch_groups == {0: [2, 1, 0], 1: [5, 4, 3]}
    assert list(s) == [2, 1, 0, 5, 4, 3]


@pytest.mark.parametrize(
    "sizes, batch_size, match",
    [
        ([4, 5, 4], 4, "batch 1 has 5 rows but batch_size=4: it cannot fit"),
        ([4, 3, 4], 4, "batch 1 has 3 rows, fewer than batch_size=4.*batch_sampler"),
    ],
)
def test_flat_sampler_rejects_batches_that_do_not_fill_the_loader_batch(sizes, batch_size, match):
    with pytest.raises(BatchSamplerError, match=match) as e:
        BatchPreservingSampler(structured(sizes), batch_size)
    assert isinstance(e.value, MoELabError) and isinstance(e.value, ValueError)


def test_flat_sampler_gives_access_to_the_batch_sampler_for_uneven_batches():
    ds = structured([4, 3, 4])
    s = BatchPreservingSampler(ds, shuffle_batches=True, seed=2)  # no batch_size: inspect / switch form
    bs = s.batch_sampler()
    assert isinstance(bs, AnalysisBatchSampler) and bs.batch_size is None and s.max_batch_size == 4
    s.set_epoch(3)
    assert [i for rows in bs for i in rows] == list(s)
    loader = DataLoader(ds.with_format("torch", columns=["batch_idx"]), batch_sampler=bs)
    assert [len(b["batch_idx"]) for b in loader] == [
        bs.batch_sizes[b] for b in (bs.batch_ids[i] for i in bs.order())
    ]
    with pytest.raises(BatchSamplerError):
        AnalysisBatchSampler(ds, 16)  # the old trap: a batch size where shuffle_batches goes
    with pytest.raises(BatchSamplerError, match="positive int"):
        BatchPreservingSampler(ds, True)  # the old (dataset, shuffle_batches) positional form
