# -*- coding: utf-8 -*-
# Copyright: rabbitguard.limiter contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fixtures the tests under tests/root share: the limiter's template, and a throwaway site
(tests/root/sites.py) for a test that deploys through _deploy.apply."""

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _render
from tests.root.sites import made_site


@pytest.fixture(scope="module")
def template():
    return _render.read_template()


@pytest.fixture
def site():
    with made_site() as s:
        yield s
