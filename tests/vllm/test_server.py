"""``vtprune serve`` (vLLM environment only: ``make vllm-test``): the OpenAI-compatible server on 127.0.0.1
answers an image chat request, and the prompt tokens it reports are the text's plus exactly k."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vtprune.embedded.tiny_llava import load_tiny_llava  # noqa: E402
from vtprune.eval.data import load_task  # noqa: E402

import vtprune  # noqa: E402

TINY = str(Path(vtprune.__file__).parent / "assets" / "tiny-llava")
KEEP = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _wait_ready(proc, url: str, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"vtprune serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise AssertionError("vtprune serve did not become ready")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "vtprune.cli", "serve", TINY, "--method", "visionzip", "--keep", str(KEEP),
           "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
           "--gpu-memory-utilization", "0.5"]  # CPU backend: the share of RAM it checks is free at start
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    except AssertionError as err:
        raise AssertionError(f"{err}; log tail:\n{log.read_text()[-3000:]}") from None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine process it started
        proc.wait(timeout=60)


def test_image_chat_request_has_text_plus_k_prompt_tokens(server):
    q = load_task("mme", limit=1).questions[0]
    buf = io.BytesIO()
    from PIL import Image

    Image.open(q.image_path).convert("RGB").save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": q.question}]
    reply = _post(f"{server}/v1/chat/completions", {
        "model": TINY, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0})
    _, proc = load_tiny_llava()
    text = proc.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.question}]}],
        add_generation_prompt=True, tokenize=False)
    text_tokens = len(proc.tokenizer(text, add_special_tokens=False)["input_ids"]) - 1  # without the one <image>
    assert reply["usage"]["prompt_tokens"] == text_tokens + KEEP
    assert reply["choices"][0]["message"]["content"].strip()  # it answered
