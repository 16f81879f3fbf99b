# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The integration suite's lab and the ways tests look at a host.

One lab of its own for the session (prefix ``rgi``, subnet 240, so that a developer's lab
and the lab tests' ``rgt`` lab keep running): brought up once, taken down at the end even
when tests fail. Modules run as Ansible runs them: ``ansible-playbook`` over SSH to the lab
hosts, with the repository's ansible.cfg (collections from ``collections/``, which links to
this working tree). ``RG_IT_COLLECTIONS_PATH`` points Ansible at another build of the
collection instead (e.g. an exported release), for comparing.

AMQP clients run in the root namespace and reach each host's broker at its 198.18.240.x
address and its fd00:5267:0:f0::x address.
"""

import os

import pytest

import lab
from tests.integration.common import CFG, N_HOSTS, QUEUE
from tests.lib import clients
from tests.lib.ansible_run import LIMIT, Ansible


class _Log(list):
    def __call__(self, msg):
        self.append(msg)


@pytest.fixture(scope="session")
def lab_hosts():
    """{name: host dict} of the session's lab; down at the end, whatever happened.

    RG_IT_KEEP_LAB=1 (for working on the tests) reuses a running lab of these settings and
    leaves it up afterwards; ``RG_LAB_PREFIX=rgi RG_LAB_SUBNET=240
    RG_LAB_PRIVATE_DIRS=/run/rabbitguard lab/lab.py down`` removes it.
    """
    log = _Log()
    keep = os.environ.get("RG_IT_KEEP_LAB", "") not in ("", "0")
    try:
        if not keep:
            lab.down(cfg=CFG, log=log)  # leftovers of an interrupted run
        hosts = lab.up(n=N_HOSTS, cfg=CFG, log=log)
        yield {h["name"]: h for h in hosts}
    finally:
        if not keep:
            lab.down(cfg=CFG, log=log)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("rgi-ansible"))


@pytest.fixture(scope="session")
def ansible(lab_hosts, workdir):
    inventory = os.path.join(workdir, "hosts.yml")
    with open(inventory, "w") as handle:
        handle.write(lab.render_inventory(CFG, N_HOSTS))
    runner = Ansible(inventory, workdir, collections_path=os.environ.get("RG_IT_COLLECTIONS_PATH"))
    # The collection resolves (else every test fails on the same, less obvious, error).
    proc = runner.doc(LIMIT)
    assert proc.returncode == 0 and LIMIT in proc.stdout, proc.stdout + proc.stderr
    return runner


@pytest.fixture(scope="session")
def queues(lab_hosts):
    """The test queue, declared on every host's broker before any limit matters."""
    for host in lab_hosts.values():
        clients.declare_queues(host["ipv4"], [QUEUE])
    return QUEUE


@pytest.fixture
def client_pool():
    """Clients made by a test, closed at its end (abandoned if their stream is stalled)."""
    made = []

    def make(library, addr, name):
        client = clients.connect(library, addr, name=name)
        assert client.local_port, "could not tell %r's local port" % client
        made.append(client)
        return client

    yield make
    for client in made:
        client.close(timeout=1)
