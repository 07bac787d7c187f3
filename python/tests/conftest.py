"""Fixtures of the unimic Python tests: the shipped models, small images, and the Rust side of
the sessions (the `unimic` binary and the `turns` example, built with cargo from this checkout).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Coroutine, Dict, Iterator, Tuple, TypeVar

import numpy as np
import pytest
from PIL import Image

import unimic

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "samples" / "kodim23.png"

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
    """Runs a coroutine on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="session")
def models() -> unimic.Models:
    return unimic.default_models().load()


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    """The committed sample photo scaled to 128×85 (a 6×8 grid: quick to code)."""
    with Image.open(SAMPLE) as f:
        img = f.convert("RGB")
    img.thumbnail((128, 128))
    return img


def gradient(w: int = 48, h: int = 32) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    a = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                        np.full((h, w, 1), 96, np.float32)], axis=2)
    return Image.fromarray(a.astype(np.uint8), "RGB")


@pytest.fixture(scope="session")
def rust_bins() -> Dict[str, Path]:
    """Paths of the `unimic` binary and the `turns` example, built with cargo (a no-op when
    `cargo test --workspace` built them already)."""
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.fail("cargo is needed to build the Rust side of these tests")
    out = subprocess.run(
        [cargo, "build", "--quiet", "--message-format=json-render-diagnostics",
         "-p", "unimic-cli", "--bin", "unimic", "-p", "unimic-examples", "--example", "turns"],
        cwd=REPO, check=True, stdout=subprocess.PIPE, timeout=1200,
    ).stdout.decode()
    paths: Dict[str, Path] = {}
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
            paths[msg["target"]["name"]] = Path(msg["executable"])
    assert {"unimic", "turns"} <= paths.keys(), paths
    return paths


@pytest.fixture()
def rust_server(rust_bins: Dict[str, Path]) -> Iterator[Tuple[str, str]]:
    """`unimic serve --agent echo` on a loopback port: (address, pin)."""
    p = subprocess.Popen(
        [str(rust_bins["unimic"]), "serve", "--listen", "127.0.0.1:0", "--agent", "echo"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        addr = pin = None
        assert p.stdout is not None
        for line in p.stdout:
            m = re.search(r"listening on (\S+)", line)
            if m:
                addr = m.group(1)
            m = re.match(r"pin (\S+)", line)
            if m:
                pin = m.group(1)
                break
        assert addr and pin, "unimic serve printed no address and pin"
        yield addr, pin
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def threads() -> int:
    """Threads of this process (Rust threads included)."""
    return len(os.listdir("/proc/self/task"))


def sockets() -> int:
    """Sockets this process holds open (UDP, TCP and Unix)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


skip_unless_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="counts threads and sockets in /proc"
)
