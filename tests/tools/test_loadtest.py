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


@pytest.mark.slow
def test_a_mixed_load_sends_edits_with_uploads_and_varied_settings():
    """With --edits 1 every request is an edit of a picture uploaded with it; with --varied the
    settings change from request to request, within what the page offers."""
    sent, predict = [], loadtest.Client.predict

    def recording(client, *args, **kwargs):
        sent.append(kwargs)
        return predict(client, *args, **kwargs)

    with launched(tiny_services()) as url, pytest.MonkeyPatch.context() as patch:
        patch.setattr(loadtest.Client, "predict", recording)
        report = loadtest.run(url, 1, 3, 300, {}, loadtest.Mix(edits=1.0, varied=True))
    assert report["failed"] == 0 and report["requests"] == 3, report["errors"]
    assert all(kwargs["api_name"] == "/edit" and kwargs["image"] for kwargs in sent)
    assert len({(kwargs["size"], kwargs["num_sampling_steps"]) for kwargs in sent}) > 1


def test_loadtest_talks_to_this_machine_only():
    with pytest.raises(SystemExit, match="loopback"):
        loadtest.main(["--url", "http://192.168.1.10:7860", "--clients", "1", "--requests", "1"])
