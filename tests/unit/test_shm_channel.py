"""The shared-memory channel between pipeline stages: items arrive intact and in order,
slots are reused only after release, and items too big for a slot still get through."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch

from distinfer.worker.shm_channel import ShmChannel


@pytest.fixture()
def channel() -> ShmChannel:
    return ShmChannel(multiprocessing.get_context("spawn"), slot_bytes=4096, slots=2)


def test_nested_item_round_trip(channel: ShmChannel) -> None:
    item = {
        "hidden": torch.randn(3, 5),
        "mask": torch.ones(3, 7, dtype=torch.int64),
        "extra": (np.arange(4, dtype=np.float16), [torch.tensor([True, False])], "tag", 7),
    }
    channel.send(item)
    ok, got = channel.receive(copy=True)
    assert ok
    torch.testing.assert_close(got["hidden"], item["hidden"])
    torch.testing.assert_close(got["mask"], item["mask"])
    np.testing.assert_array_equal(got["extra"][0], item["extra"][0])
    assert got["extra"][1][0].tolist() == [True, False]
    assert got["extra"][2:] == ("tag", 7)


def test_items_arrive_in_order_and_end(channel: ShmChannel) -> None:
    sent = [torch.full((2, 2), float(i)) for i in range(2)]
    for t in sent:
        channel.send(t)
    for t in sent:
        ok, got = channel.receive()
        assert ok
        torch.testing.assert_close(got, t)
    channel.release()
    channel.release()
    channel.close_sender()
    assert channel.receive() == (False, None)


def test_sender_waits_for_a_released_slot(channel: ShmChannel) -> None:
    channel.send(torch.zeros(4))
    channel.send(torch.ones(4))
    calls = []

    def check() -> None:
        calls.append(1)
        raise RuntimeError("receiver gone")

    # Both slots are taken: the third send waits and consults `check`.
    with pytest.raises(RuntimeError, match="receiver gone"):
        channel.send(torch.ones(4), check)
    assert calls
    assert channel.receive()[1].tolist() == [0.0] * 4
    channel.release()
    channel.send(torch.full((4,), 2.0))  # a slot is free again


def test_oversize_and_bfloat16_items_go_whole(channel: ShmChannel) -> None:
    big = torch.randn(64, 64)  # 16 KiB > 4 KiB slot
    channel.send(big)
    half = torch.randn(3).to(torch.bfloat16)
    channel.send(half)
    torch.testing.assert_close(channel.receive()[1], big)
    torch.testing.assert_close(channel.receive()[1], half)
