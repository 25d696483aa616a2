"""Batch-size buckets: parsing, clipping to the largest batch, padding a batch to its bucket."""

from __future__ import annotations

import pytest
import torch

from app.engine.buckets import BatchBuckets, pad_rows, parse_buckets


def test_buckets_are_sorted_deduplicated_and_clipped_with_max_batch_size_always_included() -> None:
    assert parse_buckets(" 4,1,2,2 ") == [1, 2, 4]
    assert BatchBuckets.from_setting("1,2,4,8,16,32,64", 8).sizes == (1, 2, 4, 8)
    assert BatchBuckets.from_setting("1,2,4,8,16,32,64", 12).sizes == (1, 2, 4, 8, 12)
    assert BatchBuckets.from_setting("16,32", 8).sizes == (8,)


@pytest.mark.parametrize("text", ["", "0,1", "a,b", "1,,x"])
def test_bad_bucket_lists_are_refused_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match="batch size"):
        parse_buckets(text)


def test_a_batch_runs_as_the_smallest_bucket_holding_it_only_when_padding() -> None:
    padded = BatchBuckets((1, 2, 4, 8), pad=True)
    assert [padded.bucket_for(n) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 9]
    unpadded = padded.with_padding(False)
    assert [unpadded.bucket_for(n) for n in (1, 3, 5)] == [1, 3, 5]
    with pytest.raises(ValueError):
        padded.bucket_for(0)


def test_pad_rows_appends_filled_rows_and_keeps_the_original_ones() -> None:
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    padded = pad_rows(x, 4, value=-1)
    assert padded.shape == (4, 3)
    assert torch.equal(padded[:2], x) and bool((padded[2:] == -1).all())
    assert pad_rows(x, 2) is x
