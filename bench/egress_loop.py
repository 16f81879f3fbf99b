#!/usr/bin/python3
"""Repeat-loop ns of the egress program on bench/dataplane.py's egress cases: each template
is patched so that the walk does not write its position back at the end (so every run of
the loop walks the same frames as the first)."""

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, ".collections"), os.path.join(ROOT, "bench")]
import dataplane as dpb  # noqa: E402

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _bpfsys  # noqa: E402
from tests.lib.dataplane import Dataplane  # noqa: E402

OLD = "done:\n    es->stash_len = 0;\n    es->next_hdr = seg->seq + pos;\n"
NEW = "done:\n    es->stash_len = 0;\n    if (pos < 0) es->next_hdr = seg->seq + pos;\n"

ap = argparse.ArgumentParser()
ap.add_argument("templates", nargs="+", help="label=path")
ap.add_argument("--repeat", type=int, default=100000)
ap.add_argument("--rounds", type=int, default=7)
args = ap.parse_args()

progs = []  # (label, helper, EgressLimiter)
dps = []
base = dpb.Baseline()
try:
    for spec in args.templates:
        label, path = spec.split("=", 1)
        src = Path(path).read_text()
        assert OLD in src, path
        patched = os.path.join(tempfile.gettempdir(), "egress-loop-%s.c.j2") % label
        Path(patched).write_text(src.replace(OLD, NEW))
        for helper in (False, True):
            dp = Dataplane(
                limit=3, action="drop", force_skb_load_bytes=helper, template_path=patched
            )
            dps.append(dp)
            progs.append((label, helper, dpb.EgressLimiter(dp)))
    labels = [lab for lab, h, _x in progs if not h]
    print("| case | no-op | " + " | ".join(labels) + " |")
    print("|---|---:|" + "---:|" * len(labels))
    for name, packet, header_at, helper in dpb.egress_cases():
        mine = [x for _l, h, x in progs if h == helper]
        res = [[] for _ in range(len(mine) + 1)]
        for _r in range(args.rounds):
            res[0].append(_bpfsys.prog_test_run(base.fds["noop"], packet, repeat=args.repeat)[1])
            for i, x in enumerate(mine):
                x.prepare(header_at)
                res[i + 1].append(_bpfsys.prog_test_run(x.fd(), packet, repeat=args.repeat)[1])
        print("| %s | %s |" % (name, " | ".join("%d" % statistics.median(v) for v in res)))
finally:
    for dp in dps:
        dp.close()
    base.close()
