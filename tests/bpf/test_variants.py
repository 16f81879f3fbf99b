"""Every variant of the template renders, compiles and passes the verifier on this kernel,
and the userspace view of the pinned maps matches what BCC derives from the C source."""

import ctypes

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import (
    _bpfsys,
    _compile,
    _layout,
    _render,
)
from tests.lib import amqp
from tests.lib.dataplane import TC_ACT_OK, TC_ACT_SHOT, Dataplane, Flow

pytestmark = pytest.mark.bpf

# The verifier gives up at 1,000,000 instructions processed (BPF_COMPLEXITY_LIMIT_INSNS).
# Every variant must stay well below it, so that a kernel whose verifier explores a little
# more, or the next change to the walk, still loads: a change that crosses this budget
# needs a look at why, not a higher number.
VERIFIER_BUDGET = 800_000


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
@pytest.mark.parametrize("l2", _render.L2_KINDS)
@pytest.mark.parametrize("action", _render.ACTIONS)
@pytest.mark.parametrize(
    "limit, port, frame_max",
    [
        (0, 1, 4096),
        (65535, 65535, 1 << 28),
    ],
)
def test_variant_loads_and_limits(action, l2, limit, port, frame_max, strict):
    dp = Dataplane(limit=limit, action=action, port=port, l2=l2, frame_max=frame_max, strict=strict)
    try:
        verified = _bpfsys.prog_info(dp.function.fd)["verified_insns"]
        print("verified_insns %s: %d" % (dp.config, verified))
        assert verified < VERIFIER_BUDGET
        # The continuation walks the same loop from another start, and its count moves on
        # its own (a change that helped one program has cost the other 100k): the module
        # loads both, and either over the limit fails the deploy.
        more = dp.bpf.funcs[_compile.CONTINUATION_FUNCTION.encode()]
        verified = _bpfsys.prog_info(more.fd)["verified_insns"]
        print("verified_insns continuation %s: %d" % (dp.config, verified))
        assert verified < VERIFIER_BUDGET
        # The egress program is its own continuation (walk_more's egress slot): the same
        # budget, as the module loads it too.
        verified = _bpfsys.prog_info(dp.egress.fd)["verified_insns"]
        print("verified_insns egress %s: %d" % (dp.config, verified))
        assert verified < VERIFIER_BUDGET
        flow = Flow(dp, l2=(l2 == "ethernet"))
        assert flow.handshake() == TC_ACT_OK
        verdict = flow.send(amqp.consume(1))
        if limit == 0 and action == "drop":
            assert verdict == TC_ACT_SHOT
        else:
            assert verdict == TC_ACT_OK
        assert dp.counters()["consumes_refused"] == (1 if limit == 0 else 0)
    finally:
        dp.close()


@pytest.mark.parametrize(
    "table, key_type, value_type",
    [
        ("conns", _layout.ConnKey, _layout.ConnState),
        ("channels", _layout.ChanKey, _layout.ChanState),
        ("counters", ctypes.c_uint32, _layout.Counters),
        ("config", ctypes.c_uint32, _layout.DeployedConfig),
        ("refusals", ctypes.c_uint32, _layout.RefusalLog),
        ("egress", _layout.ConnKey, _layout.EgressState),
        ("egress_slots", ctypes.c_uint32, _layout.EgressSlot),
        ("tag_key", ctypes.c_uint32, _layout.TagKey),
    ],
)
def test_userspace_layout_matches_the_c_structs(dataplanes, table, key_type, value_type):
    bcc_table = dataplanes(limit=3, action="drop").bpf[table.encode()]
    # A per-CPU table's Leaf is the array of all CPUs' values; sLeaf is one of them.
    leaf = getattr(bcc_table, "sLeaf", bcc_table.Leaf)
    for ours, theirs in ((key_type, bcc_table.Key), (value_type, leaf)):
        assert ctypes.sizeof(ours) == ctypes.sizeof(theirs)
        if hasattr(ours, "_fields_"):
            assert [name for name, _t in ours._fields_] == [
                name for name, _t in theirs._fields_ if not name.startswith("__pad")
            ]


def test_maps_are_pinned_and_reused_by_a_reload(dataplanes):
    dp = dataplanes(limit=3, action="drop")
    flow = Flow(dp)
    flow.handshake()
    flow.send(amqp.consume(1) * 2)
    # A second program at the same pins (a changed limit) sees the same connections.
    source = _render.render(
        _render.validate(5672, 5, "drop", "ethernet", dp.pin_dir), _render.read_template()
    )
    from ansible_collections.rabbitguard.limiter.plugins.module_utils import _compile

    bpf, function = _compile.compile_and_load(source, dp.pin_dir)
    first_function = dp.function
    try:
        dp.function = function
        assert flow.send(amqp.consume(1) * 3) == TC_ACT_OK  # 5 allowed now
        assert flow.send(amqp.consume(1)) == TC_ACT_SHOT
        assert flow.consumers() == 5
    finally:
        # Its continuation back in walk_more too (a consume's tag step runs there).
        dp.function = first_function
        _compile.fill_continuation(dp.pin_dir, _compile.load_continuation(dp.bpf).fd)
        _compile.fill_egress_slot(dp.pin_dir, dp.egress.fd)
        bpf.cleanup()
