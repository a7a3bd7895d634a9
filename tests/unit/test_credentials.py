"""Model-source credentials: found in a mounted Secret or the environment, never echoed."""

from __future__ import annotations

import os
import pathlib

import pytest

from stoker.agent.credentials import CredentialLookupError, CredentialResolver, env_variable
from stoker.agent.download import CredentialError, Credentials
from stoker.api.modelcache import SecretRef


class NoApi:
    """Objects stand-in for lookups that must not reach the API server."""

    namespace = "team"

    @property
    def core(self) -> object:
        raise AssertionError("the API server was asked for a Secret")


def mount(root: pathlib.Path, secret: str, key: str, value: str) -> None:
    """Lay a Secret out as the kubelet does: keys are symlinks into a timestamped folder."""
    folder = root / secret
    data = folder / "..2026_01_01_00_00_00.000000000"
    data.mkdir(parents=True)
    (data / key).write_text(value)
    os.symlink(data.name, folder / "..data")
    os.symlink(f"..data/{key}", folder / key)


class TestCredentialValues:
    def test_a_bare_token_becomes_a_bearer_header_and_surrounding_whitespace_goes(self) -> None:
        assert Credentials.for_header("Authorization", "  abc123\n").header_value == "Bearer abc123"
        assert Credentials.for_header("Authorization", "Basic dXNlcjpwYXNz").header_value == "Basic dXNlcjpwYXNz"
        assert Credentials.for_header("X-Api-Key", "k").header_value == "k"

    @pytest.mark.parametrize("value", ["SECRET\nline2", "SECRET\r\nX-Evil: 1", "SECR\x00ET", "SECRÉT"],
                             ids=["newline", "crlf-injection", "nul", "non-ascii"])
    def test_a_value_that_cannot_go_into_a_header_is_refused_without_showing_it(self, value: str) -> None:
        with pytest.raises(CredentialError) as info:
            Credentials.for_header("Authorization", value)
        assert "SECR" not in str(info.value) and "position" in str(info.value)

    def test_an_empty_value_is_refused(self) -> None:
        with pytest.raises(CredentialError, match="empty"):
            Credentials.for_header("Authorization", " \n")

    def test_the_value_never_shows_in_repr(self) -> None:
        assert "abc123" not in repr(Credentials.bearer("abc123"))


class TestLookup:
    def test_a_mounted_secret_is_read_from_its_file(self, tmp_path: pathlib.Path) -> None:
        mount(tmp_path, "hub", "token", "from-file\n")
        resolver = CredentialResolver(secrets_dir=tmp_path, environ={})
        creds = resolver.lookup(NoApi(), "sd", SecretRef(name="hub"))
        assert (creds.header_name, creds.header_value) == ("Authorization", "Bearer from-file")

    def test_the_environment_is_used_when_the_secret_is_not_mounted(self, tmp_path: pathlib.Path) -> None:
        ref = SecretRef(name="hub.tokens", key="api-key", header="X-Api-Key")
        assert env_variable(ref.name, ref.key) == "STOKER_SECRET_HUB_TOKENS_API_KEY"
        resolver = CredentialResolver(secrets_dir=tmp_path, environ={"STOKER_SECRET_HUB_TOKENS_API_KEY": "from-env"})
        assert resolver.lookup(NoApi(), "sd", ref).header_value == "from-env"

    def test_the_mounted_file_wins_over_the_environment(self, tmp_path: pathlib.Path) -> None:
        mount(tmp_path, "hub", "token", "from-file")
        resolver = CredentialResolver(secrets_dir=tmp_path, environ={env_variable("hub", "token"): "from-env"})
        assert resolver.lookup(NoApi(), "sd", SecretRef(name="hub")).header_value == "Bearer from-file"

    def test_a_secret_neither_mounted_nor_allowed_through_the_api_says_how_to_provide_it(self, tmp_path: pathlib.Path) -> None:
        with pytest.raises(CredentialLookupError) as info:
            CredentialResolver(secrets_dir=tmp_path, environ={}).lookup(NoApi(), "sd", SecretRef(name="hub"))
        assert info.value.reason == "SecretNotFound" and not info.value.retryable
        message = info.value.message
        assert "team/hub" in message and "ModelCache sd" in message
        assert "agent.credentialSecrets" in message and "STOKER_SECRET_HUB_TOKEN" in message

    def test_a_key_cannot_reach_outside_its_secret_folder(self, tmp_path: pathlib.Path) -> None:
        (tmp_path / "hub").mkdir()
        (tmp_path / "outside").write_text("someone-else's")
        os.symlink("../outside", tmp_path / "hub" / "escape")
        resolver = CredentialResolver(secrets_dir=tmp_path, environ={})
        for key in ("..", ".", "escape"):
            with pytest.raises(CredentialLookupError) as info:
                resolver.lookup(NoApi(), "sd", SecretRef(name="hub", key=key))
            assert info.value.reason == "SecretNotFound", key

    def test_a_mounted_value_with_a_line_break_inside_is_refused_without_showing_it(self, tmp_path: pathlib.Path) -> None:
        mount(tmp_path, "hub", "token", "SECRET\nline2\n")
        with pytest.raises(CredentialLookupError) as info:
            CredentialResolver(secrets_dir=tmp_path, environ={}).lookup(NoApi(), "sd", SecretRef(name="hub"))
        assert info.value.reason == "InvalidCredential"
        assert "SECRET" not in info.value.message and "team/hub" in info.value.message
