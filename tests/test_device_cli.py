"""``edgeci device``: a device CLI that cannot work says so (a bundle for another region: an
error before anything connects; no coordinator answering: a line pointing at ``edgeci status``)
instead of running silently and exiting 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.broker import MosquittoProcess
from coordinator.pki import Pki

ROOT = Path(__file__).resolve().parents[1]


def device(*argv: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "demos.cli", "device", *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "EDGECI_HOME": str(home)})


def test_a_bundle_for_another_region_is_refused_before_connecting(tmp_path: Path) -> None:
    pki = Pki.init(tmp_path / "PKI")
    bundle = pki.issue("headset-7", "device", regions=["eu"])
    out = device("--broker", "mqtts://127.0.0.1:1", "--region", "us", "--device-id", "headset-7", "--bundle", str(bundle),
                 "--duration", "5", home=tmp_path / "home")
    assert out.returncode != 0
    assert "is for region(s) eu, not 'us'" in out.stderr, out.stdout + out.stderr
    assert not (tmp_path / "home").exists()  # refused before the SDK made its data dir


@pytest.mark.broker
@pytest.mark.parametrize("fmt, level", [("text", "info"), ("json", "info"), ("text", "warning")])
def test_a_device_nobody_answers_says_so(mosquitto: MosquittoProcess, tmp_path: Path, fmt: str, level: str) -> None:
    """... on stdout, as text lines or, with --log-format json, one JSON object per line like the log's;
    ``--log-level warning`` keeps the warnings and drops the progress lines (they ignored it)."""
    out = device("--broker", mosquitto.url, "--region", "nowhere", "--device-id", "d1", "--rate", "20", "--min-samples", "2",
                 "--duration", "14", "--log-format", fmt, "--log-level", level, home=tmp_path / "home")
    assert out.returncode == 0, out.stdout + out.stderr
    if level == "warning":
        assert "partition" not in out.stdout and out.stdout.startswith("[d1] no answer to its pull"), out.stdout
        text = out.stdout
    elif fmt == "json":
        lines = [json.loads(line) for line in out.stdout.splitlines()]  # every line: nothing printed around them
        assert lines[0]["event"] == "started" and all(line["device"] == "d1" for line in lines)
        retry = next(line for line in lines if line["event"] == "retry")
        assert retry["level"] == "warning" and retry["data"]["attempt"] == 1 and retry["ts"].endswith("Z")
        text = retry["msg"]
    else:
        text = out.stdout
        assert out.stdout.startswith("[d1] device d1: partition"), out.stdout
    assert "no answer to its pull from a coordinator of region 'nowhere' yet (attempt 1)" in text, out.stdout
    assert f"edgeci status --broker {mosquitto.url} --region nowhere" in text  # the command to run, as it is


@pytest.mark.broker
def test_a_second_device_on_the_same_data_dir_is_refused(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """Two `edgeci device` processes with one id and EDGECI_HOME would share one store and its
    sequence numbers: the second is refused while the first runs."""
    first = subprocess.Popen([sys.executable, "-m", "demos.cli", "device", "--broker", mosquitto.url, "--device-id", "d1",
                              "--duration", "600"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "EDGECI_HOME": str(tmp_path / "home")})
    try:
        lock = tmp_path / "home" / "devices" / "d1" / "device.lock"
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.read_text().startswith("pid")):
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.stdout else ""
            time.sleep(0.2)
        wait = time.monotonic() + 60
        while "partition" not in (line := first.stdout.readline() if first.stdout else ""):  # started: connected
            assert line and time.monotonic() < wait, "the first device did not start"
        out = device("--broker", mosquitto.url, "--device-id", "d1", "--duration", "1", home=tmp_path / "home")
        assert out.returncode != 0 and "is in use by device d1 (pid" in out.stderr, out.stdout + out.stderr
    finally:
        first.terminate()
        first.wait(30)
        if first.stdout is not None:
            first.stdout.close()
    out = device("--broker", mosquitto.url, "--device-id", "d1", "--duration", "1", home=tmp_path / "home")
    assert out.returncode == 0 and "is in use by" not in out.stderr, out.stderr  # free again once the first stopped


@pytest.mark.broker
def test_a_device_says_why_it_refuses_models_and_the_way_out(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """Operator trial: a device that pinned the coordinator's key (trust on first use) refused every
    model signed by the new key of a coordinator whose state dir was lost with it — and `edgeci
    device` printed nothing but "no answer to its pull". It now prints each refusal's reason (the
    1st, 10th, 100th…) with the way out."""
    from edge_sdk.mqtt import MqttTransport
    from edge_sdk.signing import Signer
    from edge_sdk.tasks import get_task
    from edge_sdk.wire import topics
    from edge_sdk.wire.codec import encode
    from edge_sdk.wire.messages import ModelMsg

    proc = subprocess.Popen([sys.executable, "-m", "demos.cli", "device", "--broker", mosquitto.url, "--device-id", "d1",
                             "--rate", "0.01", "--duration", "60"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "EDGECI_HOME": str(tmp_path / "home")})
    sender = MqttTransport(mosquitto.url, client_id="coordinators", subscriptions=[], on_message=lambda t, p: None, clean_session=True)
    sender.start()
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while not any("partition" in ln for ln in lines):  # started: subscribed
            line = proc.stdout.readline() if proc.stdout else ""
            assert line and time.monotonic() < deadline, "".join(lines)
            lines.append(line)
        topic = topics.device_topic("default", "d1", "model")
        weights = get_task("digits").pretrained(seed=0)
        for version, key in ((1, Signer.generate()), (2, Signer.generate())):  # the first is pinned, the second refused
            msg = ModelMsg(model_id="digits-cnn", version=version, reply_to=-1, weights=weights)
            sender.publish(topic, encode(msg, signer=key, scope=topics.signing_scope(topic)), qos=1)
            time.sleep(0.5)
        while not any("refused a message" in ln for ln in lines):
            line = proc.stdout.readline() if proc.stdout else ""
            assert line and time.monotonic() < deadline, "".join(lines)
            lines.append(line)
        said = next(ln for ln in lines if "refused a message" in ln)
        assert "(1× so far): bad_signature" in said and "Give the device a bundle" in said, said
    finally:
        sender.stop()
        proc.terminate()
        proc.wait(timeout=60)
        if proc.stdout:
            proc.stdout.close()


def test_json_lines_hold_strict_json_for_any_event_data() -> None:
    """A diverged training reports a NaN loss, numpy counters arrive as numpy scalars: the JSON
    lines carry null and plain numbers (json.dumps would write NaN, which strict parsers refuse)."""
    import numpy as np

    from devices.headless import _plain

    data = {"loss": float("nan"), "n": np.int64(3), "acc": np.float32(0.5), "seconds": float("inf"), "detail": "é", "l": (np.float64("nan"), 2)}
    text = json.dumps(_plain(data), allow_nan=False, ensure_ascii=False)
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == {
        "loss": None, "n": 3, "acc": 0.5, "seconds": None, "detail": "é", "l": [None, 2]}


@pytest.mark.broker
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_device_says_what_it_did_and_where_its_data_is(mosquitto: MosquittoProcess, tmp_path: Path,
                                                                 signum: signal.Signals) -> None:
    """Ctrl-C or `kill` stopped `edgeci device` cleanly (exit 0) without a word: how much it had
    labelled and contributed, which model it held and where its data stayed, the operator had to
    find out (helper-152). Now one last line says so, from the client's own counters."""
    from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
    from edge_sdk.tasks import get_task

    daemon = CoordinatorDaemon(CoordinatorOptions(broker=mosquitto.url, region="r1", state_dir=tmp_path / "coord",
                                                  strategy_params={"k": 1, "timeout_s": None}),
                               task=get_task("digits")).start()
    home = tmp_path / "home"
    proc = subprocess.Popen([sys.executable, "-m", "demos.cli", "device", "--broker", mosquitto.url, "--region", "r1",
                             "--device-id", "d1", "--rate", "20", "--min-samples", "4", "--duration", "600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "EDGECI_HOME": str(home)})
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 120
        while not any("update_acked" in line for line in seen):  # an update accepted
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(seen)
            seen.append(line)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        daemon.stop()
    assert proc.returncode == 0, err
    last = out.splitlines()[-1]
    stopped = re.fullmatch(r"\[d1\] stopped: (\d+) samples labelled, (\d+) update\(s\) acknowledged this run, model v(\d+); "
                           r"data in (.+) \((\d+) samples stored\)", last)
    assert stopped is not None, out
    labelled, accepted, version, data_dir, stored = stopped.groups()
    # (the model: v0, or a newer one if it arrived before the signal)
    assert int(labelled) >= 4 and int(accepted) >= 1 and int(version) >= 0 and int(stored) == int(labelled), last
    assert Path(data_dir) == home / "devices" / "d1" and (Path(data_dir) / "samples.sqlite3").exists(), last
    assert "Traceback" not in err, err


def test_the_stopped_line_says_again_that_another_device_uses_this_id() -> None:
    """A cloned device's one ERROR (helper-170) may be hours before the run ends: its last line says it
    again, and the JSON line carries it; a device alone on its id ends as before."""
    from devices.headless import stopped_line

    text, data = stopped_line(12, 3, 4, Path("/d"), 12, duplicate_id=True)
    assert text.endswith("(12 samples stored); ANOTHER DEVICE USES THIS ID (see the duplicate_id error above)")
    assert data["duplicate_id"] is True
    text, data = stopped_line(12, 3, None, Path("/d"), 12, duplicate_id=False)
    assert text == "stopped: 12 samples labelled, 3 update(s) acknowledged this run, no model yet; data in /d (12 samples stored)"
    assert data["duplicate_id"] is False
