"""A local OpenAI-compatible judge server: llama.cpp (llama-cpp-python's server) serving a GGUF.

Served judges (vLLM, TGI, llama.cpp, a hosted API) are how labelling scales: `feedback.backend: openai`
sends every judge question to `feedback.openai.base_url`. `morlaif serve-judge` starts such a server on
the embedded teacher's own GGUF (the file its bf16 safetensors were de-quantized from), so the judge can
run in its own process, on another machine, or as several servers behind one `base_url` list; the
tests and `morlaif bench` start the same server through `JudgeServer`.

What differs from the hf backend on the same model, and why labels agree only closely, not exactly:
llama.cpp computes with the Q4_K_M weights as stored (int8 activations in its dot products) where the
hf backend uses their bf16 de-quantization, and it reads the letters from the 20 `top_logprobs` of the
first answer token (a letter outside them has no mass) where the hf backend reads both letters' fp32
logits. The chat template is the same: the server applies the one stored in the GGUF, which is what the
converted tokenizer carries. llama-cpp-python's server reports logprobs only for a model loaded with
`logits_all` (its default), and reuses the KV cache of the previous request's common prefix, so the
questions about one pair cost only their tails when they arrive one after another.

The server is an optional extra (`pip install 'morlaif[server]'`): llama-cpp-python builds llama.cpp
from source with the system compiler.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from morlaif import models
from morlaif.errors import InputError, RunError

INSTALL = "pip install 'morlaif[server]' (builds llama.cpp from source: a C++ compiler and cmake)"


def require_server() -> None:
    """InputError naming the extra to install when llama-cpp-python's server is not importable."""
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None:
        raise InputError(f"the llama.cpp judge server needs llama-cpp-python[server]: {INSTALL}", key="--model")


def gguf_path(model: str) -> Path:
    """An embedded model's GGUF (assembled once), or a GGUF file the user names."""
    if model.startswith("embedded:"):
        return models.embedded_gguf(model)
    p = Path(model).expanduser()
    if p.suffix != ".gguf" or not p.is_file():
        raise InputError(f"'{model}' is neither an embedded model nor an existing .gguf file", key="--model")
    return p


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_argv(gguf: Path, *, host: str, port: int, n_ctx: int, threads: int, verbose: bool = False) -> list[str]:
    """The command line of llama-cpp-python's OpenAI-compatible server for `gguf`."""
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", host, "--port", str(port),
            "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--logits_all", "True",  # top_logprobs need it in llama-cpp-python
            "--verbose", str(verbose)]


class JudgeServer:
    """One llama.cpp server process on a loopback port: `with JudgeServer(gguf) as srv: srv.base_url`.

    `kill()` and `start()` again on the same port simulate a crash and a restart (the fault tests)."""

    def __init__(self, gguf: Path, *, host: str = "127.0.0.1", port: int | None = None, n_ctx: int = 4096,
                 threads: int | None = None, log: Path | None = None, ready_timeout: float = 300.0):
        require_server()
        self.gguf, self.host, self.n_ctx = Path(gguf), host, n_ctx
        self.port = port or free_port(host)
        self.threads = threads or os.cpu_count() or 1
        self.log, self.ready_timeout = log, ready_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> JudgeServer:
        argv = server_argv(self.gguf, host=self.host, port=self.port, n_ctx=self.n_ctx, threads=self.threads,
                           verbose=self.log is not None)
        if self.log:
            with open(self.log, "a") as out:  # the child keeps its own copy of the descriptor
                self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        else:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RunError(f"the llama.cpp server exited with status {self.proc.returncode} while loading "
                               f"{self.gguf}" + (f" (log: {self.log})" if self.log else ""))
            try:
                if httpx.get(self.base_url + "/models", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RunError(f"the llama.cpp server did not answer on {self.base_url} within {self.ready_timeout:.0f} s")

    def kill(self) -> None:
        """SIGKILL, as a crash would: no clean shutdown, requests in flight fail."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def __enter__(self) -> JudgeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(model: str, *, host: str, port: int, n_ctx: int, threads: int | None) -> None:
    """`morlaif serve-judge`: this process becomes the server (exec), so Ctrl-C and a process manager's
    SIGTERM reach it directly and no orphaned server outlives its command."""
    require_server()
    gguf = gguf_path(model)
    threads = threads or os.cpu_count() or 1
    url = f"http://{host}:{port}/v1"
    print(f"[serve-judge] {model} ({gguf}) on {url}, {threads} threads; label through it with\n"
          f"  morlaif run --set feedback.backend=openai --set feedback.openai.base_url={url}", flush=True)
    argv = server_argv(gguf, host=host, port=port, n_ctx=n_ctx, threads=threads)
    os.execv(argv[0], argv)
