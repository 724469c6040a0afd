"""The dashboard binds loopback by default; beyond it a password is required, and no page
(so no request carrying the model server's key) is drawn for a visitor who has not signed
in. Streamlit's own test harness runs the real script."""

from __future__ import annotations

import pytest
from streamlit import config as st_config
from streamlit.testing.v1 import AppTest

import raybm.dashboard.pages as pages
from raybm.cli import main
from raybm.dashboard.login import PASSWORD_ENV

PASSWORD = "correct horse battery"


@pytest.fixture
def dashboard(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYBM_RESULTS", str(tmp_path))
    monkeypatch.setenv("RAYBM_SERVE_URL", "http://127.0.0.1:9/never-called")
    monkeypatch.setenv("RAYBM_API_KEY", "the-servers-key-0123456789")
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    before = st_config.get_option("server.address")
    yield lambda: AppTest.from_file(pages.__file__, default_timeout=60)
    st_config.set_option("server.address", before)


def test_on_loopback_the_pages_show_without_a_password(dashboard):
    st_config.set_option("server.address", "127.0.0.1")
    at = dashboard()
    at.run()
    assert not at.exception and at.title[0].value == "Runs and sweeps"


def test_beyond_loopback_without_a_password_nothing_is_shown(dashboard):
    st_config.set_option("server.address", "0.0.0.0")
    at = dashboard()
    at.run()
    assert not at.exception and not at.sidebar.radio  # no page, no page picker
    assert "without a password" in at.error[0].value and PASSWORD_ENV in at.error[0].value


def test_with_a_password_every_visitor_signs_in_first(dashboard, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    st_config.set_option("server.address", "0.0.0.0")
    at = dashboard()
    at.run()
    assert not at.sidebar.radio and at.text_input[0].label == "Password"
    at.text_input[0].input("wrong password!")
    at.button[0].click().run()
    assert at.error[0].value == "Wrong password." and not at.sidebar.radio
    at.text_input[0].input(PASSWORD)
    at.button[0].click().run()
    assert not at.exception and at.title[0].value == "Runs and sweeps" and at.sidebar.radio


def test_raybm_dashboard_refuses_another_host_without_a_password(monkeypatch, capsys):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    assert main(["dashboard", "--host", "0.0.0.0"]) == 2
    assert f"set {PASSWORD_ENV} to a password of at least 12 characters" in capsys.readouterr().err
    monkeypatch.setenv(PASSWORD_ENV, "short")
    assert main(["dashboard", "--host", "10.1.2.3"]) == 2
