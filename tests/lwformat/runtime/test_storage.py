"""Packed storage: every slot's views are contiguous and sit where the plan put them."""

from __future__ import annotations

import torch

from lwformat.runtime.storage import Place, slot_views

CPU = torch.device("cpu")


def test_views_sit_at_their_offsets_even_in_a_buffer_that_does_not_start_its_storage():
    shapes = [("s0", "lora_A", (2, 3)), ("s0", "lora_B", (4, 2)), ("s1", "w", (2, 1, 3)), ("s1", "e", (0, 3)), ("s2", "g", (5,))]
    places, offset = [], 0
    for slot, name, shape in shapes:
        places.append(Place(slot, name, shape, torch.float32, CPU, offset))
        offset += torch.Size(shape).numel()
    storage = torch.arange(7 + offset, dtype=torch.float32)
    buffer = storage[7:]  # (offset,) a view that starts 7 elements into its storage
    views = slot_views({(torch.float32, CPU): buffer}, places)
    for place in places:
        got = views[place.slot][place.name]
        want = buffer[place.offset : place.offset + place.numel].view(place.shape)
        assert got.shape == want.shape and got.is_contiguous() and torch.equal(got, want)
        assert got.numel() == 0 or got.data_ptr() == want.data_ptr()
    views["s0"]["lora_B"].fill_(-1)  # views write through to the buffer
    assert torch.equal(buffer[6:14], torch.full((8,), -1.0))
