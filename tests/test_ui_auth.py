"""Strangers stay out: --auth and --auth-file through Gradio's own login, checked before the server starts, and a
warning when the studio is reachable by others without one."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from gradio_client import Client, handle_file

import app
from tests.ui_fixtures import DREAMBENCH, AppServer


@pytest.mark.parametrize("text", ["ana", "ana:", ":secret", " :secret"])
def test_a_login_without_user_or_password_is_refused(text, capsys):
    with pytest.raises(SystemExit):
        app.parse_args(["--auth", text])
    assert "--auth takes user:password" in capsys.readouterr().err


def test_an_auth_file_gives_its_logins_and_names_a_bad_line(tmp_path):
    good = tmp_path / "logins.txt"
    good.write_text("# the studio's users\nana:s3cret\n\nbo:pass:with:colons\n")
    assert app.read_auth_file(str(good)) == [("ana", "s3cret"), ("bo", "pass:with:colons")]
    bad = tmp_path / "bad.txt"
    bad.write_text("ana:s3cret\njust-a-name\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 2: expected user:password"):
        app.read_auth_file(str(bad))
    with pytest.raises(ValueError, match="missing.txt: cannot be read"):
        app.read_auth_file(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nobody yet\n")
    with pytest.raises(ValueError, match="no user:password line"):
        app.read_auth_file(str(tmp_path / "empty.txt"))
    with pytest.raises(SystemExit, match="bad.txt, line 2"):  # refused before anything starts
        app.main(["--auth-file", str(bad), "--profile", "tiny", "--no-preload"])


def test_listening_or_sharing_without_a_login_warns():
    assert "without --auth" in app.access_warning(listen=True, share=False, credentials=[])
    assert "gradio.live" in app.access_warning(listen=False, share=True, credentials=[])
    assert app.access_warning(listen=True, share=False, credentials=[("ana", "x")]) is None
    assert app.access_warning(listen=False, share=False, credentials=[]) is None  # localhost only


@pytest.mark.server
def test_a_server_with_a_login_serves_only_those_who_give_it():
    server = AppServer("--profile", "tiny", "--auth", "ana:s3cret", "--no-preload")
    try:
        server.wait_for_log("login required for 1 user(s)")
        with pytest.raises(urllib.error.HTTPError) as refused:  # the API's config is behind the login
            urllib.request.urlopen(f"{server.url}config", timeout=30)
        assert refused.value.code == 401
        with pytest.raises(Exception):
            Client(server.url, auth=("ana", "wrong"), verbose=False)
        client = Client(server.url, auth=("ana", "s3cret"), verbose=False)
        images, parameters = client.predict(photos=[handle_file(str(DREAMBENCH / "dog" / "00.jpg"))], prompt="a dog",
                                            seed=1, steps=1, api_name="/generate")
        assert len(images) == 1 and parameters[0]["seed"] == 1
    finally:
        server.stop()
