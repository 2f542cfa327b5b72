"""Start, find, share and stop OpenAI-compatible ``vllm serve`` processes.

vLLM lives in its own environment (``make vllm`` -> ./.venv-vllm: it pins its own torch and
transformers), so the project never imports it: it runs the server from that environment and
talks HTTP to it. That is also how vLLM runs in production, and a server outlives one job: the
same model with the same settings gets one server, shared by every job that asks for it.

    with serve(ServerSettings(model_dir)) as server:     # starts, or reuses a running one
        server.url, server.model                          # http://127.0.0.1:PORT/v1, served name

A small registry (``$MOE_LAB_CACHE/vllm/servers.json``, under a file lock) maps a settings key to
the server's pid, port and users (pids); the last user to leave stops the server unless it was
started with ``keep=True``. A pid is trusted only with its start time (psutil), so a recycled
pid is never taken for a server. ``stop_servers()`` stops every server the registry knows.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock

from moe_core.errors import MoELabError
from moe_core.judge.bounded_http import BoundedTransport, httpx
from moe_core.model.organism import cache_root
from moe_core.store.atomic import atomic_write_json
from moe_core.store.events import log_tail, pid_alive
from moe_core.store.provenance import fingerprint

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


class VLLMError(MoELabError):
    """vLLM cannot be used as asked; the message says what to do."""


class VLLMEnvMissing(VLLMError):
    """The separate vLLM environment does not exist."""


class VLLMStartError(VLLMError):
    """The server process exited or never became healthy (the message carries its log tail)."""


class VLLMUnsupportedModel(VLLMStartError):
    """vLLM has no implementation of the model's architecture."""


class PortInUse(VLLMError):
    """The port asked for is taken by another process."""


@dataclass(frozen=True)
class ServerSettings:
    """Everything that makes two servers interchangeable (their key); defaults suit one CPU or GPU box."""

    model_dir: str  # a local model directory (or hub id) vLLM loads
    dtype: str = "auto"  # "auto": float32 without CUDA (matches the HF path exactly), else the model's dtype
    max_model_len: int | None = None  # None: the model's context length
    tensor_parallel_size: int = 1  # GPUs one model is split over
    data_parallel_size: int = 1  # model replicas (multi-node via Ray: see README "Scaling up")
    return_routed_experts: bool | None = None  # None: on with CUDA (needs Model Runner V2 + Triton)
    kv_cache_gib: int = 1  # CPU builds: VLLM_CPU_KVCACHE_SPACE (GiB) for the KV cache
    seed: int = 0
    extra_args: tuple[str, ...] = ()  # more `vllm serve` flags, passed as given

    def resolved(self) -> ServerSettings:
        """Settings with "auto" choices made for this machine and the model path made absolute."""
        cuda = _has_cuda()
        path = Path(self.model_dir).expanduser()
        model_dir = str(path.resolve()) if path.exists() else self.model_dir
        dtype = ("float32" if not cuda else "auto") if self.dtype == "auto" else self.dtype
        routed = cuda if self.return_routed_experts is None else self.return_routed_experts
        return ServerSettings(
            model_dir,
            dtype,
            self.max_model_len,
            self.tensor_parallel_size,
            self.data_parallel_size,
            routed,
            self.kv_cache_gib,
            self.seed,
            tuple(self.extra_args),
        )

    def key(self) -> str:

        return fingerprint(asdict(self.resolved()))

    def argv(self, port: int, served_name: str) -> list[str]:
        s = self.resolved()
        args = [
            "--model",
            s.model_dir,
            "--served-model-name",
            served_name,
            "--host",
            HOST,
            "--port",
            str(port),
            "--dtype",
            s.dtype,
            "--seed",
            str(s.seed),
            "--tensor-parallel-size",
            str(s.tensor_parallel_size),
            "--generation-config",
            "vllm",
        ]  # our own greedy settings, not the model's sampling defaults
        if s.max_model_len:
            args += ["--max-model-len", str(s.max_model_len)]
        if s.data_parallel_size > 1:
            args += ["--data-parallel-size", str(s.data_parallel_size)]
        if s.return_routed_experts:
            args += ["--enable-return-routed-experts"]
        return args + list(s.extra_args)


@dataclass
class Server:
    """A running server: ``url`` is the OpenAI base URL (``.../v1``), ``model`` the name to ask for."""

    url: str
    model: str
    pid: int | None = None  # None for a server we were pointed at (never stopped by us)
    key: str | None = None
    log_path: str | None = None
    routed_experts: bool = False  # started with --enable-return-routed-experts
    meta: dict[str, Any] = field(default_factory=dict)
    user: list[Any] | None = None  # our entry in the registry's users: [pid, start time, token]


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# -- the environment ----------------------------------------------------------------------------
def vllm_python() -> Path:
    """The vLLM environment's python: ``$MOE_LAB_VLLM_PYTHON``, else ./.venv-vllm beside this checkout."""
    env = os.environ.get("MOE_LAB_VLLM_PYTHON")
    candidates = (
        [Path(env)]
        if env
        else [
            Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python",
            Path.cwd() / ".venv-vllm" / "bin" / "python",
        ]
    )
    for c in candidates:  # `make vllm` touches .installed last: a half-made environment does not count
        if c.is_file() and (env or (c.parents[1] / ".installed").exists()):
            return c
    raise VLLMEnvMissing(
        f"the vLLM environment is missing (looked for {candidates[0]}); create it with `make vllm` "
        "(or set MOE_LAB_VLLM_PYTHON to a python that has vllm installed)"
    )


# -- HTTP checks ---------------------------------------------------------------------------------
def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET within ``timeout`` in all, at most 4 MB, no redirect followed; (0, b"") on failure."""
    try:
        with httpx.Client(transport=BoundedTransport(timeout, 4 << 20), follow_redirects=False) as client:
            r = client.get(url, timeout=timeout)
            return r.status_code, r.content if r.is_success else b""
    except (httpx.HTTPError, OSError, ValueError):
        return 0, b""


def root_of(url: str) -> str:
    """``http://host:port`` from ``http://host:port`` or ``http://host:port/v1``."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def served_models(url: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """``/v1/models`` of a server (empty when it does not answer)."""
    status, body = _get(root_of(url) + "/v1/models", timeout)
    if status != 200:
        return []
    try:
        return list(json.loads(body).get("data") or [])
    except ValueError:
        return []


def healthy(url: str, timeout: float = 2.0) -> bool:
    """``/health`` answers 200 and ``/v1/models`` lists a model."""
    return _get(root_of(url) + "/health", timeout)[0] == 200 and bool(served_models(url, timeout))


def connect(url: str, model_dir: str | None = None) -> Server:
    """A server we were pointed at (``--vllm-url``): checked, never started or stopped by us.

    With ``model_dir`` the server must serve that model (by path or name), so answers of a
    different model are never recorded as this one's.
    """
    if not healthy(url, timeout=10):
        raise VLLMError(
            f"no vLLM server answers at {url} (/health and /v1/models); start it or drop --vllm-url"
        )
    models = served_models(url)
    if model_dir is not None:
        want = {model_dir, str(Path(model_dir).expanduser().resolve()), Path(model_dir).name}
        hit = [m for m in models if m.get("id") in want or m.get("root") in want]
        if not hit:
            served = ", ".join(f"{m.get('id')} ({m.get('root')})" for m in models)
            raise VLLMError(
                f"the vLLM server at {url} serves {served}, not {model_dir}; point --vllm-url at a "
                "server of this model or omit it to let the lab start one"
            )
        models = hit
    base = root_of(url) + "/v1"
    return Server(url=base, model=str(models[0]["id"]), meta={"root": models[0].get("root")})


# -- the registry --------------------------------------------------------------------------------
def registry_dir() -> Path:

    return cache_root() / "vllm"


def _created(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _lock() -> FileLock:
    registry_dir().mkdir(parents=True, exist_ok=True)
    return FileLock(str(registry_dir() / "servers.lock"), timeout=1800)  # a start can take minutes


def read_registry() -> dict[str, Any]:
    """Key -> entry (pid, created, port, url, model, log, users, keep) of every recorded server."""
    path = registry_dir() / "servers.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _write_registry(reg: dict[str, Any]) -> None:
    atomic_write_json(registry_dir() / "servers.json", reg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def check_port(port: int) -> int:
    """``port`` if nothing listens on it, else a clear error."""
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            raise PortInUse(
                f"port {port} on {HOST} is already in use; pick another port or stop what uses it"
            ) from None
    return port


# -- start / stop --------------------------------------------------------------------------------
def _start(settings: ServerSettings, port: int | None, start_timeout: float) -> dict[str, Any]:
    """Launch a server from the vLLM environment and wait until it answers -> its registry entry."""
    python = vllm_python()
    port = check_port(port) if port else _free_port()
    key, served = settings.key(), Path(settings.model_dir).name or "model"
    log_path = registry_dir() / f"server-{key}.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # this checkout's packages never leak into the vLLM environment
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", *settings.argv(port, served)]
    log.info("starting vLLM: %s (log %s)", " ".join(cmd), log_path)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=str(registry_dir()),
        )
    url = f"http://{HOST}:{port}/v1"
    deadline = time.monotonic() + start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_tail(log_path) or "(no log)"
            if "are not supported for now" in tail or "not supported" in tail and "rchitecture" in tail:
                raise VLLMUnsupportedModel(
                    f"vLLM does not support the architecture of {settings.model_dir}; use "
                    f"--backend hf. Server log ({log_path}):\n{tail}"
                )
            if "address already in use" in tail.lower():
                raise PortInUse(f"port {port} was taken while vLLM started; retry. Log tail:\n{tail}")
            raise VLLMStartError(
                f"the vLLM server exited with status {proc.returncode} while starting. "
                f"Log tail ({log_path}):\n{tail}"
            )
        if healthy(url):
            return {
                "pid": proc.pid,
                "created": _created(proc.pid),
                "port": port,
                "url": url,
                "model": served,
                "log": str(log_path),
                "users": [],
                "keep": False,
                "routed_experts": bool(settings.resolved().return_routed_experts),
            }
        time.sleep(1.0)
    _terminate(proc.pid, _created(proc.pid))
    raise VLLMStartError(
        f"the vLLM server did not answer within {start_timeout:.0f} s. Log tail ({log_path}):\n"
        f"{log_tail(log_path) or '(no log)'}"
    )


def _terminate(pid: int, created: float | None, grace: float = 30.0) -> None:
    """Stop a server we started (its own session: the engine's worker processes go with it)."""
    if not pid_alive(pid, created):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
        psutil.Process(pid).wait(grace)
    except psutil.TimeoutExpired:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, psutil.Error):
        pass


def _me() -> list[Any]:
    """One use of a server: this process (pid + start time) and a token (a process may hold several)."""
    return [os.getpid(), _created(os.getpid()), uuid.uuid4().hex]


def acquire(
    settings: ServerSettings, port: int | None = None, keep: bool = False, start_timeout: float = 900.0
) -> Server:
    """A healthy server for ``settings``: the registered one if it still answers, else a new one."""
    key = settings.key()
    with _lock():
        reg = read_registry()
        entry = reg.get(key)
        if entry and not (pid_alive(entry["pid"], entry.get("created")) and healthy(entry["url"])):
            _terminate(entry["pid"], entry.get("created"))
            entry = None
        if entry is None:
            entry = _start(settings, port, start_timeout)
        me = _me()
        entry["users"] = [u for u in entry["users"] if pid_alive(u[0], u[1])] + [me]
        entry["keep"] = bool(entry.get("keep") or keep)
        reg[key] = entry
        _write_registry(reg)
    return Server(
        entry["url"],
        entry["model"],
        entry["pid"],
        key,
        entry["log"],
        bool(entry.get("routed_experts")),
        user=me,
    )


def release(server: Server) -> None:
    """Leave a server; the last user stops it unless it was started with ``keep``."""
    if server.key is None:
        return
    with _lock():
        reg = read_registry()
        entry = reg.get(server.key)
        if not entry or entry["pid"] != server.pid:
            return
        entry["users"] = [u for u in entry["users"] if u != server.user and pid_alive(u[0], u[1])]
        if not entry["users"] and not entry.get("keep"):
            _terminate(entry["pid"], entry.get("created"))
            del reg[server.key]
        _write_registry(reg)


def stop_servers() -> int:
    """Stop every server in the registry (also kept ones) -> how many were running."""
    with _lock():
        reg = read_registry()
        n = sum(pid_alive(e["pid"], e.get("created")) for e in reg.values())
        for e in reg.values():
            _terminate(e["pid"], e.get("created"))
        _write_registry({})
    return n


@contextmanager
def serve(
    settings: ServerSettings, url: str | None = None, port: int | None = None, keep: bool = False
) -> Iterator[Server]:
    """A server for the block: the one at ``url`` (checked), else a started or reused one (released after)."""
    if url:
        yield connect(url, settings.model_dir)
        return
    server = acquire(settings, port=port, keep=keep)
    try:
        yield server
    finally:
        release(server)
