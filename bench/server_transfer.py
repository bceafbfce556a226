"""Artifact transfer through ``meshq serve`` vs ``cp`` of the same file on the same disk.

Uploads (multipart POST) and downloads (GET) a file of ``--size-mb`` MiB through a
real server process on loopback with curl (or a small raw-socket client when curl
is missing), and copies the same file with ``cp``. Each of ``--repeat`` rounds runs
the three once (after a ``sync``, in an order that rotates), timed both without
and with a final ``sync`` (page cache vs on disk); each transfer is compared with
the ``cp`` of its own round and the median ratio counts. The server's peak RSS is
sampled every 10 ms. Target: ≥ 50% of cp's throughput, RSS < 200 MB.

    python bench/server_transfer.py [--size-mb 1024] [--repeat 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.artifacts.manifest import sha256_file  # noqa: E402
from bench.rss import TreeRss  # noqa: E402
from cli.embedded_redis import free_port  # noqa: E402

MIB = 1024 * 1024


def make_file(path: Path, size_mb: int) -> str:
    """Random-looking content (a 16 MiB random block repeated with a counter); returns sha256."""
    block = os.urandom(16 * MIB)
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        for i in range(0, size_mb, 16):
            n = min(16, size_mb - i) * MIB
            piece = i.to_bytes(8, "little") + block[8:n]
            fh.write(piece)
            digest.update(piece)
    return digest.hexdigest()


# -- clients -----------------------------------------------------------------------
def curl_upload(url: str, src: Path) -> dict:
    out = subprocess.run(["curl", "-sS", "--fail-with-body", "-F", f"file=@{src};type=application/octet-stream",
                          url], check=True, capture_output=True)
    return dict(json.loads(out.stdout))


def curl_download(url: str, dst: Path) -> None:
    subprocess.run(["curl", "-sS", "--fail", "-o", str(dst), url], check=True)


def raw_upload(url: str, src: Path) -> dict:
    """multipart POST with os.sendfile for the file bytes (when curl is missing)."""
    host, port, path = _split(url)
    boundary = "meshqbench" + os.urandom(8).hex()
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{src.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    size = src.stat().st_size
    with socket.create_connection((host, port)) as sock, open(src, "rb") as fh:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      f"Content-Length: {len(head) + size + len(tail)}\r\n\r\n").encode() + head)
        offset = 0
        while offset < size:
            offset += os.sendfile(sock.fileno(), fh.fileno(), offset, size - offset)
        sock.sendall(tail)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    headers, _, body = reply.partition(b"\r\n\r\n")
    if b" 201 " not in headers.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"upload failed: {headers!r} {body[:200]!r}")
    return dict(json.loads(body))


def meshq_upload(url: str, src: Path) -> dict:
    """The worker's own client (app.artifacts.upload): what a training task's artifact takes."""
    from app.artifacts.upload import upload_file

    return upload_file(url, src)


def meshq_download(url: str, dst: Path) -> None:
    """The worker's own client (app.artifacts.download): Range resume, sha256 verified on the way."""
    from app.artifacts.download import download_file

    download_file(url, dst)


def raw_download(url: str, dst: Path) -> None:
    with urllib.request.urlopen(url) as reply, open(dst, "wb") as fh:
        shutil.copyfileobj(reply, fh, 4 * MIB)


def _split(url: str) -> tuple[str, int, str]:
    rest = url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    return host, int(port), "/" + path


# -- the benchmark -------------------------------------------------------------------
def timed(action: Callable[[], object], before: Callable[[], None]) -> tuple[float, float]:
    """Wall time of ``action`` alone (page cache) and of ``action`` + ``sync`` (on disk)."""
    before()
    subprocess.run(["sync"], check=False)
    started = time.perf_counter()
    action()
    cached = time.perf_counter() - started
    subprocess.run(["sync"], check=False)
    return cached, time.perf_counter() - started


def rounds_of(repeat: int, operations: Mapping[str, tuple[Callable[[], object], Callable[[], None]]]
              ) -> dict[str, list[tuple[float, float]]]:
    """``repeat`` rounds, each running every operation once, the order rotating per round.

    This VM's write speed swings by up to 10× from one second to the next (memory the
    host hands back lazily), so operations are compared within a round, never one
    operation's lucky run against another's unlucky one.
    """
    names = list(operations)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for i in range(repeat):
        for name in names[i % len(names):] + names[:i % len(names)]:
            action, before = operations[name]
            times[name].append(timed(action, before))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="file size in MiB (default 1024)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="rounds (each runs cp, upload and download once); medians of the ratios count")
    parser.add_argument("--workdir", default=None, help="directory on the disk to test (default: .bench/ in the repo)")
    parser.add_argument("--client", choices=["auto", "curl", "meshq", "python"], default="auto",
                        help="curl (auto, when installed), meshq's own worker client, or a raw socket client")
    args = parser.parse_args()

    use_curl = args.client == "curl" or (args.client == "auto" and shutil.which("curl") is not None)
    upload, download = (curl_upload, curl_download) if use_curl else (raw_upload, raw_download)
    if args.client == "meshq":
        upload, download = meshq_upload, meshq_download
    base_dir = Path(args.workdir or ROOT / ".bench")
    base_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="server-transfer-", dir=base_dir))
    size = args.size_mb * MIB
    server = None
    try:
        src = work / "payload.bin"
        print(f"writing a {args.size_mb} MiB test file in {work} ...", flush=True)
        src_sha = make_file(src, args.size_mb)

        port = free_port()
        results = work / "results"
        env = {**os.environ, "MESHQ_MAX_UPLOAD_BYTES": str(size * 2), "LOG_LEVEL": "WARNING"}
        env.pop("ORCHESTRATOR_TOKEN", None)
        server_log = open(work / "server.log", "wb")
        server = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port),
                                   "--results-dir", str(results)], cwd=ROOT, env=env,
                                  stdout=server_log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=1):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"server did not start:\n{(work / 'server.log').read_text()}") from None
                time.sleep(0.1)
        idle_rss = psutil.Process(server.pid).memory_info().rss

        upload_url = f"{base}/api/v1/results/bench/files"
        download_url = f"{upload_url}/{src.name}"
        stored = results / "bench" / "artifacts" / src.name
        copy_dst, down_dst = work / "copy.bin", work / "download.bin"
        replies: list[dict] = [upload(upload_url, src)]  # a first upload, so a round may start with a download
        operations = {
            "cp": (lambda: subprocess.run(["cp", str(src), str(copy_dst)], check=True),
                   lambda: copy_dst.unlink(missing_ok=True)),
            "upload": (lambda: replies.append(upload(upload_url, src)), lambda: stored.unlink(missing_ok=True)),
            "download": (lambda: download(download_url, down_dst), lambda: down_dst.unlink(missing_ok=True)),
        }
        with TreeRss(server.pid) as rss:
            times = rounds_of(args.repeat, operations)
        if any(r["sha256"] != src_sha or r["bytes"] != size for r in replies):
            raise SystemExit(f"an upload reply does not match the file: {replies}")
        if sha256_file(down_dst) != src_sha:
            raise SystemExit("downloaded bytes differ from the uploaded file")

        def mbps(seconds: float) -> float:
            return size / 1e6 / seconds

        client = "meshq (app.upload/app.artifacts.download)" if args.client == "meshq" else \
            "curl" if use_curl else "python (sendfile)"
        print(f"\nserver transfer, {args.size_mb} MiB file, {args.repeat} rounds, client {client}, "
              f"server RSS idle {idle_rss / 1e6:.0f} MB, peak {rss.peak_root / 1e6:.0f} MB")
        print("'cached': the operation alone (data may still be in the page cache); "
              "'on disk': until a following sync returns; 'vs cp': against cp in the same round")
        print(f"{'round':<6} {'operation':<10} {'cached MB/s':>11} {'vs cp':>6} {'on disk MB/s':>12} {'vs cp':>6}")
        ratios: dict[str, list[tuple[float, float]]] = {"upload": [], "download": []}
        for i in range(args.repeat):
            cp_cached, cp_disk = times["cp"][i]
            for name in ("cp", "upload", "download"):
                cached, durable = times[name][i]
                if name != "cp":
                    ratios[name].append((cp_cached / cached, cp_disk / durable))
                print(f"{i + 1:<6} {name:<10} {mbps(cached):>11.0f} {cp_cached / cached:>6.2f} "
                      f"{mbps(durable):>12.0f} {cp_disk / durable:>6.2f}")
        for name, pairs in ratios.items():
            print(f"median {name} vs cp: cached {statistics.median(p[0] for p in pairs):.2f}, "
                  f"on disk {statistics.median(p[1] for p in pairs):.2f}")
        print("target: >= 0.50 of cp, server RSS < 200 MB")
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=15)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
