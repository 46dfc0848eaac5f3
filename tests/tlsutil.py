"""Private certificate authorities made by the tests with openssl, and a TLS front for
the moto server (moto's own server speaks plain HTTP only)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class CA:
    cert: Path
    key: Path

    def issue(self, name: str, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> tuple[Path, Path]:
        """A server certificate for ``hosts`` signed by this CA: (cert, key)."""
        d = self.cert.parent
        key, csr, cert, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt", d / f"{name}.ext"
        san = ",".join(f"IP:{h}" if h[0].isdigit() else f"DNS:{h}" for h in hosts)
        ext.write_text(
            f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        )
        _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", csr.name,
                 "-subj", f"/CN={hosts[0]}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", csr.name, "-CA", self.cert.name, "-CAkey", self.key.name,
                 "-CAcreateserial", "-out", cert.name, "-days", "2", "-sha256",
                 "-extfile", ext.name, cwd=d)  # fmt: skip
        key.chmod(0o600)
        return cert, key


def make_ca(directory: Path, name: str = "ca") -> CA:
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl("req", "-x509", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", cert.name,
             "-days", "2", "-sha256", "-subj", f"/CN=fleetticketsd test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=directory)  # fmt: skip
    return CA(cert, key)


class TLSFront:
    """Terminates TLS on a loopback port and pipes the bytes to ``backend_port``."""

    def __init__(self, cert: Path, key: Path, backend_port: int) -> None:
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.load_cert_chain(cert, key)
        self._backend_port = backend_port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.port = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        # A client that refuses the certificate (the point of some tests) ends its
        # handshake with an alert: expected here, not worth a stack trace on stderr.
        self._loop.set_exception_handler(lambda loop, context: None)

        async def start() -> asyncio.Server:
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self._ctx)
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            return server

        self._server = self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._backend_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ssl.SSLError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def __enter__(self) -> TLSFront:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@contextlib.contextmanager
def tls_front(cert: Path, key: Path, backend_url: str) -> Iterator[TLSFront]:
    port = int(backend_url.rsplit(":", 1)[1].split("/", 1)[0])
    with TLSFront(cert, key, port) as front:
        yield front
