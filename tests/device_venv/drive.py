"""Driver for ``run_device_venv.sh`` (main .venv): mosquitto and a digits coordinator (K = 1,
LASP full sync every 3rd version); the device app runs from the device venv.

    .venv/bin/python tests/device_venv/drive.py /tmp/edgeci-device-venv/bin/python
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from coordinator.broker import MosquittoProcess
from coordinator.daemon import CoordinatorDaemon, CoordinatorOptions
from coordinator.registry import Registry
from edge_sdk.tasks.digits import DigitsTask

APP = Path(__file__).resolve().parent / "device_app.py"


def expect(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        print("  device |", line.rstrip(), flush=True)
        if line.startswith(prefix):
            return line.rstrip()
    raise SystemExit(f"FAIL: the device app ended (rc {proc.wait()}) before printing {prefix!r}")


def main() -> int:
    device_python = sys.argv[1]
    task = DigitsTask(device="cpu")
    pool = task.data().pool
    with tempfile.TemporaryDirectory(prefix="edgeci-device-ci-") as tmp_name:
        tmp = Path(tmp_name)
        np.save(tmp / "x.npy", pool.x[:40])
        np.save(tmp / "y.npy", pool.y[:40])
        broker = MosquittoProcess().start()
        try:
            options = CoordinatorOptions(broker=broker.url, region="ci", state_dir=tmp / "coordinator",
                                         strategy_params={"k": 1, "timeout_s": 5.0}, full_sync_every=3)
            with CoordinatorDaemon(options, task=task) as daemon:
                expected = np.argmax(task.logits(task.pretrained(seed=0), pool.x[:16]), axis=1).tolist()
                with subprocess.Popen([device_python, "-I", str(APP), broker.url, str(tmp)], cwd=tmp, text=True,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE) as proc:
                    first = expect(proc, "serving ")
                    version, labels = first.split(" ", 2)[1:]
                    if int(version) == 0 and json.loads(labels) != expected:
                        raise SystemExit(f"FAIL: onnxruntime on the device predicted {labels}, torch {expected}")
                    expect(proc, "done")
                    if proc.wait(timeout=30) != 0:
                        raise SystemExit(f"FAIL: the device app exited with {proc.returncode}")
                if daemon.core.version != 2:
                    raise SystemExit(f"FAIL: expected versions 1 and 2 from the device, at {daemon.core.version}")
            registry = Registry(tmp / "coordinator", task.spec)
            extractor = task.spec.group_slice("extractor")
            v0, v2 = registry.read_version(0)[0], registry.read_version(2)[0]
            if not np.array_equal(v0[extractor], v2[extractor]) or np.array_equal(v0, v2):
                raise SystemExit("FAIL: the classifier-only versions changed the extractor or nothing")
            print(f"coordinator: versions 0 -> 2 from the device's head updates; held-out accuracy "
                  f"{task.evaluate(v0)['accuracy']:.3f} -> {task.evaluate(v2)['accuracy']:.3f}")
        finally:
            broker.stop()
    print("device venv check: OK (served what torch predicts, labelled, trained the head in numpy, "
          "skipped the full round, picked up new versions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
