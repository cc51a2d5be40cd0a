"""One SGLang server on 127.0.0.1 as a child process group: launched with the flags this project
measured for the CPU engine (or FlashInfer on a GPU), its output in a log file, always killed.

Used by the serving benchmark (``serve_bench.py``) and the plugin's server tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

READY = "The server is fired up and ready to roll"  # SGLang's log line once it serves
START_TIMEOUT = 900  # s, two busy cores
REQUEST_TIMEOUT = 1800

# The CPU engine's flags (docs/sglang-cpu-notes.md): float32 (the bf16 draft attention calls a Triton
# kernel); --sleep-on-idle, else an idle scheduler busy-polls a whole core (two servers side by side).
CPU_ARGS = ["--device", "cpu", "--attention-backend", "torch_native", "--dtype", "float32",
            "--max-total-tokens", "8192", "--sleep-on-idle"]
CPU_MAX_TOTAL_TOKENS = 8192
MIN_MEM_FRACTION, MAX_MEM_FRACTION = 0.05, 0.9
HEADROOM_BYTES = 512 << 20  # activations and SGLang's own slack, beside the weights and the KV cache
GPU_ARGS = ["--attention-backend", "flashinfer"]


def weight_bytes(directory) -> int:
    """The bytes a model directory's weights take in float32 (what the CPU engine loads them as)."""
    files = list(Path(directory).glob("*.safetensors"))
    if not files:
        return 0
    from safetensors import safe_open

    total = 0
    for path in files:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                numel = 1
                for dim in f.get_slice(name).get_shape():
                    numel *= int(dim)
                total += 4 * numel
    return total


def kv_cache_bytes(model_dir, tokens: int) -> int:
    """Float32 K and V of every layer for `tokens` tokens of the model in `model_dir`."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    return 2 * 4 * tokens * int(config["num_hidden_layers"]) * heads * head_dim


def cpu_mem_fraction(model_dir, extra_args: list[str], available_bytes: Optional[int] = None) -> float:
    """``--mem-fraction-static`` for a CPU server: SGLang sizes its static budget as that fraction
    of the memory free at start-up and refuses to start when the loaded weights leave nothing for
    the KV cache, so a fixed fraction fails on a busier machine. This one covers the target's and
    the drafter's weights, the KV cache for ``CPU_MAX_TOTAL_TOKENS`` and some headroom."""
    need = weight_bytes(model_dir) + kv_cache_bytes(model_dir, CPU_MAX_TOTAL_TOKENS) + HEADROOM_BYTES
    if "--speculative-draft-model-path" in extra_args:
        need += weight_bytes(extra_args[extra_args.index("--speculative-draft-model-path") + 1])
    if available_bytes is None:
        import psutil

        available_bytes = psutil.virtual_memory().available
    fraction = need / max(available_bytes, 1)
    if fraction > MAX_MEM_FRACTION:
        raise RuntimeError(f"a CPU server for {model_dir} needs about {need / 2**30:.1f} GiB and "
                           f"{available_bytes / 2**30:.1f} GiB are free: free memory, or pass --mem-fraction-static")
    return round(max(MIN_MEM_FRACTION, fraction), 3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """``python -m sglang.launch_server --model-path MODEL <device flags> <extra_args>``."""

    def __init__(self, log_path: Path, extra_args: list[str], env: Optional[dict] = None, model: Optional[str] = None,
                 device: str = "cpu"):
        if model is None:
            from blockpilot.runtime.assets import default_model_dir
            model = str(default_model_dir())
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        device_args = list(CPU_ARGS if device == "cpu" else GPU_ARGS)
        if device == "cpu" and "--mem-fraction-static" not in extra_args:
            device_args += ["--mem-fraction-static", str(cpu_mem_fraction(model, extra_args))]
        args = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model),
                "--host", "127.0.0.1", "--port", str(self.port), *device_args, *extra_args]
        from .settings import ENV_NAMES

        # A launch passes only the plugin settings it names: a stray one in the caller's environment
        # would change what is measured or tested.
        full_env = {name: value for name, value in os.environ.items() if name not in ENV_NAMES}
        full_env.update(env or {})
        if device == "cpu":
            full_env["SGLANG_USE_CPU_ENGINE"] = "1"  # SGLang's CPU path is taken only with this
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> float:
        """Seconds until the server serves; raises with the log's tail if it exits or times out."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if READY in self.text():
                return time.monotonic() - start
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.text()[-4000:]}")
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{self.text()[-4000:]}")

    def wait_exit(self, timeout: float = START_TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:  # the scheduler/detokenizer children share the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()

    def post(self, path: str, body: dict) -> tuple[int, dict | str]:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    def get(self, path: str) -> tuple[int, dict | str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=REQUEST_TIMEOUT) as response:
                body = response.read().decode(errors="replace")
                try:
                    return response.status, json.loads(body)
                except json.JSONDecodeError:
                    return response.status, body
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    def stream_chunks(self, body: dict) -> Iterator[dict]:
        """``/generate`` with ``stream: true``: each chunk as it arrives (cumulative output_ids)."""
        request = urllib.request.Request(self.url + "/generate", data=json.dumps({**body, "stream": True}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            for line in response:
                line = line.decode().strip()
                if line.startswith("data:") and line != "data: [DONE]":
                    yield json.loads(line[len("data:"):])

    def stream(self, body: dict) -> list[dict]:
        return list(self.stream_chunks(body))
