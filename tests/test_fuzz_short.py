"""A short run of every fuzz harness (``make fuzz`` runs a million inputs each).

Only TorchkeepError subclasses may escape a parser; no input may hang or run code.
"""

from __future__ import annotations

import contextlib
import pickle

import pytest
from fuzz.harness import HARNESSES, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchkeep.errors import TorchkeepError
from torchkeep.safety.unpickle import safe_pickle_load

EXECUTIONS = 2000


@pytest.mark.parametrize("parser", sorted(HARNESSES))
def test_parser_survives_mutated_inputs(parser: str) -> None:
    tally = run(parser, EXECUTIONS, seed=1)
    assert tally.executions == EXECUTIONS
    assert tally.untyped == 0, tally.examples
    assert tally.hangs == 0, tally.examples
    assert tally.markers == 0, tally.examples


_OPS = st.sampled_from(
    [
        pickle.MARK,
        pickle.EMPTY_LIST,
        pickle.EMPTY_DICT,
        pickle.EMPTY_TUPLE,
        pickle.NONE,
        pickle.POP,
        pickle.APPEND,
        pickle.APPENDS,
        pickle.SETITEM,
        pickle.SETITEMS,
        pickle.TUPLE,
        pickle.TUPLE1,
        pickle.TUPLE2,
        pickle.REDUCE,
        pickle.BUILD,
        pickle.NEWOBJ,
        pickle.STACK_GLOBAL,
        pickle.MEMOIZE,
        pickle.BINGET + b"\x00",
        pickle.BINPUT + b"\x00",
        pickle.BININT1 + b"\x07",
        pickle.SHORT_BINUNICODE + b"\x02os",
        pickle.SHORT_BINUNICODE + b"\x06system",
        pickle.GLOBAL + b"collections\nOrderedDict\n",
        pickle.GLOBAL + b"torch\nSize\n",
        pickle.GLOBAL + b"builtins\nset\n",
        pickle.GLOBAL + b"argparse\nNamespace\n",
    ]
)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_OPS, max_size=30))
def test_random_opcode_streams_are_refused_or_plain(ops: list[bytes]) -> None:
    data = pickle.PROTO + b"\x04" + b"".join(ops) + pickle.STOP
    with contextlib.suppress(TorchkeepError):
        safe_pickle_load(data, path="fuzz.pkl")
