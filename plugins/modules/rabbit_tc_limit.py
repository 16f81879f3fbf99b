#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: rabbit_tc_limit
short_description: Limit AMQP consumers per client connection with a tc eBPF classifier
version_added: 0.1.0
description:
  - Compiles (BCC) and attaches (tc clsact ingress, direct-action) an eBPF classifier that
    follows the AMQP 0-9-1 stream of every client connection to O(port), counts live
    consumers per connection, and refuses the C(basic.consume) that would exceed O(limit).
  - What is deployed is read back from the maps pinned under O(pin_dir), so a run with an
    unchanged configuration changes nothing and compiles nothing.
  - A changed configuration replaces the filter atomically and keeps the pinned connection
    state, so raising the limit from 3 to 5 lets a connection with 3 consumers open exactly
    2 more.
  - It repairs what it finds broken, a filter gone with its pins left (an interface was
    recreated), pins gone with the filter left (bpffs remounted), or a foreign program at its
    tc pref and handle.
  - Runs on one host are serialised by a lock in C(/run/rabbitguard), a directory only root
    may write (the module makes it mode 0700 and refuses one that is not root's).
  - A filter at an earlier pref of the same ingress hook runs before the limiter and can
    bypass it; each run reports such filters as warnings.
  - Pin directories that are not root's, or that group or others may write, are refused
    (where bpffs is mounted without C(mode=700), a local user could make them first).
author:
  - rabbitguard.limiter contributors (@rabbitguard)
requirements:
  - Root on the managed host.
  - BCC for Python (C(python3-bpfcc) on Debian/Ubuntu, C(python3-bcc) on the RHEL family).
  - pyroute2 (C(python3-pyroute2)).
  - Kernel headers for the running kernel, or O(kernel_headers).
  - bpffs mounted at C(/sys/fs/bpf).
  - Jinja2 for the host's Python (C(python3-jinja2)).
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.flow
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  platform:
    platforms: posix
  action:
    support: full
    details: The action plugin copies the classifier's C template from the collection to the host.
  async:
    support: none
  bypass_host_loop:
    support: none
options:
  state:
    description:
      - V(present) deploys the limiter on O(interfaces); V(absent) removes it.
      - V(absent) with neither O(interfaces) nor O(netns) removes the limiter from every
        interface of every namespace that the pins under O(pin_dir) name.
    type: str
    choices: [present, absent]
    default: present
  interfaces:
    description:
      - Interfaces whose ingress traffic to the broker is limited.
      - Default, the interfaces of the default IPv4 and IPv6 routes of the namespace. C(lo) is
        used only when listed.
      - With O(state=present), an interface that the limiter is on but that is not listed any
        more is detached.
    type: list
    elements: str
  port:
    description: The broker's AMQP port.
    type: int
    default: 5672
  limit:
    description:
      - Live consumers allowed on one client connection, over all its channels.
      - V(0) refuses every C(basic.consume).
    type: int
    default: 10
  action:
    description:
      - What happens to the segment carrying the C(basic.consume) over the limit.
      - V(drop) drops it; the connection stalls until the broker's heartbeat times it out.
      - V(reset) turns it into a TCP RST to the broker, which frees the connection at once;
        the client then gets a RST from the host.
      - V(monitor) refuses nothing, and counts what it would have refused.
      - V(refuse) rewrites that consume's queue name in place (same length) to one no client
        can have declared (C(amq.rabbitguard.consumer-limit-refused), cut or padded with
        C(-); NUL octets for a name of 1 to 3 octets), so the broker closes that channel
        alone with 404 NOT_FOUND; the connection and its other channels keep working, and
        the channel is freed when the client confirms the close. Retransmissions are
        rewritten the same way. Where no rewrite is possible (an empty queue name, the
        name's length octet not in the segment, over-limit consumes on two channels in one
        segment) the segment is dropped as with V(drop) and counted (C(refuse_fallbacks)
        in M(rabbitguard.limiter.rabbit_tc_limit_info)).
    type: str
    choices: [drop, reset, monitor, refuse]
    default: drop
  frame_max:
    description:
      - The largest AMQP frame the broker accepts (RabbitMQ's C(frame_max), 131072 by
        default). Larger frames are taken for a corrupt stream.
    type: int
    default: 131072
  strict:
    description:
      - Make the limiter a security boundary against reordering. A segment that arrives
        ahead of the stream, where a frame header may start in bytes not seen yet, is
        dropped so that the client's TCP sends it again in order; then no client, faulty
        or hostile, gets more than O(limit) consumers, whatever order its segments arrive
        in.
      - Without it such a segment passes unwalked, and a connection whose skipped bytes
        reach the broker is no longer limited (fail open, so that an honest client is
        never refused). Strict costs retransmissions where the network reorders; see the
        README's Modes.
    type: bool
    default: false
  netns:
    description:
      - A named network namespace (as in C(ip netns)) or a path such as C(/proc/PID/ns/net),
        for brokers in containers. Default, the host's namespace.
    type: str
  pin_dir:
    description:
      - Where the limiter's maps are pinned; must be a directory under C(/sys/fs/bpf), for
        every O(state).
    type: path
    default: /sys/fs/bpf/rabbitguard
  kernel_headers:
    description:
      - A kernel build tree to compile against, for hosts without a headers package for the
        running kernel. Default, C(/lib/modules/<release>/build).
    type: path
  lock_timeout:
    description: Seconds to wait for another run of this module on the same host.
    type: int
    default: 120
  seed_from_broker:
    description:
      - When the program is attached (or replaced), ask the broker (C(rabbitmqctl
        list_connections) and C(list_channels), inside O(netns) when given) how many consumers
        each client connection already holds, and start counting from there, so that a
        connection older than the limiter keeps its count when the classifier joins its stream
        (at its first well-formed frame). Connections the limiter already follows keep their
        own counts.
      - No C(rabbitmqctl), or a broker that does not answer, is a warning; counting then starts
        at zero and the run does not fail.
    type: bool
    default: true
  broker_node:
    description:
      - The RabbitMQ node that O(seed_from_broker) asks (C(rabbitmqctl -n)), a node name such
        as V(rabbit@hostname). Default - the node C(rabbitmqctl) uses on the host.
    type: str
  overrides:
    description:
      - Per-source limits. A client connection from an address inside an entry's
        O(overrides[].source) may have O(overrides[].limit) consumers instead of O(limit);
        when several entries match, the longest prefix wins.
      - Kept in a pinned map that the classifier reads at each C(basic.consume). Changing
        only the overrides compiles nothing and keeps the attached program (action
        V(update)); it applies from each connection's next C(basic.consume).
      - At most 1024 entries; a source may not be listed twice.
    type: list
    elements: dict
    default: []
    suboptions:
      source:
        description:
          - An IPv4 or IPv6 network in CIDR notation, such as V(10.20.0.0/16),
            V(10.20.3.4/32) or V(fd00:1::/64).
          - Host bits must be zero (V(10.20.3.4/16) is refused, not widened).
        type: str
        required: true
      limit:
        description: Live consumers allowed on one connection from this source (0 to 65535).
        type: int
        required: true
notes:
  - The filter sits at pref 49152, handle 0x5247 of the clsact ingress hook. The clsact qdisc
    is created only if missing, and removed on O(state=absent) only if this module created it
    and it holds no other filter.
  - Filters and pins do not survive a reboot; the C(rabbitguard.limiter.tc_limiter) role
    installs a boot-time unit that re-attaches the limiter.
  - A run that fails half-way (a deploy, replace, overrides update or removal) puts every
    interface and namespace it changed back as it was (the previous ingress and egress
    programs, walk_more slots, config, overrides and pins; a removal pins the very same maps
    again, so counters and tracked connections are kept). If something
    cannot be put back (for example a foreign non-BPF filter the run had to delete from the
    limiter's slot), the module fails and its message says that the host is not as before
    and what is left; running it again repairs the drift.
seealso:
  - module: rabbitguard.limiter.rabbit_tc_limit_info
"""

EXAMPLES = r"""
- name: Allow at most 20 consumers per client connection, refused with a TCP reset
  rabbitguard.limiter.rabbit_tc_limit:
    limit: 20
    action: reset

- name: Dry run on a live fleet - count, refuse nothing
  rabbitguard.limiter.rabbit_tc_limit:
    limit: 50
    action: monitor
    interfaces: [eth0, eth1]

- name: One service legitimately needs 500 consumers per connection
  rabbitguard.limiter.rabbit_tc_limit:
    limit: 20
    overrides:
      - source: 10.20.30.0/24
        limit: 500
      - source: fd00:20::/64
        limit: 500

- name: A broker in a container
  rabbitguard.limiter.rabbit_tc_limit:
    netns: /proc/{{ broker_pid }}/ns/net
    interfaces: [eth0]
    limit: 10

- name: Remove the limiter everywhere on the host
  rabbitguard.limiter.rabbit_tc_limit:
    state: absent
"""

RETURN = r"""
interfaces:
  description: Per namespace key and interface, what was found and done.
  returned: always
  type: dict
  sample:
    host:
      eth0:
        action: replace
        reason: null
        config: {port: 5672, limit: 5, action: drop, frame_max: 131072, strict: false,
                 l2: ethernet, overrides: [{source: 10.20.30.0/24, limit: 500}]}
        program_id: 412
        compiled: true
        pin_dir: /sys/fs/bpf/rabbitguard/v3/host/eth0
  contains:
    action:
      description:
        - One of V(none), V(create), V(replace), V(repair), V(remove), or V(update) (only
          O(overrides) changed - the pinned map was rewritten, nothing compiled, the same
          program stays attached).
      type: str
    reason:
      description: Why a repair was needed, or why a namespace's pins were removed.
      type: str
    config:
      description: The configuration deployed after the run (null when removed).
      type: dict
    program_id:
      description: The kernel's id of the attached program (null when none).
      type: int
    compiled:
      description: Whether the run compiled a program for this interface.
      type: bool
    pin_dir:
      description: Where this interface's maps are pinned.
      type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _constants as C
from ansible_collections.rabbitguard.limiter.plugins.module_utils import _runner


def build_module():
    return AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", default="present", choices=list(C.STATES)),
            interfaces=dict(type="list", elements="str"),
            port=dict(type="int", default=C.DEFAULT_PORT),
            limit=dict(type="int", default=C.DEFAULT_LIMIT),
            action=dict(type="str", default=C.MODULE_DEFAULT_ACTION, choices=list(C.ACTIONS)),
            frame_max=dict(type="int", default=C.DEFAULT_FRAME_MAX),
            strict=dict(type="bool", default=C.DEFAULT_STRICT),
            netns=dict(type="str"),
            pin_dir=dict(type="path", default=C.DEFAULT_PIN_ROOT),
            kernel_headers=dict(type="path"),
            lock_timeout=dict(type="int", default=C.DEFAULT_LOCK_TIMEOUT),
            broker_node=dict(type="str"),
            seed_from_broker=dict(type="bool", default=C.DEFAULT_SEED_FROM_BROKER),
            overrides=dict(
                type="list",
                elements="dict",
                default=[],
                options=dict(
                    source=dict(type="str", required=True),
                    limit=dict(type="int", required=True),
                ),
            ),
            # Internal, not a user option (so not in DOCUMENTATION): the action plugin sends
            # the path of the classifier's template, copied from the collection on the
            # controller into the task's remote temporary directory.
            _template_path=dict(type="str"),
        ),
        supports_check_mode=True,
    )


def main():
    module = build_module()
    _runner.run_limit(module)


if __name__ == "__main__":
    main()
