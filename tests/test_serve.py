"""`km-edge serve` over real HTTP on 127.0.0.1: endpoints, refusals, hot updates, restarts.

Each test starts its own server process on a free port with a fresh device folder (tiny base, real
signed packs), talks to it with httpx and stops it with SIGTERM.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import itertools
import json
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import WITHOUT_TORCH, Device, SlowBody, start_server
from test_device_runtime import random_modulators

from device_runtime.basefiles import Base
from device_runtime.keys import generate_keypair, load_private_key, load_trusted_keys
from device_runtime.pack.limits import MAX_ABS_VALUE
from device_runtime.rollback import RollbackState
from device_runtime.runtime import Runtime


@pytest.fixture()
def device(tmp_path) -> Device:
    return Device(tmp_path)


@pytest.fixture()
def server(device):
    device.drop("insects.kmp", device.pack_bytes("insects", 1))
    device.drop("birds.kmp", device.pack_bytes("birds", 3))
    served = start_server(device)
    yield served
    assert served.stop() == 0


def _metric(text: str, name: str, **labels) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- endpoints ---------------------------------------------------------------------------------
def test_serve_binds_loopback_by_default_and_lists_every_loaded_task(device, server):
    assert server.url.startswith("http://127.0.0.1:")
    assert server.ready["tasks"] == {"birds": 3, "insects": 1}
    tasks = server.tasks()
    base_id = json.loads((device.base_dir / "manifest.json").read_text())["base_id"]
    key = server.client.get("/v1/tasks").json()
    assert key["base_id"] == base_id and key["refused"] == []
    for name, version in (("birds", 3), ("insects", 1)):
        task = tasks[name]
        assert task["pack_version"] == version and task["base_id"] == base_id
        assert task["labels"] == ["ant", "bee", "cat"] and len(task["key_id"]) == 16
        assert task["loaded_at"].endswith("Z") and task["file"] == f"{name}.kmp"
    assert server.client.get("/healthz").json() == {"status": "ok", "tasks": 2}


def test_predict_answers_what_the_runtime_answers_with_the_pack_version(device, server):
    runtime = Runtime(device.base_dir, load_trusted_keys([device.pubkey]))
    runtime.load_pack(device.packs / "birds.kmp")
    expected = runtime.predict([device.images / f"img{i}.png" for i in range(3)], top_k=2)

    raw = server.predict("birds", device.image_bytes(0), top_k=2)
    assert raw.status_code == 200
    answer = raw.json()
    assert answer["task"] == "birds" and answer["pack_version"] == 3
    [prediction] = answer["predictions"]
    assert [t["label"] for t in prediction["top"]] == [t["label"] for t in expected[0]["top"]]
    np.testing.assert_allclose([t["probability"] for t in prediction["top"]],
                               [t["probability"] for t in expected[0]["top"]], rtol=1e-5, atol=1e-7)

    files = [("a", ("one.png", device.image_bytes(1))), ("b", ("broken.png", b"not an image")),
             ("c", ("three.png", device.image_bytes(2)))]
    multi = server.client.post("/v1/tasks/birds/predict", files=files, params={"top_k": 2}).json()
    assert [p["image"] for p in multi["predictions"]] == ["one.png", "broken.png", "three.png"]
    assert multi["predictions"][1]["error"].startswith("broken.png: cannot read image")
    for got, want in ((multi["predictions"][0], expected[1]), (multi["predictions"][2], expected[2])):
        assert [t["index"] for t in got["top"]] == [t["index"] for t in want["top"]]
    many = server.predict("birds", device.image_bytes(0), top_k=99).json()
    assert len(many["predictions"][0]["top"]) == 3  # clamped to the labels, like `run`


def test_openapi_describes_every_endpoint(server):
    document = server.client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {"/healthz", "/v1/tasks", "/v1/tasks/{task}/predict", "/metrics",
                                      "/openapi.json"}
    responses = document["paths"]["/v1/tasks/{task}/predict"]["post"]["responses"]
    assert {"200", "400", "404", "409", "413", "503"} <= set(responses)


def test_metrics_count_requests_errors_latency_loads_and_cache(device, server):
    for _ in range(3):
        assert server.predict("birds", device.image_bytes()).status_code == 200
    assert server.predict("birds", b"garbage").status_code == 400
    assert server.predict("nope", device.image_bytes()).status_code == 404
    text = server.metrics()
    assert server.client.get("/metrics").headers["content-type"].startswith("text/plain; version=0.0.4")
    assert _metric(text, "km_edge_requests_total", task="birds", code="200") == 3
    assert _metric(text, "km_edge_request_errors_total", task="birds", code="400") == 1
    assert _metric(text, "km_edge_request_errors_total", task="_unknown", code="404") == 1
    assert _metric(text, "km_edge_request_duration_seconds_count", task="birds") == 4
    assert _metric(text, "km_edge_request_duration_seconds_bucket", task="birds", le="+Inf") == 4
    assert _metric(text, "km_edge_pack_loads_total", task="insects") == 1
    assert _metric(text, "km_edge_pack_version", task="birds") == 3
    assert _metric(text, "km_edge_session_cache_hits_total") == 4


# --- refusals of requests ----------------------------------------------------------------------
def test_each_bad_request_gets_a_one_line_json_error(device, tmp_path):
    device.drop("birds.kmp", device.pack_bytes("birds", 1))
    served = start_server(device, "--max-body-mb", "0.0625", "--max-images", "2", "--max-pixels", "10000")
    try:
        image = device.image_bytes()
        big = io.BytesIO()
        Image.new("RGB", (200, 100)).save(big, format="PNG")  # 20 000 pixels, a tiny file
        files = [(f"f{i}", (f"{i}.png", image)) for i in range(3)]
        cases = {
            "unknown task": (served.predict("nope", image), 404, "nope"),
            "empty body": (served.predict("birds", b""), 400, "empty body"),
            "not an image": (served.predict("birds", b"hello"), 400, "cannot read image"),
            "bad top_k": (served.predict("birds", image, top_k="zero"), 400, "top_k"),
            "top_k 0": (served.predict("birds", image, top_k=0), 400, "top_k"),
            "too many images": (served.client.post("/v1/tasks/birds/predict", files=files), 400, "limit is 2"),
            "no file parts": (served.client.post("/v1/tasks/birds/predict", data={"a": "b"},
                                                 files=[("x", ("", b""))]), 400, "image"),
            "too many pixels": (served.predict("birds", big.getvalue()), 400, "200 x 100 pixels"),
            "body too large": (served.predict("birds", b"x" * 100_000), 413, "limit"),
            "streamed too large": (served.predict("birds", iter([b"x" * 50_000] * 3)), 413, "limit"),
            "wrong method": (served.client.get("/v1/tasks/birds/predict"), 405, ""),
            "no route": (served.client.get("/v2/nothing"), 404, ""),
        }
        for case, (response, status, text) in cases.items():
            assert response.status_code == status, (case, response.text)
            body = response.json()
            assert body["status"] == status and "\n" not in body["error"], case
            assert text in body["error"], (case, body)
        assert served.predict("birds", image).status_code == 200  # and the server is fine
    finally:
        assert served.stop() == 0


def test_a_full_queue_answers_503_with_retry_after(device):
    device.drop("birds.kmp", device.pack_bytes("birds", 1))
    served = start_server(device, "--workers", "1", "--queue-size", "0")
    try:
        slow = SlowBody(device.image_bytes())
        result = {}
        holder = threading.Thread(target=lambda: result.update(
            response=served.client.post("/v1/tasks/birds/predict", content=slow)))
        holder.start()
        served.wait_for(lambda: _metric(served.metrics(), "km_edge_queue_depth") == 1, "the slow request")
        busy = served.predict("birds", device.image_bytes())
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert "busy" in busy.json()["error"]
        slow.release.set()
        holder.join(30)
        assert result["response"].status_code == 200
        assert served.predict("birds", device.image_bytes()).status_code == 200
    finally:
        assert served.stop() == 0


def test_bearer_token_guards_everything_but_healthz(device, tmp_path):
    device.drop("birds.kmp", device.pack_bytes("birds", 1))
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    served = start_server(device, "--token-file", token_file, token="s3cret-token")
    try:
        assert served.client.get("/v1/tasks").status_code == 200
        assert served.predict("birds", device.image_bytes()).status_code == 200
        anonymous = httpx.Client(base_url=served.url)
        wrong = httpx.Client(base_url=served.url, headers={"Authorization": "Bearer s3cret-tokeX"})
        for client in (anonymous, wrong):
            for method, path in (("GET", "/v1/tasks"), ("POST", "/v1/tasks/birds/predict"),
                                 ("GET", "/metrics"), ("GET", "/openapi.json")):
                response = client.request(method, path, content=device.image_bytes())
                assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
            assert client.get("/healthz").status_code == 200
            client.close()
    finally:
        assert served.stop() == 0


# --- pack updates ------------------------------------------------------------------------------
def test_healthz_is_ready_only_once_a_pack_is_loaded(device):
    served = start_server(device)
    try:
        assert served.ready["tasks"] == {}
        not_ready = served.client.get("/healthz")
        assert not_ready.status_code == 503 and not_ready.json()["status"] == "starting"
        device.drop("birds.kmp", device.pack_bytes("birds", 1))
        served.wait_for(lambda: served.client.get("/healthz").status_code == 200, "readiness")
    finally:
        assert served.stop() == 0


def overflowing_modulators(base_dir) -> list:
    """Modulators at the format's largest value: finite kernels whose activations overflow."""
    layers = random_modulators(Base.open(base_dir), hidden=4)
    return [dataclasses.replace(layer, tensors={n: np.full_like(t, MAX_ABS_VALUE) for n, t in layer.tensors.items()})
            for layer in layers]


def test_every_bad_pack_is_refused_counted_and_the_served_version_keeps_serving(device, server, tmp_path):
    generate_keypair(tmp_path / "stranger")
    stranger = load_private_key(tmp_path / "stranger" / "signing.key")
    good = device.pack_bytes("birds", 4, seed=40)
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    bad = {
        "bad-signature.kmp": (bytes(flipped), "bad_signature"),
        "untrusted.kmp": (device.pack_bytes("birds", 5, key=stranger), "untrusted_key"),
        "other-base.kmp": (device.pack_bytes("birds", 6, base_id="f" * 64), "base_mismatch"),
        "malformed.kmp": (b"\x93not a pack", "malformed"),
        "truncated.kmp": (good[: len(good) // 2], "malformed"),
        "older.kmp": (device.pack_bytes("birds", 2), "downgrade"),
        "same-version.kmp": (device.pack_bytes("birds", 3, seed=99), "not_newer"),
        # signed and within every limit, but its scores overflow: the probe refuses it
        "overflow.kmp": (device.pack_bytes("birds", 7, layers=overflowing_modulators(device.base_dir)), "not_finite"),
    }
    for name, (data, _) in bad.items():
        device.drop(name, data)
    def all_refused():
        refused = server.refused()
        return refused if len(refused) == len(bad) else None

    refused = server.wait_for(all_refused, "every refusal")
    for name, (_, reason) in bad.items():
        assert refused[name]["reason"] == reason, (name, refused[name])
        assert name in refused[name]["message"] and "\n" not in refused[name]["message"]
    # each with the way out, as the CLI shows it
    assert "--pubkey" in refused["untrusted.kmp"]["message"]
    assert "`km-edge pack --task TASK --version N`" in refused["older.kmp"]["message"]
    text = server.metrics()
    for reason in {r for _, r in bad.values()}:
        expected = sum(1 for _, r in bad.values() if r == reason)
        assert _metric(text, "km_edge_pack_refusals_total", reason=reason) == expected, reason
    answer = server.predict("birds", device.image_bytes()).json()
    assert answer["pack_version"] == 3  # the served version kept serving
    assert f"refused bad-signature.kmp [bad_signature]" in server.log()

    device.drop("birds-v4.kmp", good)  # and a good update still goes through
    server.wait_for(lambda: server.tasks()["birds"]["pack_version"] == 4, "v4")
    assert server.predict("birds", device.image_bytes()).json()["pack_version"] == 4


def test_a_removed_pack_file_unloads_its_task_unless_kept(device, server):
    (device.packs / "insects.kmp").unlink()
    server.wait_for(lambda: "insects" not in server.tasks(), "the unload")
    assert server.predict("insects", device.image_bytes()).status_code == 404
    assert _metric(server.metrics(), "km_edge_pack_unloads_total", task="insects") == 1
    assert server.predict("birds", device.image_bytes()).status_code == 200


def test_keep_removed_keeps_serving_a_removed_task(device):
    device.drop("birds.kmp", device.pack_bytes("birds", 1))
    served = start_server(device, "--keep-removed")
    try:
        (device.packs / "birds.kmp").unlink()
        device.drop("marker.kmp", device.pack_bytes("marker", 1))  # proves a scan ran after the removal
        served.wait_for(lambda: "marker" in served.tasks(), "a scan")
        assert served.predict("birds", device.image_bytes()).status_code == 200
    finally:
        assert served.stop() == 0


def test_session_cache_evicts_and_rebuilds_without_changing_answers(device):
    for task in ("a", "b", "c"):
        device.drop(f"{task}.kmp", device.pack_bytes(task, 1, seed=ord(task)))
    served = start_server(device, "--cache-size", "1")
    try:
        first = {t: served.predict(t, device.image_bytes()).json()["predictions"] for t in "abc"}
        again = {t: served.predict(t, device.image_bytes()).json()["predictions"] for t in "abc"}
        assert first == again
        text = served.metrics()
        assert _metric(text, "km_edge_session_cache_misses_total") >= 4
        cached = [t["session_cached"] for t in served.tasks().values()]
        assert cached.count(True) == 1
    finally:
        assert served.stop() == 0


def test_hot_update_during_traffic_fails_no_request(device, server):
    """A new version lands while requests are running: each gets an answer from v3 or v4."""
    stop, answers, failures = threading.Event(), [], []

    def traffic():
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not stop.is_set():
                response = client.post("/v1/tasks/birds/predict", content=device.image_bytes())
                (answers if response.status_code == 200 else failures).append(response)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        server.wait_for(lambda: len(answers) >= 20, "traffic")
        device.drop("birds.kmp", device.pack_bytes("birds", 4))
        server.wait_for(lambda: any(a.json()["pack_version"] == 4 for a in answers[-5:]), "v4 answers")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert {a.json()["pack_version"] for a in answers} == {3, 4}


# --- anti-rollback across restarts, shutdown --------------------------------------------------------
def test_recorded_version_survives_a_restart_and_older_packs_get_409(device):
    device.drop("birds.kmp", device.pack_bytes("birds", 3))
    first = start_server(device)
    assert first.tasks()["birds"]["pack_version"] == 3
    assert first.stop() == 0
    assert RollbackState(device.state).recorded("birds", _key_id(device)) == 3

    device.drop("birds.kmp", device.pack_bytes("birds", 2))  # a validly signed older pack
    second = start_server(device, log_name="serve2.log")
    try:
        assert "birds" not in second.tasks()
        refusal = second.refused()["birds.kmp"]
        assert refusal["reason"] == "rollback" and "older than version 3" in refusal["message"]
        answer = second.predict("birds", device.image_bytes())
        assert answer.status_code == 409 and answer.json()["reason"] == "rollback"
        assert "older than version 3" in answer.json()["error"]
        assert second.client.get("/healthz").status_code == 503
        device.drop("birds.kmp", device.pack_bytes("birds", 5))  # rolling forward works
        second.wait_for(lambda: second.tasks().get("birds", {}).get("pack_version") == 5, "v5")
    finally:
        assert second.stop() == 0
    assert RollbackState(device.state).recorded("birds", _key_id(device)) == 5


def _key_id(device: Device) -> str:
    return next(iter(load_trusted_keys([device.pubkey])))


def test_serve_refuses_to_start_on_a_corrupt_state_file(device):
    device.state.parent.mkdir(parents=True)
    device.state.write_text('{"format": "km-edge-rollback-state"')
    device.drop("birds.kmp", device.pack_bytes("birds", 1))
    with pytest.raises(AssertionError, match="corrupt") as caught:
        start_server(device)
    assert "exit 2" in str(caught.value)
    assert device.state.read_text() == '{"format": "km-edge-rollback-state"'


def test_sigterm_lets_the_request_in_flight_finish(device):
    device.drop("birds.kmp", device.pack_bytes("birds", 1))
    served = start_server(device)
    slow, result = SlowBody(device.image_bytes()), {}
    holder = threading.Thread(target=lambda: result.update(
        response=served.client.post("/v1/tasks/birds/predict", content=slow)))
    holder.start()
    served.wait_for(lambda: _metric(served.metrics(), "km_edge_queue_depth") == 1, "the request in flight")
    served.process.send_signal(15)
    served.wait_for(lambda: "Shutting down" in served.log(), "shutdown to begin")
    slow.release.set()
    holder.join(30)
    assert result["response"].status_code == 200
    assert result["response"].json()["pack_version"] == 1
    assert served.process.wait(30) == 0


def test_serve_runs_where_torch_cannot_be_imported(device):
    device.drop("birds.kmp", device.pack_bytes("birds", 1))
    served = start_server(device, launcher=WITHOUT_TORCH)
    try:
        assert served.predict("birds", device.image_bytes()).json()["pack_version"] == 1
    finally:
        assert served.stop() == 0


@pytest.mark.parametrize("missing", ["starlette", "uvicorn"])
def test_serve_without_the_serve_extra_says_how_to_install_it(device, missing):
    code = (f"import sys; sys.modules[{missing!r}] = None; sys.argv[0] = 'km-edge'; "
            "from km_edge.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code, "serve", "--base", device.base_dir, "--packs",
                             device.packs, "--pubkey", device.pubkey], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "km-edge[serve]" in result.stderr and missing in result.stderr


def test_cli_startup_does_not_import_the_server_stack():
    code = ("import sys, km_edge.cli; "
            "print(sorted(m for m in ('starlette', 'uvicorn', 'multipart', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- the bounded load test -----------------------------------------------------------------------
CLIENTS, REQUESTS_PER_CLIENT, UPDATE_EVERY_S = 8, 250, 0.5


@pytest.mark.slow
def test_load_with_a_new_version_every_half_second(device):
    """8 clients x 250 requests while a new version lands every 0.5 s: no request fails, every answer
    names a version that was valid while it ran, and no answer goes back to an older version."""
    device.drop("birds.kmp", device.pack_bytes("birds", 1))
    for task in ("bees", "owls"):
        device.drop(f"{task}.kmp", device.pack_bytes(task, 1))
    served = start_server(device, "--queue-size", "64")
    updates = [device.pack_bytes("birds", v) for v in range(2, 200)]  # signed ahead of time
    dropped_at = {1: 0.0}  # version -> monotonic time its file landed
    done = threading.Event()
    records: list[tuple[float, float, int]] = []  # (sent, received, version), per client in order
    per_client: list[list[int]] = [[] for _ in range(CLIENTS)]
    failures: list[str] = []
    lock = threading.Lock()

    def dropper():
        for version, data in enumerate(updates, start=2):
            if done.wait(UPDATE_EVERY_S):
                return
            landing = _now()  # taken before the file lands: no answer can name it earlier
            device.drop("birds.kmp", data)
            with lock:
                dropped_at[version] = landing

    def client(index: int):
        with httpx.Client(base_url=served.url, timeout=60) as http:
            for n in range(REQUESTS_PER_CLIENT):
                sent = _now()
                response = http.post("/v1/tasks/birds/predict", content=device.image_bytes(n % 3))
                received = _now()
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text[:200]}")
                    continue
                version = response.json()["pack_version"]
                per_client[index].append(version)
                with lock:
                    records.append((sent, received, version))

    try:
        updater = threading.Thread(target=dropper)
        updater.start()
        workers = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(600)
        done.set()
        updater.join(30)
        assert failures == []
        assert len(records) == CLIENTS * REQUESTS_PER_CLIENT
        for versions in per_client:  # no client ever sees a version go backwards
            assert versions == sorted(versions)
        # globally: no answer names a version older than one answered before it was sent
        finished = sorted((received, version) for _, received, version in records)
        finished_at = [received for received, _ in finished]
        newest_by = list(itertools.accumulate((v for _, v in finished), max))
        for sent, received, version in records:
            assert dropped_at[version] < received  # the version had landed before the answer came
            before = bisect.bisect_left(finished_at, sent)
            assert version >= (newest_by[before - 1] if before else 1)
        assert len({v for _, _, v in records}) >= 3  # updates really happened under load
        text = served.metrics()
        assert _metric(text, "km_edge_request_errors_total", task="birds", code="503") == 0
        assert _metric(text, "km_edge_pack_refusals_total", reason="not_newer") == 0
    finally:
        done.set()
        assert served.stop() == 0


def _now() -> float:
    import time

    return time.monotonic()
