"""The managed vLLM servers of this process (`ragtune.core.engine.VLLMServer`): one at a time, since each takes its
GPUs (vLLM claims 90% of each one's memory) or on a CPU every core; a model of the same shape swapped into the running
server instead of a start; the server a later stage takes kept between stages (`end_stage`); all stopped at exit and on
SIGTERM/SIGHUP."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable

from ragtune.core.engine import REGISTRY_LOCK, STOP_GRACE, VLLMServer, server_settings

log = logging.getLogger(__name__)

_servers: dict[str, VLLMServer] = {}
_cleanup_installed = False


def get_server(model: str, *, lora_modules: dict[str, str] | None = None, log_dir: str | Path | None = None,
               dtype: str = "float32", trust_remote_code: bool = False, engine_args: dict[str, Any] | None = None,
               gpus: tuple[int, ...] = ()) -> VLLMServer:
    """The running server for `model`, started if needed: one per model for the whole process.

    A live server is reused when its settings match; missing LoRA adapters are loaded into it at runtime
    when it was started with LoRA and a large enough rank, else it is restarted serving all of them.
    A server that died (killed, crashed) is replaced by a new one. A model of the same shape, tokenizer and settings
    as a running server's (a merged student and its base) is swapped into it (`VLLMServer.swap_to`): one start for
    both. Starting one stops the others: each takes its GPUs (vLLM claims 90% of each GPU's memory; on CPU its KV
    cache and every core), and eval runs its models one after another (the demo's eval held two servers, 9.2 GB of
    2-core CPU RAM, at once).
    """
    wanted = {name: str(path) for name, path in (lora_modules or {}).items()}
    settings = server_settings(dtype, trust_remote_code, engine_args, gpus)
    with REGISTRY_LOCK:
        _install_cleanup()
        server = _servers.get(model)
        if server is not None and server.alive and server.settings == settings:
            missing = {n: p for n, p in wanted.items() if server.lora_modules.get(n) != p}
            if not missing:
                return server
            if server.can_load(missing):
                for name, path in missing.items():
                    server.load_lora(name, path)
                return server
            wanted = {**server.lora_modules, **wanted}
        if server is None and not wanted:
            swapped = _swap_in(model, settings, trust_remote_code)
            if swapped is not None:
                return swapped
        for other in [name for name in _servers if name != model]:
            log.info("stopping vLLM for %s before starting %s: one managed server at a time", other, model)
            _servers.pop(other).hand_over()
        if server is not None:
            server.hand_over()
        server = _servers[model] = VLLMServer(model, lora_modules=wanted, log_dir=log_dir, dtype=dtype,
                                               trust_remote_code=trust_remote_code, engine_args=engine_args, gpus=gpus)
        try:
            server.start()
        except BaseException:
            server.stop()
            _servers.pop(model, None)
            raise
        return server


def _swap_in(model: str, settings: tuple[Any, ...], trust_remote_code: bool) -> VLLMServer | None:
    """A running server of the same settings that now holds `model`'s weights (`VLLMServer.swap_to`), re-registered
    under `model`; None where none can."""
    from ragtune.core.models import dense_copy, resolve_model

    alike = [(other, server) for other, server in _servers.items() if server.settings == settings]
    if not alike:
        return None
    model_path = dense_copy(resolve_model(model), trust_remote_code).name_or_path
    for other, server in alike:
        if server.swap_to(model, model_path):
            _servers[model] = _servers.pop(other)
            return server
    return None


def end_stage(keep: Callable[[VLLMServer], bool] | None = None) -> None:
    """A stage ends: every managed server's work goes to its roofline, and each is stopped but those `keep` says a
    later stage will use (it then holds no claim, so it can take that stage's weights)."""
    with REGISTRY_LOCK:
        for name, server in list(_servers.items()):
            if keep is not None and server.alive and keep(server):
                server.count_work()
            else:
                _servers.pop(name).stop()


def shutdown_all() -> None:
    """Stop every managed server (idempotent; runs at exit and on SIGTERM/SIGHUP). It waits a little for a
    thread that is starting one, then stops them regardless: a signal must not wait minutes."""
    locked = REGISTRY_LOCK.acquire(timeout=STOP_GRACE)
    try:
        while _servers:
            _, server = _servers.popitem()
            try:
                server.stop()
            except Exception as err:  # noqa: BLE001 - one stuck server must not keep the others running
                log.warning("could not stop vLLM for %s: %s", server.served_model_name, err)
    finally:
        if locked:
            REGISTRY_LOCK.release()


def _install_cleanup() -> None:
    """atexit covers normal exits, errors and Ctrl-C; SIGTERM and SIGHUP would skip it, so stop the servers
    there first and then die of the same signal (only where their handler is still the default)."""
    global _cleanup_installed
    if _cleanup_installed:
        return
    _cleanup_installed = True
    atexit.register(shutdown_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _stop_then_die)


def _stop_then_die(signum: int, frame: object) -> None:
    shutdown_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
