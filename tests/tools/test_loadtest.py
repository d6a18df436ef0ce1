"""The load-test command drives a running app and reports its figures."""

import json

import pytest

from nextstep.tools import loadtest

from ..pages import launched, tiny_services


@pytest.mark.slow
def test_loadtest_reports_throughput_and_latency(capsys):
    with launched(tiny_services()) as url:
        code = loadtest.main(["--url", url, "--clients", "2", "--requests", "2", "--size", "32x32", "--num-sampling-steps", "2", "--json"])
    report = json.loads(capsys.readouterr().out.splitlines()[0])  # the server adds its closing line
    assert code == 0
    assert report["failed"] == 0 and report["requests"] == 4 and report["images"] == 4
    for field in ("images_per_second", "p50_seconds", "p95_seconds"):
        assert report[field] > 0


def test_loadtest_talks_to_this_machine_only():
    with pytest.raises(SystemExit, match="loopback"):
        loadtest.main(["--url", "http://192.168.1.10:7860", "--clients", "1", "--requests", "1"])
