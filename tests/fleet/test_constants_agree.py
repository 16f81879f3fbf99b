"""Every place that must state a default or an enum by hand agrees with _constants: the
tc_limiter role's defaults and argument specs, and the modules' DOCUMENTATION (which
ansible-test compares with the argument specs, themselves built from _constants)."""

import os

import yaml

from ansible_collections.rabbitguard.limiter.plugins.module_utils import _constants as C
from ansible_collections.rabbitguard.limiter.plugins.modules import (
    rabbit_tc_limit,
    rabbit_tc_limit_info,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROLE = os.path.join(REPO, "roles", "tc_limiter")

# Role variable -> the constant its default must equal.
ROLE_DEFAULTS = {
    "tc_limiter_port": C.DEFAULT_PORT,
    "tc_limiter_limit": C.DEFAULT_LIMIT,
    "tc_limiter_action": C.ROLE_DEFAULT_ACTION,  # the role's own product default
    "tc_limiter_frame_max": C.DEFAULT_FRAME_MAX,
    "tc_limiter_strict": C.DEFAULT_STRICT,
    "tc_limiter_pin_dir": C.DEFAULT_PIN_ROOT,
    "tc_limiter_lock_timeout": C.DEFAULT_LOCK_TIMEOUT,
}


def _yaml(path):
    with open(path) as handle:
        return yaml.safe_load(handle)


def test_role_defaults_and_specs_take_the_constants():
    defaults = _yaml(os.path.join(ROLE, "defaults", "main.yml"))
    specs = _yaml(os.path.join(ROLE, "meta", "argument_specs.yml"))["argument_specs"]
    for name, value in ROLE_DEFAULTS.items():
        assert defaults[name] == value, name
        for entry in specs.values():
            if name in entry["options"]:
                assert entry["options"][name]["default"] == value, name
    main = specs["main"]["options"]
    assert main["tc_limiter_action"]["choices"] == list(C.ACTIONS)
    assert main["tc_limiter_state"]["choices"] == list(C.STATES)


def test_module_docs_parse():
    for module in (rabbit_tc_limit, rabbit_tc_limit_info):
        for text in (module.DOCUMENTATION, module.EXAMPLES, module.RETURN):
            assert yaml.safe_load(text), module.__name__


def _doc_options(module):
    return yaml.safe_load(module.DOCUMENTATION)["options"]


def test_module_documentation_states_the_constants():
    options = _doc_options(rabbit_tc_limit)
    assert options["port"]["default"] == C.DEFAULT_PORT
    assert options["limit"]["default"] == C.DEFAULT_LIMIT
    assert options["action"]["default"] == C.MODULE_DEFAULT_ACTION
    assert options["action"]["choices"] == list(C.ACTIONS)
    assert options["state"]["choices"] == list(C.STATES)
    assert options["frame_max"]["default"] == C.DEFAULT_FRAME_MAX
    assert options["pin_dir"]["default"] == C.DEFAULT_PIN_ROOT
    assert options["lock_timeout"]["default"] == C.DEFAULT_LOCK_TIMEOUT
    assert "_template_path" not in options  # internal: set by the action plugin
    notes = " ".join(yaml.safe_load(rabbit_tc_limit.DOCUMENTATION)["notes"])
    assert "pref %d, handle 0x%x" % (C.FILTER_PREF, C.FILTER_HANDLE) in notes
    assert _doc_options(rabbit_tc_limit_info)["pin_dir"]["default"] == C.DEFAULT_PIN_ROOT
