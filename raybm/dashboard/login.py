"""Who may see the dashboard: on loopback, whoever runs it; with ``RAYBM_DASHBOARD_PASSWORD``
set (required on any other address), only a visitor who signed in with it. Until then no
page is drawn, so no request to the model server (which carries ``RAYBM_API_KEY``) is made
on an unknown visitor's behalf."""

from __future__ import annotations

import hmac
import ipaddress
import os

from raybm.errors import RaybmError

PASSWORD_ENV = "RAYBM_DASHBOARD_PASSWORD"
MIN_PASSWORD_CHARS = 12


def is_loopback_address(host: str) -> bool:
    """Whether ``host`` (an address Streamlit binds) reaches this machine only."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_dashboard_host(host: str) -> None:
    """Refuse to start a dashboard beyond loopback without a usable password (RaybmError)."""
    if is_loopback_address(host):
        return
    password = os.environ.get(PASSWORD_ENV, "")
    if len(password) < MIN_PASSWORD_CHARS:
        raise RaybmError(
            f"--host {host} opens the dashboard (its results, and the model server with its API key) "
            f"to other machines: set {PASSWORD_ENV} to a password of at least {MIN_PASSWORD_CHARS} "
            f"characters first, or keep the default --host 127.0.0.1"
        )


def signed_in() -> bool:
    """Draw the sign-in form when one is needed; whether the pages may be drawn."""
    import streamlit as st

    password = os.environ.get(PASSWORD_ENV, "")
    address = str(st.get_option("server.address") or "")
    if not password:
        if is_loopback_address(address):
            return True
        st.error(
            f"This dashboard listens on {address or 'every address'}, beyond this machine, without a password. "
            f"Restart it with {PASSWORD_ENV} set, or on 127.0.0.1."
        )
        return False
    if st.session_state.get("raybm_signed_in"):
        return True
    st.title("raybm")
    with st.form("sign-in"):
        given = st.text_input("Password", type="password")
        sent = st.form_submit_button("Sign in")
    if sent:
        if hmac.compare_digest(given.encode(), password.encode()):
            st.session_state["raybm_signed_in"] = True
            st.rerun()
        st.error("Wrong password.")
    return False
