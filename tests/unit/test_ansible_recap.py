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

TASK [rbdfleet_agent : Poll the agent's /v1/health until it names this node] **
fatal: [h1]: FAILED! => {"msg": "ignored: not the host's failure"}
...ignoring
fatal: [h3]: FAILED! => {"msg": "rescued: the rescue's failure is the one that counts"}

TASK [rbdfleet_agent : Fail with the agent's last words] ***********************
fatal: [h3]: FAILED! => {"changed": false, "cmd": ["start-stop-daemon"], "rc": 3, "stderr": "", "stdout": ""}

PLAY RECAP *********************************************************************
h1                         : ok=16   changed=7    unreachable=0    failed=0    skipped=2    rescued=0    ignored=1
h2                         : ok=0    changed=0    unreachable=1    failed=0    skipped=0    rescued=0    ignored=0
h3                         : ok=15   changed=6    unreachable=0    failed=1    skipped=2    rescued=1    ignored=0
h4                         : ok=3    changed=0    unreachable=0    failed=1    skipped=0    rescued=0    ignored=0
"""


def test_recap_counts_and_the_failure_that_stopped_each_host() -> None:
    recap = parse_output(OUTPUT, ["h1", "h2", "h3"])
    assert recap["h1"] == PlayRecap("h1", ok=16, changed=7, skipped=2, ignored=1)
    assert recap["h1"].succeeded
    assert recap["h2"].unreachable == 1 and not recap["h2"].succeeded
    assert recap["h2"].error == ("UNREACHABLE: Failed to connect to the host via ssh: "
                                 "Host key verification failed.")
    assert recap["h3"].failed == 1
    assert recap["h3"].error == "FAILED: start-stop-daemon exited 3"


def test_a_failed_host_without_a_message_still_has_an_error() -> None:
    recap = parse_output(OUTPUT, ["h4"])
    assert recap["h4"].error == "failed, no message" and not recap["h4"].succeeded


def test_a_host_missing_from_the_recap_is_a_failure_not_a_success() -> None:
    recap = parse_output(OUTPUT, ["h1", "h5"])
    assert set(recap) == {"h1", "h5"}
    assert not recap["h5"].succeeded and recap["h5"].error == "not in the play recap"


def test_non_json_failure_bodies_are_kept_short() -> None:
    line = "fatal: [h1]: FAILED! => " + "x" * 1000
    recap = parse_output(line, ["h1"])
    assert recap["h1"].error is not None and len(recap["h1"].error) < 320
