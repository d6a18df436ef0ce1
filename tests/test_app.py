"""app.py itself: its flags, its refusals, and the README it is the Space card of."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from fnmatch import fnmatch

import gradio
import httpx
import pytest
import yaml

import app
from nextstep.loading import options
from nextstep.loading.hub import CHECKPOINT_FILES

from .conftest import ROOT
from .pages import free_port

# ---- flags --------------------------------------------------------------------------


def test_missing_default_model_names_the_flag(monkeypatch, capsys):
    monkeypatch.delenv("NEXTSTEP_MODEL", raising=False)
    monkeypatch.setattr(options, "EMBEDDED_MODEL", ROOT / "assets" / "no-such-model")
    with pytest.raises(SystemExit) as exit_:
        app.parse_args([])
    assert exit_.value.code == 2
    assert "--model" in capsys.readouterr().err


def test_flags_have_environment_equivalents(monkeypatch):
    monkeypatch.setenv("NEXTSTEP_MODEL", "some/model")
    monkeypatch.setenv("NEXTSTEP_DTYPE", "bfloat16")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    args = app.parse_args([])
    assert (args.model, args.dtype, args.port, args.host) == ("some/model", "bfloat16", 7999, "127.0.0.1")
    assert app.parse_args(["--port", "8000"]).port == 8000
    monkeypatch.setenv("NEXTSTEP_THREADS", "3")
    assert app.parse_args([]).threads == 3
    assert app.parse_args([]).cache_limit == 1024
    monkeypatch.setenv("NEXTSTEP_CACHE_MB", "64")
    assert app.parse_args([]).cache_limit == 64


def test_unloadable_model_is_a_message_not_a_traceback():
    done = subprocess.run([sys.executable, "app.py", "--model", "/no/such/model"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "--model" in done.stderr and "Traceback" not in done.stderr


# ---- front page ------------------------------------------------------------------------------


def test_readme_is_a_valid_spaces_card():
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n")
    card = yaml.safe_load(text.split("---\n")[1])
    assert card["sdk"] == "gradio" and card["sdk_version"] == gradio.__version__
    assert (ROOT / card["app_file"]).is_file() and str(card["python_version"]).startswith("3.")
    assert len(card["short_description"]) <= 60
    assert (ROOT / "docs" / "screenshot.png").stat().st_size < 300_000


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = readme.split("## Run the tests")[1].split("```bash\n")[1].split("\n```")[0]
    assert command in (ROOT / ".ci" / "run").read_text()


def test_on_a_space_an_unloadable_model_is_a_page_that_says_why_not_a_crash_loop(tmp_path):
    port = free_port()
    env = dict(os.environ, SPACE_ID="someone/nextstep-studio", GRADIO_SERVER_PORT=str(port), NEXTSTEP_MODEL="/no/such/model")
    server = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # up once the page answers
            assert server.poll() is None, f"app.py exited: {server.stderr.read()}"
            try:
                config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=5).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the page did not come up"
                time.sleep(0.2)
        shown = {c["props"].get("elem_id"): c["props"].get("value") for c in config["components"]}
        assert "/no/such/model" in shown["unavailable-reason"] and "unavailable.fix" in shown["unavailable-fix"]
    finally:
        server.terminate()
        server.wait(30)


def test_the_card_leads_with_nextstep_11_offers_sign_in_and_preloads_only_files_the_loader_reads(monkeypatch):
    card = yaml.safe_load((ROOT / "README.md").read_text().split("---\n")[1])
    assert card["models"][0] == "stepfun-ai/NextStep-1.1" and "stepfun-ai/NextStep-1-Large-Edit" in card["models"]
    assert card["hf_oauth"] is True
    preloaded = {}
    for line in card["preload_from_hub"]:
        repository, files = line.split(" ")
        preloaded[repository] = files.split(",")
    assert set(preloaded) == set(card["models"]), "each model of the card is preloaded"
    for repository, files in preloaded.items():
        assert "config.json" in files
        unread = [name for name in files if not any(fnmatch(name, pattern) for pattern in CHECKPOINT_FILES)]
        assert not unread, f"{repository}: files the loader never reads: {unread}"
    assert {"vae/config.json", "vae/checkpoint.pt"} <= set(preloaded["stepfun-ai/NextStep-1.1"])  # its bundled VAE
    # With no variables set, a (duplicated) Space starts on the embedded model.
    monkeypatch.delenv("NEXTSTEP_MODEL", raising=False)
    assert app.parse_args([]).options.model == str(options.EMBEDDED_MODEL)
