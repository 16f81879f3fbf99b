# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Two operators run the module on the same host at the same moment (two ansible-playbook
processes): the host lock serialises them, both succeed, and the host ends up with one
filter and consistent pins, as the later run left it."""

import concurrent.futures

import pytest

from tests.integration.common import HANDLE, forget, info, limiter_entry, tc_filters
from tests.lib.ansible_run import LIMIT
from tests.lib.clients import open_consumers

pytestmark = pytest.mark.integration

HOST = "rabbit2"


def test_simultaneous_runs_are_serialised(ansible, lab_hosts, queues, client_pool):
    forget(HOST)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(
            pool.map(lambda limit: ansible.run(HOST, LIMIT, limit=limit, action="reset"), (3, 4))
        )

    for result in runs:
        assert result["failed"] is False, result
    ours = [line for line in tc_filters(HOST).splitlines() if "handle 0x%x" % HANDLE in line]
    assert len(ours) == 1, tc_filters(HOST)
    entry = limiter_entry(info(ansible, HOST))
    assert entry["attached"] is True
    assert entry["config"]["limit"] in (3, 4)
    assert " id %d " % entry["program_id"] in ours[0] + " "
    client = client_pool("pika", lab_hosts[HOST]["ipv4"], "after-race")
    outcome = open_consumers(client, queues, 6)
    assert outcome.count == entry["config"]["limit"], outcome
    assert outcome.error.kind == "connection", outcome
