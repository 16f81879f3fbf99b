#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: rabbit_tc_limit_info
short_description: Show the AMQP consumer limiter deployed on a host, its connections and counters
version_added: 0.1.0
description:
  - Reads what M(rabbitguard.limiter.rabbit_tc_limit) deployed from the maps pinned under
    O(pin_dir), and the attached program from tc.
  - Per interface, the deployed configuration, the program id, the counters, and per tracked
    client connection the client's address and port, its consumers per channel and in total,
    and how many of its C(basic.consume) were refused.
  - Read-only, and safe while traffic flows; it never stops the data plane.
author:
  - rabbitguard.limiter contributors (@rabbitguard)
requirements:
  - Root on the managed host.
  - pyroute2 (C(python3-pyroute2)).
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: The module changes nothing, in check mode or not.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  netns:
    description:
      - Only the limiter in this network namespace (a name, or a path such as
        C(/proc/PID/ns/net)). Default, every namespace the pins name.
    type: str
  interfaces:
    description: Only these interfaces. Default, every interface the pins name.
    type: list
    elements: str
  pin_dir:
    description: Where the limiter's maps are pinned.
    type: path
    default: /sys/fs/bpf/rabbitguard
  connections:
    description: Whether to list the tracked connections.
    type: bool
    default: true
  min_consumers:
    description: List only connections with at least this many consumers.
    type: int
    default: 0
  format:
    description:
      - V(prometheus) also returns RV(prometheus), the metrics in Prometheus' text exposition
        format - the text the C(rabbitguard.limiter.tc_limiter) role's timer writes for
        node_exporter's textfile collector.
    type: str
    choices: [plain, prometheus]
    default: plain
seealso:
  - module: rabbitguard.limiter.rabbit_tc_limit
"""

EXAMPLES = r"""
- name: What the limiter sees
  rabbitguard.limiter.rabbit_tc_limit_info:
  register: limiter

- name: Connections close to the limit
  rabbitguard.limiter.rabbit_tc_limit_info:
    min_consumers: 8

- name: The metrics node_exporter would read
  rabbitguard.limiter.rabbit_tc_limit_info:
    format: prometheus
    connections: false
  register: limiter

- name: Show them
  ansible.builtin.debug:
    msg: "{{ limiter.prometheus }}"
"""

RETURN = r"""
prometheus:
  description:
    - The metrics in Prometheus' text exposition format (prefix C(rabbitguard_limiter_)),
      labelled by namespace and interface only.
  returned: when O(format=prometheus)
  type: str
  sample: |
    # HELP rabbitguard_limiter_consumes_refused_total basic.consume methods over the limit.
    # TYPE rabbitguard_limiter_consumes_refused_total counter
    rabbitguard_limiter_consumes_refused_total{namespace="host",interface="eth0"} 3
limiters:
  description: One entry per namespace and interface the limiter is pinned for.
  returned: always
  type: list
  elements: dict
  contains:
    namespace:
      description: V(host), C(netns-<name>) or C(ns-<inode>).
      type: str
    interface:
      description: The interface name.
      type: str
    pin_dir:
      description: Where its maps are pinned.
      type: str
    config:
      description:
        - The deployed port, limit, action, frame_max, strict and l2 (null when unknown), and
          overrides (the per-source limits, a list of source and limit).
      type: dict
    attached:
      description:
        - Whether the filter on the interface runs the pinned configuration with the pinned
          maps (false whenever RV(limiters[].drift) is set).
      type: bool
    drift:
      description:
        - What disagrees, or null when the filter, the pins and the config agree - the filter
          is there but its pinned maps are gone (bpffs remounted, pins removed), the filter or
          the interface is gone but the pins are there, another program holds the limiter's
          tc slot, the pinned config does not match the filter, the attached program does
          not use the pinned maps, the egress filter is missing, foreign or not the
          ingress filter's pair, or a walk_more slot (the ingress walk's continuation
          program, or the egress program's own slot) is empty or holds a program that is
          not this pair's.
          M(rabbitguard.limiter.rabbit_tc_limit) repairs each.
        - An interface whose filter is the limiter's is listed even when nothing is pinned
          for it.
      type: str
    warnings:
      description:
        - Filters at an earlier pref on the same ingress hook, which run before the limiter
          (a verdict of theirs bypasses it).
      type: list
      elements: str
    program_id:
      description: The kernel's id of the attached program, or null.
      type: int
    egress_program_id:
      description:
        - The kernel's id of the attached egress program, the pair's other half on the clsact
          egress hook (it frees the slots of consumers the broker cancels), or null.
        - RV(limiters[].attached) is true only when both programs of the pair are attached.
      type: int
    counters:
      description:
        - Totals since the maps were created, summed over CPUs - segments, amqp_segments,
          consumes_allowed, consumes_refused, cancels, channel_closes, conns_tracked,
          conns_forgotten, resyncs, unparsed, held (segments ahead of the stream that
          strict mode dropped, to come again in order), passed_ahead, missed,
          cancels_unknown (cancels of a consumer tag not live on the connection, which
          freed nothing), cancels_blind (cancels that freed a slot with their tag never
          looked at, where the tag step's budget for a segment ran out) and
          tags_unreadable (consumer tags not whole in their segment, taken the honest
          way); and from
          the refusal log, refuse_rewrites (consumes refused in place by V(refuse)) and
          refuse_fallbacks (consumes V(refuse) could not rewrite and dropped instead).
        - V(unparsed) is every segment passed without walking it; it splits into
          V(passed_ahead) (segments ahead of a hole, passed unwalked; nothing is lost
          when they lie inside a message body, as most reordered bytes of a publisher
          do) and segments whose frames were not seen. V(missed) counts the latter, and
          passed-ahead bytes later found to hold a frame header; it is the one to watch.
          Both directions count in it (the egress program's lost broker frames too).
        - V(missed_by_cause) splits V(missed) by the place that counted it, a dict of
          cause to count (its values sum to V(missed)) - V(unparsed_packet) (IP/TCP headers
          not parsed, such as IP fragments), V(untracked_connection) (no state and not
          starting on a frame), V(table_full), V(adrift) (a connection no longer
          followed), V(awaiting_resync) (sync lost earlier, waiting for a segment that
          starts on a frame), V(header_ahead_of_hole) (bytes passed ahead of a hole held a
          frame header, and the connection goes adrift), V(lost_sync) (what is not a frame, or
          a basic.consume the broker would not take), V(frame_bound) (more frames in one
          segment than the walk's tail calls reach), V(continuation_lost), and for the
          broker's stream V(egress_bad_frame), V(egress_frame_bound) and V(egress_gap).
          V(adrift) and V(awaiting_resync) count segments, the others events.
      type: dict
    refusals:
      description:
        - The last 64 refusals on this interface, newest first - each with time (UTC, ISO
          8601), client, client_port, channel, consumers (the connection's consumers when it
          was refused) and action (the one taken - V(refuse), V(drop) (also where
          V(refuse) had to fall back), V(reset), or V(monitor), which only reports).
        - A refused consume is logged once, not again for each retransmission.
      type: list
      elements: dict
    connection_count:
      description: How many live client connections are tracked (only with O(connections=true)).
      type: int
    connections:
      description:
        - Tracked live connections with at least O(min_consumers) consumers, most consumers
          first; each with client, client_port, broker, broker_port, consumers, channels (a
          dict channel -> consumers), refused, synced, and limit (the connection's effective
          limit - its source's override, else the deployed limit).
      type: list
      elements: dict
  sample:
    - namespace: host
      interface: eth0
      config: {port: 5672, limit: 10, action: drop, frame_max: 131072, strict: false,
               l2: ethernet, overrides: [{source: 198.18.0.0/24, limit: 50}]}
      attached: true
      drift: null
      warnings: []
      program_id: 87
      egress_program_id: 88
      counters: {consumes_allowed: 12, consumes_refused: 3}
      connection_count: 2
      connections:
        - {client: 198.18.0.2, client_port: 40022, broker: 198.18.0.11, broker_port: 5672,
           consumers: 10, channels: {"1": 10}, refused: 3, synced: true, limit: 50}
      refusals:
        - {time: "2026-11-30T13:02:11.482+00:00", client: 198.18.0.2, client_port: 40022,
           channel: 2, consumers: 10, action: refuse}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _constants as C
from ansible_collections.rabbitguard.limiter.plugins.module_utils import _runner


def build_module():
    return AnsibleModule(
        argument_spec=dict(
            netns=dict(type="str"),
            interfaces=dict(type="list", elements="str"),
            pin_dir=dict(type="path", default=C.DEFAULT_PIN_ROOT),
            connections=dict(type="bool", default=True),
            min_consumers=dict(type="int", default=0),
            format=dict(type="str", default="plain", choices=["plain", "prometheus"]),
        ),
        supports_check_mode=True,
    )


def main():
    _runner.run_info(build_module())


if __name__ == "__main__":
    main()
