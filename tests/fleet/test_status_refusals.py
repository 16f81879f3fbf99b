"""The status table prints the refusal log (rabbit_tc_limit_info's `refusals`)."""

from tests.fleet.test_status_table import entry, render


def test_refusals_are_printed_newest_first():
    refusals = [
        {
            "time": "2026-11-30T13:02:11.482+00:00",
            "client": "198.18.0.2",
            "client_port": 40022,
            "channel": 2,
            "consumers": 3,
            "action": "refuse",
        },
        {
            "time": "2026-11-30T13:01:00.000+00:00",
            "client": "fd00::2",
            "client_port": 40023,
            "channel": 7,
            "consumers": 3,
            "action": "drop",
        },
    ]
    text = render([entry(refusals=refusals, drift=None, attached=True)])
    assert "host/eth0: last 2 refusal(s), newest first" in text
    lines = [line.split() for line in text.splitlines() if "2026-11-30T13:0" in line]
    assert lines == [
        ["2026-11-30T13:02:11.482+00:00", "198.18.0.2:40022", "2", "3", "refuse"],
        ["2026-11-30T13:01:00.000+00:00", "[fd00::2]:40023", "7", "3", "drop"],
    ]


def test_no_refusals_no_section():
    assert "refusal" not in render([entry(refusals=[], drift=None, attached=True)])
    assert "refusal" not in render([entry(drift=None, attached=True)])
