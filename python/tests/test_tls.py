"""TLS beyond pinning: a server with a PEM certificate a CA signed (`serve(cert=, key=)`), a
client that verifies it against the CA and the server name (`Client.connect(ca=,
server_name=)`), and the errors of each (`data/tls/README.md` says how the files were made)."""

from __future__ import annotations

from pathlib import Path

import pytest

import unimic
from conftest import run

TLS = Path(__file__).parent / "data" / "tls"


def test_a_ca_signed_certificate_is_verified_by_its_ca_and_name():
    async def go():
        server = await unimic.serve(
            "127.0.0.1:0", unimic.EchoAgent(), cert=TLS / "cert.pem", key=TLS / "key.pem"
        )
        try:
            client = await unimic.Client.connect(server.address, ca=TLS / "ca.pem")
            assert await (await client.send("verified by the CA")).text() == "verified by the CA"
            await client.close()
            # The same certificate can still be pinned.
            pinned = await unimic.Client.connect(server.address, pin=server.pin)
            assert await (await pinned.send("pinned")).text() == "pinned"
            await pinned.close()
            # A certificate for localhost does not pass for another name.
            with pytest.raises(unimic.ConnectError, match="not valid for name"):
                await unimic.Client.connect(
                    server.address, ca=TLS / "ca.pem", server_name="elsewhere.example"
                )
        finally:
            await server.close()

    run(go())


def test_a_certificate_the_ca_did_not_sign_is_refused():
    async def go():
        server = await unimic.serve("127.0.0.1:0", unimic.EchoAgent())  # self-signed
        try:
            with pytest.raises(unimic.ConnectError):
                await unimic.Client.connect(server.address, ca=TLS / "ca.pem")
        finally:
            await server.close()

    run(go())


def test_trust_arguments_are_checked():
    async def go():
        with pytest.raises(unimic.ContentError, match="either pin"):
            await unimic.Client.connect("127.0.0.1:9", pin="00" * 32, ca=TLS / "ca.pem")
        with pytest.raises(unimic.ContentError, match="either pin"):
            await unimic.Client.connect("127.0.0.1:9")
        with pytest.raises(unimic.ContentError, match="missing.pem"):
            await unimic.Client.connect("127.0.0.1:9", ca=TLS / "missing.pem")
        with pytest.raises(unimic.ContentError, match="go together"):
            await unimic.serve("127.0.0.1:0", unimic.EchoAgent(), cert=TLS / "cert.pem")
        with pytest.raises(unimic.ContentError, match="missing.pem"):
            await unimic.serve(
                "127.0.0.1:0", unimic.EchoAgent(), cert=TLS / "missing.pem", key=TLS / "key.pem"
            )
        # A CA file with no certificate in it.
        with pytest.raises(unimic.ContentError):
            await unimic.Client.connect("127.0.0.1:9", ca=TLS / "README.md")

    run(go())
