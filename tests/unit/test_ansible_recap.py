"""AnsibleRunner's reading of ansible-playbook output: recap counts and first failure per host."""
# ruff: noqa: E501  (verbatim ansible-playbook output)

from __future__ import annotations

import pytest

from orchestrator.adapters.ansible import PlayRecap, parse_output

pytestmark = pytest.mark.unit

OUTPUT = """\
TASK [rbdfleet_agent : Gather minimal facts (service manager, python)] *********
ok: [h1]
fatal: [h2]: UNREACHABLE! => {"changed": false, "msg": "Failed to connect to the host via ssh: Host key verification failed.", "unreachable": true}
ok: [h3]

TASK [rbdfleet_agent : Check that the fresh agent is still running] ************
fatal: [h3]: FAILED! => {"changed": false, "cmd": ["start-stop-daemon"], "rc": 3, "stderr": "", "stdout": ""}
fatal: [h3]: FAILED! => {"msg": "a later failure is not the first"}

PLAY RECAP *********************************************************************
h1                         : ok=16   changed=7    unreachable=0    failed=0    skipped=2    rescued=0    ignored=0
h2                         : ok=0    changed=0    unreachable=1    failed=0    skipped=0    rescued=0    ignored=0
h3                         : ok=15   changed=6    unreachable=0    failed=1    skipped=2    rescued=0    ignored=0
"""


def test_recap_counts_and_first_failure_per_host() -> None:
    recap = parse_output(OUTPUT, ["h1", "h2", "h3"])
    assert recap["h1"] == PlayRecap("h1", ok=16, changed=7, skipped=2)
    assert recap["h1"].succeeded
    assert recap["h2"].unreachable == 1 and not recap["h2"].succeeded
    assert recap["h2"].error == ("UNREACHABLE: Failed to connect to the host via ssh: "
                                 "Host key verification failed.")
    assert recap["h3"].failed == 1
    assert recap["h3"].error == "FAILED: start-stop-daemon exited 3"


def test_a_host_missing_from_the_recap_is_a_failure_not_a_success() -> None:
    recap = parse_output(OUTPUT, ["h1", "h4"])
    assert set(recap) == {"h1", "h4"}
    assert not recap["h4"].succeeded and recap["h4"].error == "not in the play recap"


def test_non_json_failure_bodies_are_kept_short() -> None:
    line = "fatal: [h1]: FAILED! => " + "x" * 1000
    recap = parse_output(line, ["h1"])
    assert recap["h1"].error is not None and len(recap["h1"].error) < 320
