"""A real EdgeClient process for ``tests/test_device_restart.py`` (run as a script).

    python tests/device_kill_child.py BROKER REGION DATA_DIR MODE LOG

It labels 6 digits samples, connects (one round: min_samples 4) and writes each notification
as a JSON line to LOG. MODE ``hold_after_publish``: the ``trained`` notification (after the
core's Persist and Publish of the update ran) blocks the actor for good, so the update's ack is
never handled; the test SIGKILLs the process. MODE ``finish``: it stops once an update is
acknowledged or refused (or after 60 s). MODE ``hold_in_training``: the training job writes a
``training_started`` line and blocks for good inside the trainer thread (a job the OOM killer
ends); the test SIGKILLs the process there. In every mode a job's start is logged as
``training_started``, and each line carries ``t`` (``time.time()``, seconds).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from edge_sdk.client import EdgeClient
from edge_sdk.tasks import get_task
from edge_sdk.tasks.base import TrainConfig


def main() -> None:
    broker, region, data_dir, mode, log_path = sys.argv[1:6]
    task = get_task("digits")
    client = EdgeClient(broker=broker, device_id="restarted", region=region, task=task, data_dir=Path(data_dir),
                        min_samples=4, train=TrainConfig(epochs=1, lr=0.05, seed=0), request_timeout_s=2.0, refresh_s=None)
    done = threading.Event()
    with open(log_path, "a", buffering=1) as log:
        def note(kind: str, data: dict[str, object]) -> None:
            log.write(json.dumps({"kind": kind, "data": data, "t": time.time()}, default=str) + "\n")
            if kind in ("update_acked", "update_rejected"):
                done.set()
            if kind == "trained" and mode == "hold_after_publish":
                threading.Event().wait()  # the actor never handles the ack: SIGKILLed here

        client.on("*", note)
        train = client.run_training_job

        def training(job: Any, config: Any) -> Any:  # (the trainer thread)
            note("training_started", {"job_id": job.job_id})
            if mode == "hold_in_training":
                threading.Event().wait()  # killed here, as by the OOM killer mid-job
            return train(job, config)

        client.run_training_job = training  # type: ignore[method-assign]
        if client.store.count() == 0:
            pool = task.data().pool
            for i in range(6):
                client.add_sample(pool.x[i], int(pool.y[i]))
        client.start()
        try:
            done.wait(60)
        finally:
            client.stop()


if __name__ == "__main__":
    main()
