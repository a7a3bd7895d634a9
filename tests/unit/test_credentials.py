"""Model-source credentials: each Secret only for its declared hosts, found in a mount, a declared
variable or the API, never echoed."""

from __future__ import annotations

import os
import pathlib

import pydantic
import pytest

from stoker.agent.credentials import CredentialGrant, CredentialLookupError, CredentialResolver, check_grants
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


URL = "https://models.example.com/sd.safetensors"
HUB = CredentialGrant(secret="hub", hosts=("models.example.com",))


def resolver(*grants: CredentialGrant, **kwargs: object) -> CredentialResolver:
    return CredentialResolver.from_grants(grants or (HUB,), **kwargs)  # type: ignore[arg-type]


class TestHostBinding:
    def test_a_secret_goes_only_to_the_hosts_declared_for_it(self, tmp_path: pathlib.Path) -> None:
        mount(tmp_path, "hub", "token", "from-file")
        r = resolver(CredentialGrant(secret="hub", hosts=("models.example.com", ".mirror.example")),
                     secrets_dir=tmp_path, environ={})
        for url in (URL, "https://mirror.example/x", "https://eu.mirror.example/x", "https://MODELS.example.com./x"):
            assert r.lookup(NoApi(), "sd", SecretRef(name="hub"), url).header_value == "Bearer from-file", url

    @pytest.mark.parametrize("url", [
        "https://evil.example/steal", "https://models.example.com.evil.example/x", "https://xmirror.example/x",
        "https://127.0.0.2/x", "not a url", "https://bücher.example/x",
    ])
    def test_a_url_on_another_host_is_refused_before_the_secret_is_read(self, url: str) -> None:
        class Unreadable:  # neither a mount nor the environment nor the API may be touched
            namespace = "team"

            @property
            def core(self) -> object:
                raise AssertionError("the API server was asked for a Secret")

        r = CredentialResolver.from_grants([HUB], secrets_dir=pathlib.Path("/nonexistent"), api_secrets=frozenset({"hub"}),
                                           environ=BoomEnviron())
        with pytest.raises(CredentialLookupError) as info:
            r.lookup(Unreadable(), "sd", SecretRef(name="hub"), url)
        assert info.value.reason == "CredentialHostNotAllowed" and not info.value.retryable
        assert "models.example.com" in info.value.message and "nothing was sent" in info.value.message

    def test_a_secret_that_is_not_declared_is_never_used_even_for_any_host(self, tmp_path: pathlib.Path) -> None:
        mount(tmp_path, "other", "token", "value")
        with pytest.raises(CredentialLookupError) as info:
            resolver(secrets_dir=tmp_path, environ={}).lookup(NoApi(), "sd", SecretRef(name="other"), URL)
        assert info.value.reason == "CredentialNotAllowed"
        assert "team/other" in info.value.message and "agent.credentialSecrets" in info.value.message

    def test_with_no_grants_at_all_no_credential_is_ever_sent(self, tmp_path: pathlib.Path) -> None:
        mount(tmp_path, "hub", "token", "value")
        with pytest.raises(CredentialLookupError) as info:
            CredentialResolver(secrets_dir=tmp_path, environ={}).lookup(NoApi(), "sd", SecretRef(name="hub"), URL)
        assert info.value.reason == "CredentialNotAllowed"

    @pytest.mark.parametrize("hosts", [(), ("",), ("exa mple.com",), ("https://x.example",), (".",)])
    def test_a_grant_needs_real_host_names(self, hosts: tuple[str, ...]) -> None:
        with pytest.raises(pydantic.ValidationError):
            CredentialGrant(secret="hub", hosts=hosts)


class BoomEnviron(dict):  # type: ignore[type-arg]
    def get(self, *args: object) -> object:
        raise AssertionError("the environment was read")


class TestEnvironmentMapping:
    def test_the_environment_is_used_only_through_the_declared_variable(self, tmp_path: pathlib.Path) -> None:
        grant = CredentialGrant(secret="hub.tokens", hosts=("models.example.com",), env={"api-key": "HUB_API_KEY"})
        ref = SecretRef(name="hub.tokens", key="api-key", header="X-Api-Key")
        r = resolver(grant, secrets_dir=tmp_path, environ={"HUB_API_KEY": "from-env",
                                                           "STOKER_SECRET_HUB_TOKENS_API_KEY": "derived"})
        assert r.lookup(NoApi(), "sd", ref, URL).header_value == "from-env"

    def test_secret_names_that_used_to_collide_map_to_their_own_variables(self, tmp_path: pathlib.Path) -> None:
        # "a-b"/"c" and "a"/"b-c" both became STOKER_SECRET_A_B_C; explicit names cannot meet
        grants = [CredentialGrant(secret="a-b", hosts=("one.example",), env={"c": "ONE_TOKEN"}),
                  CredentialGrant(secret="a", hosts=("two.example",), env={"b-c": "TWO_TOKEN"})]
        r = CredentialResolver.from_grants(grants, secrets_dir=tmp_path, environ={"ONE_TOKEN": "one", "TWO_TOKEN": "two"})
        one = r.lookup(NoApi(), "m", SecretRef(name="a-b", key="c"), "https://one.example/x")
        two = r.lookup(NoApi(), "m", SecretRef(name="a", key="b-c"), "https://two.example/x")
        assert (one.header_value, two.header_value) == ("Bearer one", "Bearer two")
        with pytest.raises(CredentialLookupError):  # and neither goes to the other's host
            r.lookup(NoApi(), "m", SecretRef(name="a-b", key="c"), "https://two.example/x")

    def test_one_variable_for_two_secrets_is_refused(self) -> None:
        with pytest.raises(ValueError, match="ONE_TOKEN"):
            check_grants([CredentialGrant(secret="a-b", hosts=("h",), env={"c": "ONE_TOKEN"}),
                           CredentialGrant(secret="a", hosts=("h",), env={"b-c": "ONE_TOKEN"})])

    def test_a_secret_declared_twice_is_refused(self) -> None:
        with pytest.raises(ValueError, match="declared twice"):
            check_grants([HUB, HUB])


class TestLookup:
    def test_a_mounted_secret_is_read_from_its_file(self, tmp_path: pathlib.Path) -> None:
        mount(tmp_path, "hub", "token", "from-file\n")
        creds = resolver(secrets_dir=tmp_path, environ={}).lookup(NoApi(), "sd", SecretRef(name="hub"), URL)
        assert (creds.header_name, creds.header_value) == ("Authorization", "Bearer from-file")

    def test_the_mounted_file_wins_over_the_environment(self, tmp_path: pathlib.Path) -> None:
        mount(tmp_path, "hub", "token", "from-file")
        grant = CredentialGrant(secret="hub", hosts=("models.example.com",), env={"token": "HUB_TOKEN"})
        r = resolver(grant, secrets_dir=tmp_path, environ={"HUB_TOKEN": "from-env"})
        assert r.lookup(NoApi(), "sd", SecretRef(name="hub"), URL).header_value == "Bearer from-file"

    def test_a_secret_neither_mounted_nor_allowed_through_the_api_says_how_to_provide_it(self, tmp_path: pathlib.Path) -> None:
        with pytest.raises(CredentialLookupError) as info:
            resolver(secrets_dir=tmp_path, environ={}).lookup(NoApi(), "sd", SecretRef(name="hub"), URL)
        assert info.value.reason == "SecretNotFound" and not info.value.retryable
        message = info.value.message
        assert "team/hub" in message and "ModelCache sd" in message
        assert "agent.credentialSecrets" in message and "via: mount" in message

    def test_a_key_cannot_reach_outside_its_secret_folder(self, tmp_path: pathlib.Path) -> None:
        (tmp_path / "hub").mkdir()
        (tmp_path / "outside").write_text("someone-else's")
        os.symlink("../outside", tmp_path / "hub" / "escape")
        resolver = CredentialResolver.from_grants([HUB], secrets_dir=tmp_path, environ={})
        for key in ("..", ".", "escape"):
            with pytest.raises(CredentialLookupError) as info:
                resolver.lookup(NoApi(), "sd", SecretRef(name="hub", key=key), URL)
            assert info.value.reason == "SecretNotFound", key

    def test_a_mounted_value_with_a_line_break_inside_is_refused_without_showing_it(self, tmp_path: pathlib.Path) -> None:
        mount(tmp_path, "hub", "token", "SECRET\nline2\n")
        with pytest.raises(CredentialLookupError) as info:
            resolver(secrets_dir=tmp_path, environ={}).lookup(NoApi(), "sd", SecretRef(name="hub"), URL)
        assert info.value.reason == "InvalidCredential"
        assert "SECRET" not in info.value.message and "team/hub" in info.value.message
