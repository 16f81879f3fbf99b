# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Every default, enum and fixed number of the limiter, written once.

The modules' argument specs, the boot program's defaults (_reattach), the classifier's
rendered ``#define``s (through _render), the pinned layout (_layout) and the tests take
their values from here; tests/fleet checks the tc_limiter role's defaults against it.
"""

from __future__ import annotations

# What happens to a basic.consume over the limit. The order is the C enum's and the pinned
# config map's (_layout encodes an action as its index here): append, never reorder.
ACTIONS = ("drop", "reset", "monitor", "refuse")
# The link-layer header tc hands the classifier: Ethernet (loopback too), or none (tun, ...).
L2_KINDS = ("ethernet", "none")
STATES = ("present", "absent")

DEFAULT_PORT = 5672
DEFAULT_LIMIT = 10
# The product defaults differ on purpose. The module refuses quietly (drop, as a firewall
# would); the role, run on a fleet by people who want the faulty client told and its other
# channels kept, refuses the one consume with a channel error (refuse).
MODULE_DEFAULT_ACTION = "drop"
ROLE_DEFAULT_ACTION = "refuse"
# RabbitMQ's own frame_max default.
DEFAULT_FRAME_MAX = 131072
FRAME_MAX_RANGE = (4096, 1 << 28)
PORT_RANGE = (1, 65535)
LIMIT_RANGE = (0, 65535)
DEFAULT_LOCK_TIMEOUT = 120
# At attach, the broker's consumer counts are written into the maps (module_utils/_seed).
DEFAULT_SEED_FROM_BROKER = True
# Per-source limits (the overrides option): at most this many entries, the size of the
# pinned LPM trie that holds them.
MAX_OVERRIDES = 1024
# node_exporter's textfile collector directory on Debian, and the file the metrics go to.
DEFAULT_METRICS_DIR = "/var/lib/prometheus/node-exporter"
METRICS_FILE = "rabbitguard_limiter.prom"
# A connection is "near its limit" at this fraction of it or more (a metrics gauge).
NEAR_LIMIT_FRACTION = (4, 5)
# strict: segments that arrive ahead of the stream are dropped to come again in order, so
# that reordering, hostile or not, never gets a consumer past the limit. Off by default:
# it costs retransmissions where the network reorders (README, Modes).
DEFAULT_STRICT = False

BPFFS_ROOT = "/sys/fs/bpf"
DEFAULT_PIN_ROOT = BPFFS_ROOT + "/rabbitguard"

# Our slot on the clsact ingress hook: a fixed pref and handle, so a replace swaps our
# filter in place and never adds a second one.
FILTER_PREF = 49152
FILTER_HANDLE = 0x5247
# The egress program's slot on the clsact egress hook of the same interface (the broker-to-
# client stream: server-sent cancels and closes). Deployed, replaced and removed with the
# ingress filter, under the same name.
EGRESS_FILTER_PREF = 49152
EGRESS_FILTER_HANDLE = 0x5248
# Frames walked per broker segment by one run of the egress program (a bounded loop, like
# MAX_FRAMES): about 85 small deliveries of three frames. A segment with more goes on in the
# egress program again, tail-called through walk_more's slot EGRESS_MORE_SLOT (slot 0 is
# the ingress walk's continuation), up to 34 runs. 256 verifies in ~356k instructions
# (tests/bpf/test_variants budgets it at 800k, of the kernel's 1M).
EGRESS_MAX_FRAMES = 256
EGRESS_MORE_SLOT = 1
# A slot of egress_slots (the egress program's direct-mapped stream positions) whose owner
# sent nothing for this many jiffies may be taken by another connection: 131 s at HZ=1000,
# 524 s at HZ=250, 1311 s at HZ=100 (the kernel's HZ is not known when the source is
# rendered). The owner, should it still be alive, loses its position and rejoins at its
# next segment that starts on a frame (counted in resyncs), as after any lost position.
EGRESS_STALE_JIFFIES = 1 << 17
# Frames walked per segment: a bounded loop the verifier unrolls, so it is not a user knob.
MAX_FRAMES = 256

# Serialises runs of the module and the boot program on one host. A directory only root can
# write (made mode 0700, checked on every run): /run/lock is world-writable, where any local
# user could take the lock first or put a directory or a symlink in its place.
LOCK_DIR = "/run/rabbitguard"
LOCK_NAME = "limiter.lock"
