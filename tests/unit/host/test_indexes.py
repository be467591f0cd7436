"""Which package sources a worker host fetches, and what of uv's output a user sees."""

import pytest

from rgrid.core.errors import BadInput
from rgrid.host import indexes
from rgrid.host.requirements import normalise

DEFAULT = "https://pypi.org/simple"


def test_only_the_default_index_shares_the_cache():
    assert not indexes.uses_own_sources(normalise("six\nnumpy==2.0\n"), DEFAULT)
    assert not indexes.uses_own_sources(
        normalise("--index-url https://pypi.org/simple/\nsix\n"), DEFAULT
    )
    for own in (
        "--index-url https://u:p@pypi.org/simple\nsix\n",
        "--index-url https://private.example/simple\nsix\n",
        "--extra-index-url https://private.example/simple\nsix\n",
        "--find-links https://wheels.example/\nsix\n",
        "--find-links /srv/wheels\nsix\n",
        "six @ https://files.example/six-1.0-py3-none-any.whl\n",
    ):
        assert indexes.uses_own_sources(normalise(own), DEFAULT), own


@pytest.mark.parametrize("port", [5432, 6379, 9000, 80])
def test_loopback_sources_are_refused_in_the_same_words_whatever_the_port(port):
    with pytest.raises(BadInput) as refused:
        indexes.check_sources(
            normalise(f"--index-url http://127.0.0.1:{port}/simple\nsix\n"), (), DEFAULT
        )
    assert refused.value.message == (
        "package index 127.0.0.1 is not allowed on this server "
        "(the operator's RGRID_ALLOWED_INDEXES lists the allowed ones)"
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/simple",
        "http://localhost/simple",
        "http://10.1.2.3/simple",
        "http://192.168.0.1/simple",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/simple",
        "http://[fd00:ec2::254]/simple",
        "http://[::ffff:127.0.0.1]/simple",
    ],
)
def test_private_addresses_are_refused_even_when_any_public_host_is_allowed(url):
    with pytest.raises(BadInput, match="is not allowed on this server"):
        indexes.check_sources(normalise(f"--extra-index-url {url}\nsix\n"), ("*",), DEFAULT)
    with pytest.raises(BadInput, match="is not allowed on this server"):
        indexes.check_sources(normalise(f"pkg @ {url}/pkg-1.0-py3-none-any.whl\n"), ("*",), DEFAULT)


def test_the_default_index_and_named_hosts_are_allowed():
    indexes.check_sources(normalise("--index-url https://pypi.org/simple\nsix\n"), (), DEFAULT)
    text = normalise("--index-url http://127.0.0.1:8080/simple\nsix\n")
    indexes.check_sources(text, ("127.0.0.1",), DEFAULT)
    indexes.check_sources(text, ("127.0.0.1:8080",), DEFAULT)
    with pytest.raises(BadInput):
        indexes.check_sources(text, ("127.0.0.1:8081",), DEFAULT)
    with pytest.raises(BadInput):
        indexes.check_sources(
            normalise("--index-url https://example.org/simple\nsix\n"), (), DEFAULT
        )


def test_uv_lines_that_tell_of_downloads_are_dropped_and_credentials_masked():
    shown: list[str] = []
    sink = indexes.without_downloads(shown.append)
    for line in (
        "Prepared 1 package in 3ms\n",
        "Downloading numpy (15.8MiB)\n",
        " Downloaded numpy\n",
        "Resolved 2 packages in 6ms\n",
        " + six==1.16.0\n",
    ):
        sink(line)
    assert shown == ["Resolved 2 packages in 6ms\n", " + six==1.16.0\n"]
    assert indexes.log_line("Using CPython 3.11.7 interpreter at: /usr/bin/python3\n") is None
    assert (
        indexes.log_line("error fetching http://alice:s3cret@127.0.0.1:1/simple/x/\n")
        == "error fetching http://****@127.0.0.1:1/simple/x/\n"
    )


def test_unreachable_sources_get_one_message_whatever_listens_there():
    causes = [
        "connection closed before message completed",
        "invalid HTTP version parsed",
        "Connection refused (os error 111)",
    ]
    messages = set()
    for port, cause in zip((5432, 6379, 1), causes, strict=True):
        uv = [
            "error: Request failed after 3 retries in 9.9s",
            f"  cause: Failed to fetch: http://127.0.0.1:{port}/simple/six/",
            f"  cause: error sending request for url (http://127.0.0.1:{port}/simple/six/)",
            "  cause: client error (SendRequest)",
            f"  cause: {cause}",
        ]
        messages.add(indexes.failure_message(uv, 2))
    assert messages == {"dependency install failed: package index 127.0.0.1 could not be reached"}
