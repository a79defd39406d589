"""The judge server over real HTTP on 127.0.0.1: shapes, auth, stats, faults, CLI."""

from __future__ import annotations

import argparse
import json
import math
import socket
import subprocess
import sys
import time

import httpx
import pytest

from alignkit.judge.server import (
    FAULT_KINDS,
    PATHS,
    JudgeSettings,
    add_judge_parser,
    create_app,
    make_scorer,
    start_judge_server,
)

TOKEN = "judge-test-token"
# One client for the module: a new httpx client per call costs ~40 ms (TLS context set-up).
http = httpx.Client(timeout=10)


@pytest.fixture
def judge():
    srv = start_judge_server(token=TOKEN)
    yield srv
    srv.stop()


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_openapi_document_lists_every_shape(judge):
    doc = http.get(judge.url + "/openapi.json").json()
    assert set(PATHS.values()) <= set(doc["paths"])
    assert "AlignkitRequest" in doc["components"]["schemas"]


def test_bearer_token(judge):
    body = {"items": [{"prompt": "p", "response": "good"}]}
    url = judge.url_for("alignkit")
    assert http.post(url, json=body).status_code == 401
    wrong = http.post(url, json=body, headers=auth("wrong-token"))
    assert wrong.status_code == 401 and "bearer token" in wrong.text
    assert http.post(url, json=body, headers=auth()).json() == {"scores": [1.0]}
    assert judge.stats.snapshot()["requests"] == 1  # rejected requests are not scored
    assert http.get(judge.url + "/health").status_code == 200  # liveness needs no token


def test_every_shape_scores_with_the_rule(judge):
    def post(preset: str, body: dict) -> dict:
        reply = http.post(judge.url_for(preset), json=body, headers=auth())
        assert reply.status_code == 200, reply.text
        return reply.json()

    assert post("llamafactory", {"model": "model", "messages": ["Q: hi A: good good"]}) == {"scores": [2.0]}
    rlhf = post("openrlhf", {"query": ["Q good? A: good"], "prompts": ["Q good? "], "labels": [None]})
    assert rlhf["rewards"] == [1.0] and rlhf["extra_logs"] == {"response_chars": [7.0]}
    chat = post("openai_judge", {"model": "j", "messages": [{"role": "user", "content": "rate: good"}]})
    assert chat["choices"][0]["message"]["content"].endswith("Score: 1.0")
    single = {"name": "n", "inputParams": {"query": "q", "model_answer": "good"}}
    assert post("custom", single) == {"success": True, "code": 0, "message": "ok", "data": 1.0}
    batch = {
        "batchInputParams": [{"query": "q", "model_answer": "good"}, {"query": "q", "model_answer": "x"}]
    }
    assert post("custom", batch)["data"] == [1.0, 0.0]


def test_stats_count_each_pair_and_reset(judge):
    body = {"items": [{"prompt": "p", "response": "a"}, {"prompt": "p", "response": "b"}]}
    for _ in range(2):
        http.post(judge.url_for("alignkit"), json=body, headers=auth())
    stats = http.get(judge.url + "/stats", params={"pairs": True}, headers=auth()).json()
    assert (stats["requests"], stats["items"], stats["distinct_pairs"], stats["max_per_pair"]) == (2, 4, 2, 2)
    assert {"prompt": "p", "response": "a", "count": 2} in stats["pairs"]
    http.post(judge.url + "/stats/reset", headers=auth())
    assert http.get(judge.url + "/stats", headers=auth()).json()["requests"] == 0


def test_fault_injection_is_seeded_and_counted():
    def fault_sequence(seed: int) -> list[int]:
        with start_judge_server(fault_rate=0.5, fault_kinds=("500", "429"), seed=seed) as srv:
            body = {"items": [{"prompt": "p", "response": "good"}]}
            codes = [http.post(srv.url_for("alignkit"), json=body).status_code for _ in range(12)]
            assert sum(srv.stats.faults.values()) == sum(c != 200 for c in codes)
            return codes

    first = fault_sequence(7)
    assert first == fault_sequence(7)
    assert {200, 500, 429} <= set(first)


def test_injected_faults_look_like_the_real_thing():
    with start_judge_server(fault_first=len(FAULT_KINDS), fault_kinds=FAULT_KINDS, hang_s=0.05) as srv:
        body = {"items": [{"prompt": "p", "response": "good"}, {"prompt": "q", "response": "good"}]}
        replies = {k: http.post(srv.url_for("alignkit"), json=body) for k in FAULT_KINDS}
    assert replies["500"].status_code == 500
    assert replies["429"].status_code == 429 and replies["429"].headers["retry-after"] == "1"
    with pytest.raises(json.JSONDecodeError):
        json.loads(replies["malformed"].content)
    assert len(replies["wrong_count"].json()["scores"]) == 1
    assert math.isnan(json.loads(replies["nan"].content)["scores"][0])  # Python's json accepts NaN
    assert replies["non_numeric"].json()["scores"][0] == "n/a"
    assert len(replies["oversize"].content) > 2_000_000
    assert replies["unsuccessful"].json()["success"] is False
    assert replies["timeout"].json() == {"scores": [1.0, 1.0]}  # answered after hang_s


def test_unknown_fault_kind_rejected():
    with pytest.raises(ValueError, match="unknown fault kinds"):
        JudgeSettings(fault_kinds=("500", "teapot"))


def test_scorer_hook_and_user_function(tmp_path):
    seen = []

    def rm_like(prompts, responses, labels):
        seen.append((prompts, responses, labels))
        return [float(len(r)) for r in responses]

    with start_judge_server(rm_like, scorer_in_thread=True) as srv:
        reply = http.post(
            srv.url_for("alignkit"), json={"items": [{"prompt": "p", "response": "abc", "label": "L"}]}
        )
    assert reply.json() == {"scores": [3.0]} and seen == [(["p"], ["abc"], ["L"])]

    rule_file = tmp_path / "my_rules.py"
    rule_file.write_text("def shout(prompt, response, label):\n    return float(response.count('!'))\n")
    with start_judge_server(rule=f"{rule_file}:shout") as srv:
        reply = http.post(srv.url_for("alignkit"), json={"items": [{"prompt": "p", "response": "hi!!"}]})
    assert reply.json() == {"scores": [2.0]}


def test_scorer_error_is_a_500():
    def broken(prompts, responses, labels):
        raise RuntimeError("model exploded")

    with start_judge_server(broken) as srv:
        reply = http.post(srv.url_for("alignkit"), json={"items": [{"prompt": "p", "response": "r"}]})
    assert reply.status_code == 500 and "model exploded" in reply.text


def test_create_app_is_plain_fastapi():
    app = create_app(make_scorer("exact_match"), JudgeSettings(latency_ms=1))
    assert app.state.settings.latency_ms == 1
    assert {route.path for route in app.routes} >= set(PATHS.values()) | {"/stats", "/stats/reset"}


def test_cli_parser_and_server_process():
    parser = argparse.ArgumentParser(prog="alignkit")
    add_judge_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["judge", "serve", "--port", "0", "--latency-ms", "5", "--fault-kinds", "500,429"]
    )
    assert (args.command, args.judge_command, args.latency_ms, args.fault_kinds) == (
        "judge",
        "serve",
        5.0,
        "500,429",
    )
    assert args.host == "127.0.0.1"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "alignkit.judge.server",
        "--port",
        str(port),
        "--token",
        TOKEN,
        "--rule",
        "count_good",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):  # up to 10 s for the interpreter to start
            try:
                http.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"items": [{"prompt": "p", "response": "good GOOD"}]}
        reply = http.post(f"http://127.0.0.1:{port}/score", json=body, headers=auth())
        assert reply.json() == {"scores": [2.0]}
    finally:
        proc.terminate()
        proc.wait(10)
