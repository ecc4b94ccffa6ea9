"""The state-tree walker the checkpoint's copy, serialise and restore steps share.

Copying a state dict on the training thread, making it portable for pickling and restoring it
walk the same containers: dicts (of their own type), lists, tuples and namedtuples, each rebuilt
with its own type; everything else is a leaf. The three copies of that walk used to disagree on
tuple subclasses: the copy step turned a namedtuple or a ``torch.Size`` into a plain tuple.
"""
from __future__ import annotations

import collections

import numpy as np
import pytest

from flightlog import _checkpoint

torch = pytest.importorskip("torch")

Point = collections.namedtuple("Point", "x n")


def _tree():
    return {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "lst": [np.arange(4.0), (torch.ones(2), 3)],
        "od": collections.OrderedDict(b=torch.zeros(1), a=2),
        "nt": Point(torch.full((2,), 7.0), 2),
        "size": torch.Size([2, 3]),
        "s": "text",
    }


def _same(a, b) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b)
    else:
        assert a == b


def test_copy_keeps_every_container_type_and_detaches_tensors():
    """The training-thread copy rebuilds dicts, lists, tuples and namedtuples with their own types (a
    torch.Size stays a Size), and its tensors and arrays are copies: changing the original leaves it alone."""
    src = _tree()
    got = _checkpoint._clone_tree(src)
    _same(src, got)
    src["w"] += 1
    src["nt"].x.zero_()
    src["lst"][0][:] = -1
    assert got["w"][0, 0].item() == 0.0 and got["nt"].x[0].item() == 7.0 and got["lst"][0][0] == 0.0


def test_serialise_and_restore_round_trip_the_same_tree():
    """A payload serialised (tensors out of band, namedtuples included) and read back equals the original,
    container types and all."""
    src = {"objects": {"state": ("state_dict", _tree())}}
    back = _checkpoint.deserialize(_checkpoint.serialize(src))
    _same(src, back)
