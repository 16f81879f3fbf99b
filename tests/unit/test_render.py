"""Validation and rendering of the classifier source (no root, no BCC)."""

import re

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _constants as C
from ansible_collections.rabbitguard.limiter.plugins.module_utils import _render

PIN = C.DEFAULT_PIN_ROOT + "/eth0"


def render(**overrides):
    config = dict(port=5672, limit=10, action="drop", l2="ethernet", pin_dir=PIN)
    config.update(overrides)
    return _render.render(_render.validate(**config), _render.read_template())


def test_values_reach_the_source_as_defines():
    source = render(port=5671, limit=7, action="reset", l2="none", frame_max=65536)
    assert re.search(r"#define BROKER_PORT\s+5671\n", source)
    assert re.search(r"#define CONSUMER_LIMIT\s+7\n", source)
    assert re.search(r"#define LIMIT_ACTION\s+ACTION_RESET\n", source)
    assert re.search(r"#define HAVE_ETHERNET\s+0\n", source)
    assert re.search(r"#define FRAME_MAX\s+65536\n", source)
    assert '"%s/conns"' % PIN in source
    assert "{{" not in source and "{%" not in source


@pytest.mark.parametrize("action", _render.ACTIONS)
@pytest.mark.parametrize("l2", _render.L2_KINDS)
def test_every_variant_renders(action, l2):
    assert "ACTION_%s" % action.upper() in render(action=action, l2=l2)


def test_digest_follows_the_config():
    assert _render.source_digest(render()) == _render.source_digest(render())
    assert _render.source_digest(render()) != _render.source_digest(render(limit=11))


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("port", 0, "port must be between 1 and 65535, got 0"),
        ("port", 65536, "port must be between 1 and 65535"),
        ("port", "5672", "port must be an integer between 1 and 65535, got '5672'"),
        ("port", True, "port must be an integer"),
        ("limit", -1, "limit must be between 0 and 65535, got -1"),
        ("limit", 1.5, "limit must be an integer"),
        ("action", "block", "action must be one of drop, reset, monitor, refuse, got 'block'"),
        ("l2", "ppp", "l2 must be one of ethernet, none"),
        ("frame_max", 100, "frame_max must be between 4096"),
        ("strict", "yes", "strict must be a boolean, got 'yes'"),
        ("strict", 1, "strict must be a boolean"),
        ("pin_dir", "/tmp/x", "pin_dir must be a directory under /sys/fs/bpf"),
        ("pin_dir", "/sys/fs/bpf/a/../../etc", "pin_dir must be a directory under /sys/fs/bpf"),
        ("pin_dir", "/sys/fs/bpf/a.b", "bpffs allows no dots"),
        ("pin_dir", '/sys/fs/bpf/a"b', "pin_dir must be a directory under /sys/fs/bpf"),
        ("pin_dir", "/sys/fs/bpf/a\n#define X", "pin_dir must be a directory under /sys/fs/bpf"),
    ],
)
def test_bad_values_are_refused_before_rendering(name, value, message):
    config = dict(port=5672, limit=10, action="drop", l2="ethernet", pin_dir=PIN)
    config[name] = value
    with pytest.raises(_render.ConfigError) as err:
        _render.validate(**config)
    assert message in str(err.value)
    assert "\n" not in str(err.value).replace("\\n", "")


def test_limit_bounds_are_accepted():
    for limit in (0, 65535):
        assert _render.validate(1, limit, "monitor", "none", PIN)["limit"] == limit


def test_the_c_enums_and_bounds_are_the_constants():
    """The C side numbers actions as _constants.ACTIONS orders them (the pinned config map
    stores that number), and walks MAX_FRAMES frames."""
    source = render()
    for number, action in enumerate(C.ACTIONS):
        assert re.search(r"#define ACTION_%s\s+%d\b" % (action.upper(), number), source), action
    assert re.search(r"#define MAX_FRAMES\s+%d\n" % C.MAX_FRAMES, source)
    assert re.search(r"#define FRAME_MAX\s+%d\n" % C.DEFAULT_FRAME_MAX, source)


def test_the_template_is_given_the_action_numbers():
    config = _render.validate(5672, 1, "monitor", "ethernet", PIN)
    values = _render.template_values(config)
    assert values["action_code"] == C.ACTIONS.index("monitor")
    assert values["action_codes"] == {name: i for i, name in enumerate(C.ACTIONS)}


def test_strict_is_rendered_and_changes_the_digest():
    """strict is compiled in: it changes the source, so the digest (the state key) too."""
    sources = {
        strict: _render.render(
            _render.validate(5672, 10, "drop", "ethernet", PIN, strict=strict),
            _render.read_template(),
        )
        for strict in (False, True)
    }
    assert re.search(r"#define STRICT\s+0\n", sources[False])
    assert re.search(r"#define STRICT\s+1\n", sources[True])
    assert _render.source_digest(sources[False]) != _render.source_digest(sources[True])
    assert _render.validate(5672, 10, "drop", "ethernet", PIN)["strict"] is C.DEFAULT_STRICT
