"""The classifier, packet by packet: crafted segments through BPF_PROG_TEST_RUN on the real
rendered and compiled program, asserting its verdicts and what it left in its maps."""

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _layout, _render
from tests.lib import amqp, packets
from tests.lib.dataplane import TC_ACT_OK, TC_ACT_SHOT, Flow, opened

pytestmark = pytest.mark.bpf


# -- the limit ---------------------------------------------------------------------------


def test_consumes_up_to_the_limit_pass_and_are_counted(dp):
    flow = opened(dp)
    for expected in (1, 2, 3):
        assert flow.send(amqp.consume(1)) == TC_ACT_OK
        assert flow.consumers() == expected
    assert flow.channels() == {1: 3}
    counters = dp.counters()
    assert counters["consumes_allowed"] == 3
    assert counters["consumes_refused"] == 0
    assert counters["conns_tracked"] == 1


def test_consume_over_the_limit_is_dropped(dp):
    flow = opened(dp)
    for _i in range(3):
        flow.send(amqp.consume(1))
    assert flow.send(amqp.consume(2)) == TC_ACT_SHOT
    assert flow.consumers() == 3
    assert flow.channels() == {1: 3}
    assert dp.counters()["consumes_refused"] == 1
    assert flow.state().refused == 1


def test_limit_zero_refuses_the_first_consume(dataplanes):
    dp = dataplanes(limit=0, action="drop")
    flow = opened(dp)
    assert flow.send(amqp.channel_open(1)) == TC_ACT_OK
    assert flow.send(amqp.consume(1)) == TC_ACT_SHOT
    assert flow.consumers() == 0


def test_refused_consume_is_refused_again_when_retransmitted(dp):
    flow = opened(dp)
    for _i in range(3):
        flow.send(amqp.consume(1))
    seq = flow.seq
    for _i in range(3):
        assert flow.send(amqp.consume(1), seq=seq) == TC_ACT_SHOT
    assert flow.consumers() == 3
    assert dp.counters()["consumes_refused"] == 3


def test_other_frames_pass_at_the_limit(dp):
    flow = opened(dp)
    for _i in range(3):
        flow.send(amqp.consume(1))
    assert flow.send(amqp.publish(1, b"hello")) == TC_ACT_OK
    assert flow.send(amqp.heartbeat()) == TC_ACT_OK
    assert flow.send(amqp.method(1, amqp.BASIC_ACK, b"\x00" * 9)) == TC_ACT_OK
    assert flow.consumers() == 3


def test_connections_are_counted_separately(dp):
    first, second = opened(dp, client_port=40001), opened(dp, client_port=40002)
    for _i in range(3):
        assert first.send(amqp.consume(1)) == TC_ACT_OK
    assert second.send(amqp.consume(1)) == TC_ACT_OK
    assert first.send(amqp.consume(1)) == TC_ACT_SHOT
    assert (first.consumers(), second.consumers()) == (3, 1)


def test_consumers_on_several_channels_add_up(dp):
    flow = opened(dp)
    for channel in (1, 2, 7):
        assert flow.send(amqp.consume(channel)) == TC_ACT_OK
    assert flow.channels() == {1: 1, 2: 1, 7: 1}
    assert flow.send(amqp.consume(9)) == TC_ACT_SHOT


# -- what frees a slot -------------------------------------------------------------------


def test_cancel_frees_a_slot(dp):
    flow = opened(dp)
    for _i in range(3):
        flow.send(amqp.consume(1))
    assert flow.send(amqp.cancel(1)) == TC_ACT_OK
    assert flow.consumers() == 2
    assert flow.send(amqp.consume(1)) == TC_ACT_OK
    assert dp.counters()["cancels"] == 1


def test_cancel_never_goes_below_zero(dp):
    flow = opened(dp)
    flow.send(amqp.consume(1))
    assert flow.send(amqp.cancel(2) + amqp.cancel(2) + amqp.cancel(1) + amqp.cancel(1)) == 0
    assert flow.consumers() == 0
    assert flow.channels() == {}


@pytest.mark.parametrize("closing", [amqp.channel_close, amqp.channel_close_ok])
def test_closing_a_channel_frees_its_consumers(dp, closing):
    flow = opened(dp)
    flow.send(amqp.consume(1) + amqp.consume(1) + amqp.consume(2))
    assert flow.send(closing(1)) == TC_ACT_OK
    assert flow.channels() == {2: 1}
    assert flow.consumers() == 1
    assert flow.send(amqp.consume(1) + amqp.consume(1)) == TC_ACT_OK
    assert dp.counters()["channel_closes"] == 1


@pytest.mark.parametrize("closing", [amqp.connection_close, amqp.connection_close_ok])
def test_connection_close_forgets_the_connection(dp, closing):
    flow = opened(dp)
    flow.send(amqp.consume(1))
    assert flow.send(closing()) == TC_ACT_OK
    assert flow.state().ended == _layout.ENDED_CLOSED
    assert flow.state().consumers == 0
    assert dp.counters()["conns_forgotten"] == 1
    # Its last bytes and retransmissions pass untouched and start nothing new.
    assert flow.send(amqp.connection_close_ok() + amqp.consume(1) * 5) == TC_ACT_OK
    assert flow.state().ended == _layout.ENDED_CLOSED
    assert dp.counters()["resyncs"] == 0
    assert flow.send(flags=packets.FIN | packets.ACK) == TC_ACT_OK
    assert flow.state() is None
    assert dp.counters()["conns_forgotten"] == 1


@pytest.mark.parametrize(
    "flags", [packets.FIN | packets.ACK, packets.RST, packets.RST | packets.ACK]
)
def test_fin_and_rst_forget_the_connection(dp, flags):
    flow = opened(dp)
    flow.send(amqp.consume(1))
    assert flow.send(flags=flags) == TC_ACT_OK
    assert flow.state() is None


def test_fin_with_data_applies_the_data_then_forgets(dp):
    flow = opened(dp)
    assert flow.send(amqp.consume(1), flags=packets.FIN | packets.ACK | packets.PSH) == 0
    assert flow.state() is None
    assert dp.counters()["consumes_allowed"] == 1


def test_reused_client_port_starts_from_zero(dp):
    flow = opened(dp)
    for _i in range(3):
        flow.send(amqp.consume(1))
    again = opened(dp, isn=900000)  # same 4-tuple: SYN, then a new protocol header
    assert again.consumers() == 0
    assert again.channels() == {}
    assert again.send(amqp.consume(1)) == TC_ACT_OK


def test_new_protocol_header_without_syn_does_not_start_from_zero(dp):
    """Outside the stream, without a SYN, a protocol header is bytes like any other (a
    client could send one to forget its consumers): only a SYN starts the 4-tuple anew."""
    flow = opened(dp)
    for _i in range(3):
        flow.send(amqp.consume(1))
    reused = Flow(dp, isn=5000000)
    assert reused.send(amqp.PROTOCOL_HEADER) == TC_ACT_OK
    assert reused.consumers() == 3
    assert flow.send(amqp.consume(1)) == TC_ACT_SHOT


# -- the byte stream ---------------------------------------------------------------------


def test_pipelined_consumes_in_one_segment_are_all_counted(dp):
    flow = opened(dp)
    assert flow.send(amqp.consume(1) + amqp.consume(2) + amqp.consume(3)) == TC_ACT_OK
    assert flow.channels() == {1: 1, 2: 1, 3: 1}


def test_a_refused_segment_commits_nothing(dp):
    flow = opened(dp)
    for _i in range(3):
        flow.send(amqp.consume(1))
    # close frees three slots, then four consumes: the fourth is over the limit.
    segment = amqp.channel_close(1) + amqp.cancel(1) + amqp.consume(2) * 4
    assert flow.send(segment) == TC_ACT_SHOT
    assert flow.channels() == {1: 3}
    assert flow.consumers() == 3
    counters = dp.counters()
    assert (counters["channel_closes"], counters["cancels"]) == (0, 0)
    assert counters["consumes_allowed"] == 3
    # The same bytes, cut so that the fourth consume comes later, pass up to it.
    assert flow.send(segment[: -len(amqp.consume(2))]) == TC_ACT_OK
    assert flow.channels() == {2: 3}


def test_sixteen_pipelined_frames(dataplanes):
    dp = dataplanes(limit=20, action="drop")
    flow = opened(dp)
    frames = (amqp.heartbeat() + amqp.consume(1) + amqp.publish(1, b"x" * 10)) * 4
    frames += amqp.consume(2) * 4
    assert flow.send(frames) == TC_ACT_OK
    assert flow.channels() == {1: 4, 2: 4}


def test_body_bytes_that_look_like_a_consume_are_never_counted(dp):
    flow = opened(dp)
    body = amqp.consume_lookalike_body() * 50
    message = amqp.publish(1, body)
    # Cut so that segments start inside the body right on a consume look-alike.
    header_len = len(message) - len(body) - 1
    cuts = [header_len] + [header_len + i * len(amqp.consume(1)) for i in range(1, 20)]
    start = 0
    for cut in cuts + [len(message)]:
        assert flow.send(message[start:cut]) == TC_ACT_OK
        start = cut
    assert flow.consumers() == 0
    assert flow.state().synced == 1
    assert flow.send(amqp.consume(1)) == TC_ACT_OK
    assert flow.channels() == {1: 1}


def test_frame_spanning_many_segments_is_skipped_by_position(dp):
    flow = opened(dp)
    message = amqp.publish(1, amqp.consume_lookalike_body() * 2000) + amqp.consume(3)
    for start in range(0, len(message), 1448):
        assert flow.send(message[start : start + 1448]) == TC_ACT_OK
    assert flow.channels() == {3: 1}


@pytest.mark.parametrize("cut", range(1, 11))
def test_method_header_straddling_two_segments_is_recognised(dp, cut):
    flow = opened(dp)
    for _i in range(3):
        flow.send(amqp.consume(1))
    flow.send(amqp.cancel(1))
    consume = amqp.consume(4)
    assert flow.send(consume[:cut]) == TC_ACT_OK
    assert flow.state().stash_len == cut
    assert flow.send(consume[cut:]) == TC_ACT_OK
    assert flow.channels() == {1: 2, 4: 1}
    # Over the limit now: the completing segment is the one refused, again and again.
    seq = flow.seq
    assert flow.send(consume[:cut]) == TC_ACT_OK
    assert flow.send(consume[cut:]) == TC_ACT_SHOT
    assert flow.send(consume[cut:], seq=seq + cut) == TC_ACT_SHOT
    assert flow.consumers() == 3


def test_header_cut_three_ways(dp):
    flow = opened(dp)
    consume = amqp.consume(5)
    for part in (consume[:2], consume[2:6], consume[6:]):
        assert flow.send(part) == TC_ACT_OK
    assert flow.channels() == {5: 1}


def test_retransmitted_consume_is_not_counted_twice(dp):
    flow = opened(dp)
    seq = flow.seq
    segment = amqp.consume(1) + amqp.consume(1)
    assert flow.send(segment) == TC_ACT_OK
    assert flow.send(segment, seq=seq) == TC_ACT_OK
    assert flow.send(segment[5:], seq=seq + 5) == TC_ACT_OK
    assert flow.consumers() == 2


def test_retransmission_coalesced_with_new_bytes_counts_only_the_new(dp):
    flow = opened(dp)
    seq = flow.seq
    first = amqp.consume(1)
    flow.send(first)
    assert flow.send(first + amqp.consume(2), seq=seq) == TC_ACT_OK
    assert flow.channels() == {1: 1, 2: 1}


def test_retransmission_of_a_stashed_header(dp):
    flow = opened(dp)
    seq = flow.seq
    consume = amqp.consume(1)
    flow.send(consume[:4])
    assert flow.send(consume[:6], seq=seq) == TC_ACT_OK  # resent, a little longer
    assert flow.state().stash_len == 6
    assert flow.send(consume[6:], seq=seq + 6) == TC_ACT_OK
    assert flow.channels() == {1: 1}


def test_heartbeats_are_walked(dp):
    flow = opened(dp)
    assert flow.send(amqp.heartbeat() * 10 + amqp.consume(1)) == TC_ACT_OK
    assert flow.channels() == {1: 1}


# -- joining, losing and regaining the stream ----------------------------------------------


def test_connection_older_than_the_limiter_is_picked_up_at_a_frame(dp):
    flow = Flow(dp, isn=777)  # no SYN, no protocol header seen
    assert flow.send(amqp.consume(1) + amqp.consume(1)) == TC_ACT_OK
    assert flow.consumers() == 2
    assert dp.counters()["resyncs"] == 1


def test_connection_older_than_the_limiter_waits_for_a_frame_boundary(dp):
    flow = Flow(dp, isn=777)
    message = amqp.publish(1, amqp.consume_lookalike_body() * 40)
    assert flow.send(message[30:700]) == TC_ACT_OK  # mid-frame: not understood
    assert flow.state() is None
    assert dp.counters()["unparsed"] == 1
    assert flow.send(amqp.consume(1)) == TC_ACT_OK  # starts on a frame
    assert flow.channels() == {1: 1}


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda: amqp.heartbeat()[:-1] + b"\x00", id="bad-end-octet"),
        pytest.param(lambda: b"\x01\x00\x01\x7f\xff\xff\xff" + b"\x00" * 20, id="absurd-size"),
        pytest.param(lambda: b"\x05\x00\x01\x00\x00\x00\x04" + b"\x00" * 5, id="unknown-type"),
        pytest.param(lambda: b"\x01\x00\x01\x00\x00\x00\x02\x00\x3c\xce", id="method-too-short"),
    ],
)
def test_malformed_stream_passes_and_is_unparsed_until_a_boundary(dp, bad):
    flow = opened(dp)
    flow.send(amqp.consume(1))
    assert flow.send(bad() + amqp.consume(1)) == TC_ACT_OK
    assert flow.state().synced == 0
    assert dp.counters()["unparsed"] == 1
    assert flow.send(b"\x00garbage" * 4) == TC_ACT_OK  # still lost: passes
    assert flow.send(amqp.consume(2)) == TC_ACT_OK  # a boundary: tracked again
    assert flow.state().synced == 1
    assert flow.channels() == {1: 1, 2: 1}
    assert dp.counters()["resyncs"] == 1


def test_gap_in_the_stream_waits_for_the_hole_to_fill(dp):
    """A segment beyond a hole passes unwalked (it never rejoins the stream at a frame of
    its own); the retransmission that fills the hole is walked from the position."""
    flow = opened(dp)
    flow.send(amqp.consume(1))
    hole = flow.seq
    lost = amqp.publish(1, b"x" * 100)
    flow.seq += len(lost)  # that segment has not reached us yet
    assert flow.send(amqp.consume(2)) == TC_ACT_OK
    assert flow.channels() == {1: 1}
    assert dp.counters()["resyncs"] == 0
    assert flow.send(lost, seq=hole) == TC_ACT_OK
    assert flow.state().synced == 0  # the consume beyond the hole went by unwalked
    assert flow.consumers() == 0


# The walk's whole bound (34 programs of MAX_FRAMES frames: tests/bpf/test_frame_bound.py)
# is out of BPF_PROG_TEST_RUN's reach with the real MAX_FRAMES; these variants walk 8 frames
# per program.
SMALL_BOUND = 8
WALK_BOUND = 34 * SMALL_BOUND


def test_more_frames_than_the_walk_bound_fail_open(dataplanes):
    dp = dataplanes(limit=3, action="drop", max_frames=SMALL_BOUND)
    flow = opened(dp)
    many = amqp.heartbeat() * (WALK_BOUND + 1) + amqp.consume(1)
    assert flow.send(many) == TC_ACT_OK
    assert flow.state().synced == 0
    assert dp.counters()["unparsed"] == 1
    assert flow.send(amqp.consume(1)) == TC_ACT_OK  # resynced
    assert flow.state().synced == 1


def test_a_retransmission_after_lost_sync_is_not_counted_again(dataplanes):
    dp = dataplanes(limit=2, action="drop", max_frames=SMALL_BOUND)
    flow = opened(dp)
    seq = flow.seq
    many = amqp.consume(1) + amqp.heartbeat() * (WALK_BOUND + 1)
    assert flow.send(many) == TC_ACT_OK  # the walk runs out of frames
    assert (flow.state().synced, flow.consumers()) == (0, 1)
    assert flow.send(many, seq=seq) == TC_ACT_OK  # resent: no rejoin on applied bytes
    assert flow.consumers() == 1
    assert flow.send(amqp.consume(2)) == TC_ACT_OK  # the client's real second consume
    assert flow.channels() == {1: 1, 2: 1}
    assert flow.send(amqp.consume(3)) == TC_ACT_SHOT


def test_a_lost_segment_resent_later_resyncs_where_the_stream_stopped(dp):
    flow = opened(dp)
    flow.send(amqp.consume(1))
    hole = flow.seq
    lost = amqp.consume(2)
    flow.seq += len(lost)
    after = amqp.publish(1, b"x" * 50)
    assert flow.send(after[5:], seq=flow.seq + 5) == TC_ACT_OK  # first, beyond a hole
    assert flow.channels() == {1: 1}
    assert flow.send(lost, seq=hole) == TC_ACT_OK  # the retransmission fills the hole
    assert flow.state().synced == 1
    assert flow.channels() == {1: 1, 2: 1}


def test_frames_up_to_the_walk_bound_are_all_walked(dp):
    flow = opened(dp)
    many = amqp.heartbeat() * (_render.MAX_FRAMES - 3) + amqp.consume(1) * 3
    assert flow.send(many) == TC_ACT_OK
    assert flow.channels() == {1: 3}
    assert flow.state().synced == 1


# -- addresses and encapsulations ----------------------------------------------------------


def test_ipv6(dp):
    flow = opened(dp, client="fd00::2")
    for _i in range(3):
        assert flow.send(amqp.consume(1)) == TC_ACT_OK
    assert flow.send(amqp.consume(1)) == TC_ACT_SHOT
    assert flow.channels() == {1: 3}


def test_ipv4_and_ipv6_connections_are_distinct(dp):
    v4, v6 = opened(dp), opened(dp, client="fd00::2")
    v4.send(amqp.consume(1) * 3)
    assert v6.send(amqp.consume(1)) == TC_ACT_OK
    assert (v4.consumers(), v6.consumers()) == (3, 1)


def test_ipv4_options(dp):
    flow = opened(dp, ip_options=b"\x01" * 8)  # eight NOPs: IHL 7
    flow.send(amqp.consume(1) * 3)
    assert flow.send(amqp.consume(1)) == TC_ACT_SHOT
    assert flow.consumers() == 3


@pytest.mark.parametrize(
    "vlans",
    [
        pytest.param(((packets.ETH_8021Q, 10),), id="802.1Q"),
        pytest.param(((packets.ETH_8021AD, 20), (packets.ETH_8021Q, 10)), id="QinQ"),
    ],
)
def test_vlan_tags_inline(dp, vlans):
    flow = opened(dp, vlans=vlans)
    flow.send(amqp.consume(1) * 3)
    assert flow.send(amqp.consume(1)) == TC_ACT_SHOT
    assert flow.consumers() == 3


@pytest.mark.parametrize("nexthdr", [0, 43, 44, 60])
def test_ipv6_extension_headers_pass_unparsed(dp, nexthdr):
    segment = packets.tcp("fd00::2", "fd00::1", 40000, 5672, 1, amqp.consume(1))
    packet = packets.ethernet(
        packets.ipv6("fd00::2", "fd00::1", b"\x06\x00" + b"\x00" * 6 + segment, nexthdr=nexthdr),
        packets.ETH_IPV6,
    )
    assert dp.run(packet)[0] == TC_ACT_OK
    assert dp.counters()["unparsed"] == 1
    assert dp.counters()["segments"] == 0


def test_ipv4_fragments_pass_unparsed(dp):
    segment = packets.tcp("198.18.0.2", "198.18.0.1", 40000, 5672, 1, amqp.consume(1))
    for frag_off in (0x2000, 0x0010):  # first fragment (MF), later fragment
        packet = packets.ethernet(
            packets.ipv4("198.18.0.2", "198.18.0.1", segment, frag_off=frag_off), packets.ETH_IP
        )
        assert dp.run(packet)[0] == TC_ACT_OK
    assert dp.counters()["unparsed"] == 2


def test_other_ports_and_protocols_are_not_looked_at(dp):
    other = packets.tcp_packet("198.18.0.2", "198.18.0.1", 40000, 5671, 1, amqp.consume(1))
    udp = packets.ethernet(
        packets.ipv4("198.18.0.2", "198.18.0.1", b"\x00" * 16, proto=17), packets.ETH_IP
    )
    arp = packets.ethernet(b"\x00" * 28, 0x0806)
    for packet in (other, udp, arp):
        assert dp.run(packet) == (TC_ACT_OK, packet)
    counters = dp.counters()
    assert counters.pop("missed_by_cause") == dict.fromkeys(_layout.MISSED_CAUSES, 0)
    assert counters == dict.fromkeys(counters, 0)


def test_a_truncated_tcp_header_passes(dp):
    packet = packets.tcp_packet("198.18.0.2", "198.18.0.1", 40000, 5672, 1, b"")[: 14 + 20 + 10]
    assert dp.run(packet)[0] == TC_ACT_OK
    assert dp.counters()["unparsed"] == 1


def test_l3_device_variant(dataplanes):
    dp = dataplanes(limit=1, action="drop", l2="none")
    for client in ("198.18.0.2", "fd00::2"):
        flow = opened(dp, client=client, l2=False)
        assert flow.send(amqp.consume(1)) == TC_ACT_OK
        assert flow.send(amqp.consume(1)) == TC_ACT_SHOT


def test_custom_port(dataplanes):
    dp = dataplanes(limit=1, action="drop", port=5671)
    flow = opened(dp)
    flow.send(amqp.consume(1))
    assert flow.send(amqp.consume(1)) == TC_ACT_SHOT
    other = packets.tcp_packet("198.18.0.2", "198.18.0.1", 40000, 5672, 1, amqp.consume(1))
    assert dp.run(other)[0] == TC_ACT_OK


# -- actions -------------------------------------------------------------------------------


def test_reset_turns_the_over_limit_segment_into_a_valid_rst(dataplanes):
    dp = dataplanes(limit=1, action="reset")
    for client in ("198.18.0.2", "fd00::2"):
        flow = opened(dp, client=client)
        flow.send(amqp.consume(1))
        seq = flow.seq
        sent = flow.packet(amqp.consume(2))
        verdict, out = dp.run(sent)
        assert verdict == TC_ACT_OK
        assert packets.tcp_flags(out) == packets.tcp_flags(sent) | packets.RST
        assert packets.tcp_checksum_ok(out)
        assert len(out) == len(sent)
        assert flow.state().ended == _layout.ENDED_RESET
        assert flow.state().consumers == 0
        # The client's retransmission then passes untouched: the host answers it with RST.
        again = flow.packet(amqp.consume(2), seq=seq)
        assert dp.run(again) == (TC_ACT_OK, again)
    assert dp.counters()["conns_forgotten"] == 2


def test_monitor_refuses_nothing_and_reports(dataplanes):
    dp = dataplanes(limit=2, action="monitor")
    flow = opened(dp)
    for _i in range(5):
        assert flow.send(amqp.consume(1)) == TC_ACT_OK
    assert flow.consumers() == 5
    assert flow.state().refused == 3
    counters = dp.counters()
    assert (counters["consumes_allowed"], counters["consumes_refused"]) == (2, 3)


def test_segments_and_payload_counters(dp):
    flow = opened(dp)
    flow.send(flags=packets.ACK)
    flow.send(amqp.heartbeat())
    counters = dp.counters()
    # SYN, protocol header, bare ACK, heartbeat
    assert counters["segments"] == 4
    assert counters["amqp_segments"] == 2
