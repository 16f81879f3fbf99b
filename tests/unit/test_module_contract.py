"""rabbit_tc_limit's contract, without root: check mode, `changed`, the diff, absent on a
namespace that is gone, and failures with their details.

Like community.general's test_modprobe, only the system layer is replaced: netlink (_tc's
Tc, by a FakeTc holding interfaces and filters), the pinned maps (_pins, by a FakePins
store), the compiler (_compile) and the host checks (_host). The module's own flow
(_runner.run_limit -> _deploy.apply -> _plan) is the production code.
"""

import contextlib
import os

import pytest

from ansible_collections.rabbitguard.limiter.plugins.module_utils import (
    _bpfsys,
    _compile,
    _deploy,
    _host,
    _layout,
    _names,
    _overrides,
    _pins,
    _render,
    _runner,
    _tc,
)
from ansible_collections.rabbitguard.limiter.plugins.module_utils import _constants as C
from ansible_collections.rabbitguard.limiter.plugins.module_utils._errors import LimiterError

PIN_ROOT = C.DEFAULT_PIN_ROOT


class FakeTc:
    """The host's interfaces, clsact qdiscs and ingress filters, as _tc.Tc shows them."""

    def __init__(self, interfaces=("eth0",), default=("eth0",)):
        self.interfaces = list(interfaces)
        self.default = list(default)
        self.clsact = set()
        self.filters = {}  # ifname -> [filter dicts]
        self.calls = []

    def interface_index(self, name):
        if name not in self.interfaces:
            raise LimiterError("interface %s not found" % name)
        return self.interfaces.index(name) + 1

    def interface_exists(self, name):
        return name in self.interfaces

    def has_ethernet_header(self, name):
        return True

    def default_route_interfaces(self):
        return list(self.default)

    def _hook(self, hook):
        """Ingress filters in self.filters, egress ones (the pair's other half) apart."""
        if hook == "ingress":
            return self.filters
        return self.__dict__.setdefault("egress_filters", {})

    def list_filters(self, ifname, hook="ingress"):
        return list(self._hook(hook).get(ifname, []))

    def find_filter(self, ifname, pref, handle, hook="ingress"):
        found = [
            f for f in self.list_filters(ifname, hook) if (f["pref"], f["handle"]) == (pref, handle)
        ]
        return found[0] if found else None

    def ensure_clsact(self, ifname):
        self.calls.append(("ensure_clsact", ifname))
        if ifname in self.clsact:
            return False
        self.clsact.add(ifname)
        return True

    def remove_clsact_if_empty(self, ifname):
        self.calls.append(("remove_clsact", ifname))
        if self.filters.get(ifname) or self._hook("egress").get(ifname):
            return False
        self.clsact.discard(ifname)
        return True

    def _call(self, what, hook, *args):
        self.calls.append((what if hook == "ingress" else what + "-" + hook,) + args)

    def attach(self, ifname, prog_fd, name, pref, handle, hook="ingress"):
        self._call("attach", hook, ifname, name)
        rest = [
            f for f in self.list_filters(ifname, hook) if (f["pref"], f["handle"]) != (pref, handle)
        ]
        new = {"pref": pref, "handle": handle, "kind": "bpf", "protocol": _tc.ETH_P_ALL}
        new.update(name=name, prog_id=prog_fd, direct_action=True)
        self._hook(hook)[ifname] = sorted(rest + [new], key=lambda f: f["pref"])

    def detach(self, ifname, pref, handle, hook="ingress"):
        self._call("detach", hook, ifname)
        before = self.list_filters(ifname, hook)
        self._hook(hook)[ifname] = [f for f in before if (f["pref"], f["handle"]) != (pref, handle)]
        return len(before) != len(self._hook(hook)[ifname])

    def delete_filter(self, ifname, kind, protocol, pref, handle, hook="ingress"):
        self._call("delete_filter", hook, ifname, kind)
        self.detach(ifname, pref, handle, hook)


class FakePins:
    """bpffs under the pin root: {pin dir: pinned config (None: maps without a config)}."""

    def __init__(self):
        self.pinned = {}
        self.overrides = {}  # pin dir -> the overrides map's entries (normal form)
        self.calls = []

    def pinned_namespaces(self, pin_root):
        root = _names.layout_root(pin_root) + "/"
        n = len(root)
        return sorted({p[n:].split("/")[0] for p in self.pinned if p.startswith(root)})

    def pinned_interfaces(self, pin_root, ns_key):
        root = _names.namespace_dir(pin_root, ns_key) + "/"
        n = len(root)
        return sorted(_names.from_path_component(p[n:]) for p in self.pinned if p.startswith(root))

    def pins_present(self, pin):
        return pin in self.pinned

    def read_config(self, pin):
        config = self.pinned.get(pin)
        if config is None:
            return None
        return dict(config, overrides=list(self.overrides.get(pin, [])))

    def sync_overrides(self, pin, wanted):
        """_overrides.sync: the pinned overrides map made to hold exactly `wanted`."""
        self.calls.append(("sync_overrides", pin))
        changed = self.overrides.get(pin, []) != wanted
        self.overrides[pin] = list(wanted)
        return changed

    def write_config(self, pin, config, digest, created_clsact):
        self.pinned[pin] = dict(
            {k: config[k] for k in ("port", "limit", "action", "l2", "frame_max", "strict")},
            digest=digest,
            created_clsact=created_clsact,
        )

    def unpin_interface(self, pin):
        self.pinned.pop(pin, None)
        self.overrides.pop(pin, None)

    def unpin(self, pin, names):
        self.pinned.pop(pin, None)
        self.overrides.pop(pin, None)

    def program_uses_pins(self, pin, prog_id):
        return prog_id not in getattr(self, "foreign_maps", ())

    def held_pins(self, pin):
        """_pins.HeldPins: what is pinned for pin now, which repin() puts back."""
        return FakeHeldPins(self, pin)

    def check_tree(self, pin_root):
        pass

    def unpin_other_layouts(self, pin):
        return []

    def compile_isolated(self, source, pin):
        """BCC pins the maps (no config yet) and loads a program: its fd is its id here."""
        self.pinned.setdefault(pin, None)
        self.loaded = getattr(self, "loaded", 100) + 1
        return self.loaded

    def compile_programs_isolated(self, source, pin):
        """The ingress, egress and continuation programs of one source."""
        return _compile.Programs(*(self.compile_isolated(source, pin) for _ in range(3)))

    def missing(self, pin):
        return [] if pin in self.pinned else list(_layout.MAP_NAMES)

    def continuation_id(self, pin):
        """The last continuation put in pin's walk_more (0: none yet)."""
        fills = [more for p, more, _ in getattr(self, "continuations", ()) if p == pin]
        return fills[-1] if fills else 0

    def egress_slot_id(self, pin):
        """The last egress program put in pin's walk_more egress slot (0: none yet)."""
        fills = [prog for p, prog, _ in getattr(self, "egress_slots", ()) if p == pin]
        return fills[-1] if fills else 0

    def is_continuation_of(self, prog_id, more_id):
        return more_id == prog_id + 2  # loaded together: ingress, egress, more

    def fill_continuation(self, pin, more_fd, slot=0):
        """Records the continuation put in walk_more, and the ingress programs attached
        at that moment (fds are ids here); the egress slot's fills, with the egress
        programs attached then, in egress_slots."""
        attached = [
            f["prog_id"]
            for tc in self.namespaces.values()
            for filters in tc._hook("egress" if slot else "ingress").values()
            for f in filters
        ]
        record = "egress_slots" if slot else "continuations"
        self.__dict__.setdefault(record, []).append((pin, more_fd, attached))


class FakeHeldPins:
    def __init__(self, pins, pin):
        self.pins, self.pin = pins, pin
        self.pinned = {pin: pins.pinned[pin]} if pin in pins.pinned else {}
        self.overrides = {pin: list(pins.overrides[pin])} if pin in pins.overrides else {}

    def repin(self):
        self.pins.calls.append(("repin", self.pin))
        self.pins.pinned.update(self.pinned)
        self.pins.overrides.update(self.overrides)

    def close(self):
        pass


class Exit(Exception):
    def __init__(self, failed, result):
        super().__init__(result.get("msg"))
        self.failed, self.result = failed, result


class FakeModule:
    """What _runner uses of AnsibleModule: params, check mode, diff mode, exit/fail."""

    _name = "rabbit_tc_limit"

    def __init__(self, check_mode=False, diff=True, **params):
        self.params = dict(
            state="present",
            interfaces=None,
            port=C.DEFAULT_PORT,
            limit=C.DEFAULT_LIMIT,
            action=C.MODULE_DEFAULT_ACTION,
            frame_max=C.DEFAULT_FRAME_MAX,
            strict=C.DEFAULT_STRICT,
            netns=None,
            pin_dir=PIN_ROOT,
            kernel_headers=None,
            lock_timeout=C.DEFAULT_LOCK_TIMEOUT,
            # The fake host has no broker to ask (tests/unit/test_seed.py covers seeding).
            seed_from_broker=False,
            broker_node=None,
            overrides=[],
            _template_path=None,
        )
        self.params.update(params)
        self.check_mode, self._diff = check_mode, diff
        self._warnings = []

    # As AnsibleModule does: what module.warn collected is the result's "warnings".
    def warn(self, warning):
        self._warnings.append(warning)

    def _with_warnings(self, result):
        return dict(result, warnings=list(self._warnings)) if self._warnings else result

    def exit_json(self, **result):
        raise Exit(False, self._with_warnings(result))

    def fail_json(self, **result):
        raise Exit(True, self._with_warnings(result))


@pytest.fixture
def host(monkeypatch):
    """One FakeTc per namespace (None: the host's) and one FakePins; the rest is real."""
    pins = FakePins()
    namespaces = {None: FakeTc()}

    @contextlib.contextmanager
    def open_netns(netns=None):
        if netns not in namespaces:
            raise LimiterError("network namespace %s not found" % netns)
        yield namespaces[netns]

    monkeypatch.setattr(_tc, "open_netns", open_netns)
    for name in ("pinned_namespaces", "pinned_interfaces", "pins_present", "read_config"):
        monkeypatch.setattr(_pins, name, getattr(pins, name))
    for name in (
        "write_config",
        "unpin_interface",
        "unpin",
        "program_uses_pins",
        "check_tree",
        "unpin_other_layouts",
        "missing",
        "continuation_id",
        "egress_slot_id",
        "is_continuation_of",
    ):
        monkeypatch.setattr(_pins, name, getattr(pins, name))
    monkeypatch.setattr(_pins, "HeldPins", pins.held_pins)
    monkeypatch.setattr(_compile, "compile_isolated", pins.compile_isolated)
    monkeypatch.setattr(_overrides, "sync", pins.sync_overrides)
    monkeypatch.setattr(_compile, "compile_programs_isolated", pins.compile_programs_isolated)
    monkeypatch.setattr(_compile, "fill_continuation", pins.fill_continuation)
    monkeypatch.setattr(_bpfsys, "close", lambda fd: None)
    monkeypatch.setattr(_bpfsys, "prog_get_fd_by_id", lambda prog_id: prog_id)  # fds are ids
    monkeypatch.setattr(_deploy, "_program_id", lambda fd: fd)
    monkeypatch.setattr(_host, "check_bpffs", lambda: None)
    monkeypatch.setattr(_host, "host_lock", lambda timeout: contextlib.nullcontext())
    monkeypatch.setattr(_host, "check_kernel_headers", lambda tree: tree)
    monkeypatch.setattr(_runner, "check_root", lambda module: None)
    monkeypatch.setattr(_runner, "ensure_python_libs", lambda module, names: None)
    monkeypatch.setattr(_names, "resolve_namespace", lambda key: (key == _names.HOST_KEY, None))
    pins.namespaces = namespaces
    return pins


def run(check_mode=False, **params):
    with pytest.raises(Exit) as done:
        _runner.run_limit(FakeModule(check_mode=check_mode, **params))
    return done.value


def state(pins):
    """Everything the module could have changed: pins, filters, qdiscs."""
    tcs = pins.namespaces
    return (
        {p: dict(c) if c else c for p, c in pins.pinned.items()},
        {
            ns: ({i: list(f) for i, f in tc.filters.items()}, set(tc.clsact))
            for ns, tc in tcs.items()
        },
    )


def entry(outcome, ifname="eth0", ns="host"):
    return outcome.result["interfaces"][ns][ifname]


def test_check_mode_predicts_the_create_and_changes_nothing(host):
    before = state(host)
    outcome = run(check_mode=True, limit=4)

    assert not outcome.failed and outcome.result["changed"] is True
    assert entry(outcome)["action"] == "create" and entry(outcome)["compiled"] is False
    assert outcome.result["diff"] == {
        "before": {"host/eth0": None},
        "after": {
            "host/eth0": {
                "port": C.DEFAULT_PORT,
                "limit": 4,
                "action": C.MODULE_DEFAULT_ACTION,
                "frame_max": C.DEFAULT_FRAME_MAX,
                "strict": C.DEFAULT_STRICT,
                "l2": "ethernet",
                "overrides": [],
            }
        },
    }
    assert state(host) == before
    assert host.namespaces[None].calls == []


def test_changed_exactly_when_the_plan_is_not_empty(host):
    first = run(limit=4)
    assert first.result["changed"] is True and entry(first)["action"] == "create"
    assert entry(first)["compiled"] is True
    (ours,) = host.namespaces[None].filters["eth0"]
    assert (ours["pref"], ours["handle"]) == (C.FILTER_PREF, C.FILTER_HANDLE)
    assert entry(first)["program_id"] == ours["prog_id"]

    again = run(limit=4)
    assert again.result["changed"] is False
    assert entry(again) == dict(entry(first), action="none", compiled=False)
    assert again.result["diff"]["before"] == again.result["diff"]["after"]

    checked = run(check_mode=True, limit=4)
    assert checked.result["changed"] is False and entry(checked)["action"] == "none"


def test_a_change_is_a_replace_with_before_and_after_per_interface(host):
    host.namespaces[None].interfaces.append("eth1")
    run(limit=4, interfaces=["eth0", "eth1"])
    before = state(host)

    checked = run(check_mode=True, limit=6, interfaces=["eth0", "eth1"])
    assert state(host) == before
    applied = run(limit=6, interfaces=["eth0", "eth1"])

    for outcome in (checked, applied):
        assert outcome.result["changed"] is True
        for label in ("host/eth0", "host/eth1"):
            assert outcome.result["diff"]["before"][label]["limit"] == 4
            assert outcome.result["diff"]["after"][label]["limit"] == 6
    assert entry(checked)["program_id"] == before[1][None][0]["eth0"][0]["prog_id"]
    assert entry(applied)["program_id"] != entry(checked)["program_id"]
    assert state(host) != before


def test_an_interface_dropped_from_the_list_is_removed(host):
    host.namespaces[None].interfaces.append("eth1")
    run(interfaces=["eth0", "eth1"])

    outcome = run(interfaces=["eth0"])

    assert outcome.result["changed"] is True
    assert entry(outcome, "eth1")["action"] == "remove"
    assert outcome.result["diff"]["after"]["host/eth1"] is None
    assert host.namespaces[None].filters["eth1"] == []
    assert host.pinned_interfaces(PIN_ROOT, "host") == ["eth0"]


def test_absent_predicts_in_check_mode_then_removes_all_we_made(host):
    run()
    before = state(host)

    checked = run(check_mode=True, state="absent")
    assert checked.result["changed"] is True and entry(checked)["action"] == "remove"
    assert checked.result["diff"]["after"] == {"host/eth0": None}
    assert checked.result["diff"]["before"]["host/eth0"]["limit"] == C.DEFAULT_LIMIT
    assert state(host) == before

    removed = run(state="absent")
    assert removed.result["changed"] is True
    assert host.pinned == {} and host.namespaces[None].filters["eth0"] == []
    assert host.namespaces[None].clsact == set()  # we made it, it is empty: gone

    again = run(state="absent")
    assert again.result == {"changed": False, "interfaces": {}, "diff": again.result["diff"]}


def test_a_removal_that_fails_half_way_puts_every_interface_back(host, monkeypatch):
    """eth0 is removed in full, then eth1's ingress filter is detached and its egress detach
    fails: both interfaces get their filters (the same programs), qdisc and pins back."""
    tc = host.namespaces[None]
    tc.interfaces.append("eth1")
    run(interfaces=["eth0", "eth1"])
    before = (state(host), dict(tc.egress_filters))
    detach = tc.detach

    def egress_detach_fails(ifname, pref, handle, hook="ingress"):
        if (ifname, hook) == ("eth1", "egress"):
            raise LimiterError("detaching the egress filter from eth1: the kernel said no")
        return detach(ifname, pref, handle, hook)

    monkeypatch.setattr(tc, "detach", egress_detach_fails)
    outcome = run(state="absent")

    assert outcome.failed and outcome.result["changed"] is False
    assert outcome.result["msg"] == "detaching the egress filter from eth1: the kernel said no"
    assert (state(host), tc.egress_filters) == before


def test_a_removal_that_cannot_be_put_back_in_full_says_what_is_left(host, monkeypatch):
    tc = host.namespaces[None]
    tc.interfaces.append("eth1")
    run(interfaces=["eth0", "eth1"])
    pinned = dict(host.pinned)
    detach = tc.detach

    def egress_detach_fails(ifname, pref, handle, hook="ingress"):
        if (ifname, hook) == ("eth1", "egress"):
            raise LimiterError("detaching the egress filter from eth1: the kernel said no")
        return detach(ifname, pref, handle, hook)

    def attach_fails(*args, **kwargs):
        raise LimiterError("attaching: the kernel said no")

    monkeypatch.setattr(tc, "detach", egress_detach_fails)
    monkeypatch.setattr(tc, "attach", attach_fails)
    outcome = run(state="absent")

    msg = outcome.result["msg"]
    assert msg.startswith("detaching the egress filter from eth1: the kernel said no; ")
    assert "NOT as before" in msg
    assert "eth0: ingress filter: attaching: the kernel said no; egress filter: attaching" in msg
    assert "eth1: ingress filter: attaching: the kernel said no" in msg
    assert host.pinned == pinned  # what could be put back was


def test_absent_on_a_namespace_that_is_gone_removes_its_pins(host):
    host.namespaces["blue"] = FakeTc()
    run(netns="blue")
    del host.namespaces["blue"]  # `ip netns del blue`: its interfaces and filters went too
    assert host.pinned_namespaces(PIN_ROOT) == ["netns-blue"]

    checked = run(check_mode=True, state="absent")
    assert entry(checked, ns="netns-blue")["action"] == "remove"
    assert entry(checked, ns="netns-blue")["reason"] == "the namespace is gone"
    assert host.pinned_namespaces(PIN_ROOT) == ["netns-blue"]

    removed = run(state="absent")
    assert removed.result["changed"] is True
    assert removed.result["diff"]["before"]["netns-blue/eth0"]["limit"] == C.DEFAULT_LIMIT
    assert host.pinned == {}


def test_a_compile_failure_carries_the_compiler_output(host, monkeypatch):
    def broken(source, pin):
        raise LimiterError(
            "compiling and loading the limiter (pins in %s): it failed: error: boom" % pin,
            {"compiler_output": "line 1\nerror: boom\n"},
        )

    monkeypatch.setattr(_compile, "compile_programs_isolated", broken)
    outcome = run()

    assert outcome.failed and "error: boom" in outcome.result["msg"]
    assert outcome.result["stderr"] == "line 1\nerror: boom\n"
    assert outcome.result["context"]["compiler_output"] == "line 1\nerror: boom\n"
    assert host.pinned == {} and host.namespaces[None].filters.get("eth0", []) == []


def test_the_template_the_action_plugin_sent_is_the_one_compiled(host, tmp_path, monkeypatch):
    """The action plugin copies the collection's template to the host and passes its path."""
    sent = tmp_path / "rabbit_limiter.c.j2"
    sent.write_text(_render.read_template().replace("#define", "/* sent */\n#define", 1))
    compiled = []
    compile_programs = host.compile_programs_isolated
    monkeypatch.setattr(
        _compile,
        "compile_programs_isolated",
        lambda source, pin: compiled.append(source) or compile_programs(source, pin),
    )

    outcome = run(_template_path=str(sent))

    assert not outcome.failed, outcome.result
    assert len(compiled) == 1 and "/* sent */" in compiled[0]


def test_a_template_path_that_cannot_be_read_fails_and_changes_nothing(host, tmp_path):
    before = state(host)
    missing = tmp_path / "gone.c.j2"

    outcome = run(_template_path=str(missing))

    assert outcome.failed
    assert outcome.result["msg"].startswith("the classifier template the action plugin sent")
    assert str(missing) in outcome.result["msg"]
    assert state(host) == before


def test_a_bad_option_fails_before_anything_is_touched(host):
    outcome = run(limit=70000)
    assert outcome.failed and "limit must be between" in outcome.result["msg"]
    assert outcome.result["changed"] is False and outcome.result["interfaces"] == {}
    assert host.namespaces[None].calls == []


def test_the_boot_program_takes_the_same_path(host):
    """_reattach.reattach is _deploy.apply: the module then finds nothing to change."""
    from ansible_collections.rabbitguard.limiter.plugins.module_utils import _reattach, _render

    params = dict(_reattach.DEFAULTS, limit=3, state="present")
    done = _reattach.reattach(params, _render.read_template())
    assert done == [("host", "eth0", "create", None)]
    assert run(limit=3).result["changed"] is False


def test_the_boot_program_says_when_it_could_not_seed_and_still_attaches(
    host, tmp_path, monkeypatch, capsys
):
    """At boot, a broker that cannot be asked is a warning on stderr (the journal), the
    limiter is attached all the same and the exit status is 0."""
    from ansible_collections.rabbitguard.limiter.plugins.module_utils import (
        _reattach,
        _render,
        _seed,
    )

    monkeypatch.setattr(_seed.shutil, "which", lambda name: None)
    monkeypatch.setattr(_reattach, "ensure_bpffs", lambda: False)
    config = tmp_path / "limiter.json"
    config.write_text('{"limit": 3, "action": "refuse"}')
    assert _reattach.main([str(config)], template=_render.read_template()) == 0
    out, err = capsys.readouterr()
    assert "host/eth0: create" in out, out
    assert err == (
        "rabbitguard-reattach: warning: consumer counts not seeded from the broker, counting "
        "starts at zero: rabbitmqctl is not installed on this host\n"
    ), err
    assert run(limit=3, action="refuse").result["changed"] is False


def test_the_pin_store_fake_speaks_the_real_layout():
    """FakePins reads names back the way _names writes them (an escaped VLAN name too)."""
    pins = FakePins()
    pins.pinned[_names.pin_dir(PIN_ROOT, "host", "eth0.100")] = None
    assert pins.pinned_interfaces(PIN_ROOT, "host") == ["eth0.100"]
    assert os.path.dirname(_names.pin_dir(PIN_ROOT, "host", "x")) == _names.namespace_dir(
        PIN_ROOT, "host"
    )


def test_absent_with_the_netns_of_a_namespace_that_is_gone_removes_its_pins(host):
    host.namespaces["gone"] = FakeTc()
    run(netns="gone")
    del host.namespaces["gone"]

    outcome = run(state="absent", netns="gone")

    assert not outcome.failed, outcome.result
    assert entry(outcome, ns="netns-gone")["reason"] == "the namespace is gone"
    assert host.pinned == {}


def test_a_pin_dir_outside_bpffs_is_refused_for_every_state(host):
    run()
    before = state(host)
    for params in (dict(), dict(state="absent"), dict(state="absent", interfaces=["eth0"])):
        outcome = run(pin_dir="/tmp/rabbitguard", **params)
        assert outcome.failed and "pin_dir must be a directory under" in outcome.result["msg"]
    assert state(host) == before


def test_a_filter_before_ours_is_a_warning(host):
    tc = host.namespaces[None]
    tc.filters["eth0"] = [
        {"pref": 1, "handle": 1, "kind": "u32", "protocol": 3, "name": None, "prog_id": None}
    ]
    outcome = run()
    (warning,) = outcome.result["warnings"]
    assert "eth0: a u32 filter at pref 1" in warning and "bypasses the limiter" in warning
    assert run().result["warnings"] == [warning]  # every run says so, changed or not


def test_a_program_that_does_not_use_the_pins_is_repaired(host):
    first = run()
    host.foreign_maps = {entry(first)["program_id"]}

    outcome = run()

    assert outcome.result["changed"] is True
    assert entry(outcome)["action"] == "repair"
    assert entry(outcome)["reason"] == "the attached program does not use the pinned maps"
    assert entry(outcome)["program_id"] != entry(first)["program_id"]


OVERRIDES = [{"source": "198.18.0.0/24", "limit": 2}, {"source": "fd00::/64", "limit": 7}]


def test_an_overrides_change_is_an_update_no_compile_same_program(host):
    first = run(limit=4)
    program = entry(first)["program_id"]

    predicted = run(check_mode=True, limit=4, overrides=OVERRIDES)
    assert predicted.result["changed"] is True and entry(predicted)["action"] == "update"
    assert host.overrides[entry(first)["pin_dir"]] == []  # check mode wrote nothing

    done = run(limit=4, overrides=OVERRIDES)
    assert done.result["changed"] is True and entry(done)["action"] == "update"
    assert entry(done)["compiled"] is False and entry(done)["program_id"] == program
    (ours,) = host.namespaces[None].filters["eth0"]
    assert ours["prog_id"] == program
    assert done.result["diff"]["before"]["host/eth0"]["overrides"] == []
    assert done.result["diff"]["after"]["host/eth0"]["overrides"] == OVERRIDES
    assert host.overrides[entry(done)["pin_dir"]] == OVERRIDES

    assert run(limit=4, overrides=list(reversed(OVERRIDES))).result["changed"] is False
    cleared = run(limit=4, overrides=[])
    assert entry(cleared)["action"] == "update" and host.overrides[entry(cleared)["pin_dir"]] == []


def test_a_build_writes_the_overrides_too(host):
    done = run(limit=4, overrides=OVERRIDES)
    assert entry(done)["action"] == "create" and host.overrides[entry(done)["pin_dir"]] == OVERRIDES
    replaced = run(limit=5, overrides=OVERRIDES[:1])
    assert entry(replaced)["action"] == "replace"
    assert host.overrides[entry(replaced)["pin_dir"]] == OVERRIDES[:1]


@pytest.mark.parametrize(
    "bad", [[{"source": "198.18.0.1/24", "limit": 2}], [{"source": "x", "limit": 1}], "10/8"]
)
def test_bad_overrides_fail_naming_the_option_and_change_nothing(host, bad):
    run(limit=4, overrides=OVERRIDES)
    before = (state(host), dict(host.overrides))
    outcome = run(limit=4, overrides=bad)
    assert outcome.failed and outcome.result["msg"].startswith("overrides")
    assert (state(host), dict(host.overrides)) == before


def test_the_boot_program_restores_overrides(host):
    from ansible_collections.rabbitguard.limiter.plugins.module_utils import _reattach, _render

    params = dict(_reattach.DEFAULTS, limit=3, overrides=OVERRIDES, state="present")
    assert _reattach.reattach(params, _render.read_template()) == [("host", "eth0", "create", None)]
    assert run(limit=3, overrides=OVERRIDES).result["changed"] is False


# walk_more's two slots: the fills FakePins.fill_continuation records for it, the program
# put in (its id's offset from the pair's ingress program: ingress, egress, more) and the
# program attached on that slot's hook at the time (offset likewise).
SLOTS = pytest.mark.parametrize(
    "fills, program, attached",
    [("continuations", 2, 0), ("egress_slots", 1, 1)],
    ids=["continuation", "egress"],
)


@SLOTS
def test_a_walk_more_slot_is_filled_only_once_its_program_is_attached(
    host, fills, program, attached
):
    """The walk_more array is pinned and shared: the program being replaced walks long
    segments on (the continuation, or the egress program in itself) through it until the
    new one is attached, so each slot is filled after its hook's attach, never before (and
    never when the deploy failed)."""
    first = run(limit=4)
    second = run(limit=6)

    done = getattr(host, fills)
    assert len(done) == 2
    for outcome, (pin, prog, on_hook) in zip((first, second), done):
        assert pin == entry(outcome)["pin_dir"]
        assert prog == entry(outcome)["program_id"] + program  # its own pair's
        assert on_hook == [entry(outcome)["program_id"] + attached]


def test_a_failed_attach_leaves_the_old_continuation(host, monkeypatch):
    run(limit=4)
    (first,) = host.continuations

    def broken(*args, **kwargs):
        raise LimiterError("attaching: boom")

    monkeypatch.setattr(host.namespaces[None], "attach", broken)
    assert run(limit=6).failed
    # No new continuation ever went in (putting the old one back is all the undo did).
    assert {more for _pin, more, _attached in host.continuations} == {first[1]}


@SLOTS
def test_an_egress_attach_that_fails_puts_the_old_pair_and_walk_more_slot_back(
    host, monkeypatch, fills, program, attached
):
    """The new ingress program and its continuation were in when the egress half failed:
    the old ingress program goes back, then its own continuation, the old egress program,
    then its slot."""
    first = entry(run(limit=4))
    tc = host.namespaces[None]
    before = (dict(tc.filters), dict(tc.egress_filters), dict(host.pinned))
    attach = tc.attach

    def egress_fails(ifname, prog_fd, name, pref, handle, hook="ingress"):
        if hook == "egress" and prog_fd != first["program_id"] + 1:
            raise LimiterError("attaching the egress filter: boom")
        attach(ifname, prog_fd, name, pref, handle, hook)

    monkeypatch.setattr(tc, "attach", egress_fails)
    assert run(limit=6).failed
    (_pin, prog, on_hook) = getattr(host, fills)[-1]
    assert prog == first["program_id"] + program
    assert on_hook == [first["program_id"] + attached]
    assert (tc.filters, tc.egress_filters, host.pinned) == before


def test_an_undo_that_cannot_be_done_in_full_says_what_is_left(host, monkeypatch):
    tc = host.namespaces[None]
    attach = tc.attach

    def egress_fails(ifname, prog_fd, name, pref, handle, hook="ingress"):
        if hook == "egress":
            raise LimiterError("attaching the egress filter: boom")
        attach(ifname, prog_fd, name, pref, handle, hook)

    def detach_fails(*args, **kwargs):
        raise LimiterError("detaching: the kernel said no")

    monkeypatch.setattr(tc, "attach", egress_fails)
    monkeypatch.setattr(tc, "detach", detach_fails)
    outcome = run(limit=4)

    assert outcome.failed
    msg = outcome.result["msg"]
    assert msg.startswith("attaching the egress filter: boom; ")
    assert "NOT as before" in msg and "ingress filter: detaching: the kernel said no" in msg
    assert host.pinned == {}  # what could be undone was


class RealFdHeldPins(FakeHeldPins):
    """FakeHeldPins holding one real fd, as _pins.HeldPins holds every pin open."""

    def __init__(self, pins, pin):
        super().__init__(pins, pin)
        self.fd = os.open(os.devnull, os.O_RDONLY)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def open_fds():
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("wanted", ["present", "absent"])
def test_a_run_that_fails_taking_its_undo_leaves_no_fd_open(host, monkeypatch, wanted):
    """Before touching an interface the run holds open the programs in its slots (and, to
    remove it, every pin). When reading walk_more fails after some of those were opened, the
    run fails naming the cause, changes nothing, and holds nothing open: a long-lived caller
    (the boot program, a test) keeps no program or map alive by a leaked fd."""
    run(limit=4)
    pinned = state(host)
    monkeypatch.setattr(_bpfsys, "prog_get_fd_by_id", lambda prog_id: os.open(os.devnull, 0))
    monkeypatch.setattr(_bpfsys, "close", os.close)
    monkeypatch.setattr(_pins, "HeldPins", lambda pin: RealFdHeldPins(host, pin))

    def unreadable(pin, slot=0):
        raise LimiterError("opening pinned BPF object %s/walk_more: Permission denied" % pin)

    monkeypatch.setattr(_pins, "continuation_id", unreadable)
    before = open_fds()
    outcome = run(state=wanted, limit=6)
    assert outcome.failed and "walk_more: Permission denied" in outcome.result["msg"]
    assert open_fds() - before == set()  # none left open
    assert state(host) == pinned


def test_held_pins_that_cannot_open_every_pin_leave_no_fd_open(tmp_path, monkeypatch):
    """_pins.HeldPins opens every pin of an interface; one it cannot open fails it, and the
    ones already opened are closed."""
    pin = tmp_path / "v9" / "host" / "eth0"
    pin.mkdir(parents=True)
    for name in ("conns", "counters", "walk_more"):
        (pin / name).touch()

    def obj_get(path):
        if path.endswith("walk_more"):
            raise LimiterError("opening pinned BPF object %s: Permission denied" % path)
        return os.open(os.devnull, os.O_RDONLY)

    monkeypatch.setattr(_bpfsys, "obj_get", obj_get)
    before = open_fds()
    with pytest.raises(LimiterError, match="walk_more: Permission denied"):
        _pins.HeldPins(str(pin))
    assert open_fds() - before == set()
