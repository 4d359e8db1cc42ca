"""``edgeci device``'s numbers: a value it cannot use is one line naming its flag and a non-zero
exit, before the SDK makes its data dir, not a traceback (``--fleet-size 0``, ``--partition 25``),
a device that labels nothing and exits 0 (``--rate 0``), or an error naming an internal field
(``min_samples must be …``). Valid values parse and partition as they always did."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from demos.cli import build_parser, main

NOWHERE = "mqtt://127.0.0.1:1"  # (nothing listens: were a bad value let through, the device fails fast, not hangs)


def device(tmp_path: Path, *flags: str) -> int:
    return main(["device", "--device-id", "d1", "--broker", NOWHERE, "--data-dir", str(tmp_path / "data"), *flags])


@pytest.mark.parametrize("flag, value, needle", [
    ("--fleet-size", "0", "argument --fleet-size: must be at least 1, got 0"),
    ("--fleet-size", "many", "argument --fleet-size: expected an integer, got 'many'"),
    ("--partition", "-1", "argument --partition: must be at least 0, got -1"),
    ("--rate", "-1", "argument --rate: must be above 0, got -1"),
    ("--rate", "0", "argument --rate: must be above 0, got 0"),
    ("--duration", "-1", "argument --duration: must be at least 0, got -1"),
    ("--duration", "nan", "argument --duration: must be at least 0, got nan"),
    ("--epochs", "0", "argument --epochs: must be at least 1, got 0"),
    ("--lr", "-1", "argument --lr: must be above 0, got -1"),
    ("--lr", "0", "argument --lr: must be above 0, got 0"),
    ("--lr", "inf", "argument --lr: must be a finite number, got inf"),
    ("--alpha", "0", "argument --alpha: must be above 0, got 0"),
    ("--seed", "-1", "argument --seed: must be at least 0, got -1"),
    ("--min-samples", "0", "argument --min-samples: must be at least 1, got 0"),
    ("--refresh", "-5", "argument --refresh: must be above 0 (or 0: off), got -5"),
    ("--refresh", "inf", "argument --refresh: must be a finite number, got inf"),
    ("--release-spread", "-1", "argument --release-spread: must be at least 0 (or off), got -1"),
    ("--release-spread", "soon", "argument --release-spread: expected a number, got 'soon'"),
    ("--rate", "inf", "argument --rate: must be a finite number, got inf"),
])
def test_a_number_out_of_range_is_a_usage_error_naming_its_flag(flag: str, value: str, needle: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        device(tmp_path, "--duration", "2", flag, value)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"edgeci device: error: {needle}", err
    assert "Traceback" not in err and "min_samples" not in err and "refresh_s" not in err
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("flags, needle", [
    (("--partition", "25"), "--partition 25 is not a partition of --fleet-size 20: they are numbered 0 to 19"),
    (("--partition", "3", "--fleet-size", "3"), "--partition 3 is not a partition of --fleet-size 3: they are numbered 0 to 2"),
    (("--fleet-size", "2000"), "--fleet-size 2000: the digits pool has 1397 samples, so at most 1397 devices"),
    # Dirichlet(0.01) over 20 devices leaves partition 0 of seed 0 without a sample
    (("--alpha", "0.01", "--partition", "0"), "partition 0 of --fleet-size 20 has no samples: Dirichlet α=0.01 (--alpha) "
                                              "with --seed 0 gave it none of the digits pool's 1397"),
])
def test_options_that_disagree_or_leave_no_samples_are_one_line_errors(flags: tuple[str, ...], needle: str, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert device(tmp_path, "--duration", "2", *flags) == 1
    out, err = capsys.readouterr()
    assert err.startswith(f"edgeci device: error: {needle}") and err.count("\n") == 1, err
    assert "Traceback" not in err and "started" not in out
    assert not (tmp_path / "data").exists()  # refused before the SDK made its data dir


def parse(*flags: str) -> argparse.Namespace:
    argv = ["device", "--device-id", "d1", *flags]
    return build_parser(argv).parse_args(argv)


def test_valid_values_and_the_defaults_still_parse() -> None:
    args = parse("--fleet-size", "1", "--partition", "0", "--rate", "0.25", "--duration", "0", "--refresh", "0",
                 "--min-samples", "1", "--epochs", "1", "--lr", "1e-3", "--alpha", "0.5", "--seed", "0")
    assert (args.fleet_size, args.partition, args.rate, args.duration, args.refresh) == (1, 0, 0.25, 0.0, 0.0)
    assert (args.min_samples, args.epochs, args.lr, args.alpha, args.seed) == (1, 1, 1e-3, 0.5, 0)
    assert isinstance(args.fleet_size, int) and isinstance(args.duration, float)
    args = parse()
    assert (args.fleet_size, args.partition, args.rate, args.duration, args.refresh) == (20, None, 0.5, 0.0, 3600.0)
    # --epochs / --lr default to the task's own (fleet_train_config): digits' are the 2 and 0.05 they were
    assert (args.min_samples, args.epochs, args.lr, args.alpha, args.seed) == (None, None, None, 1.0, 0)


def test_a_valid_fleet_gets_the_partition_it_always_did() -> None:
    import numpy as np

    from devices.headless import check_partition, device_partition
    from devices.live import device_index
    from devices.partition import partition

    labels = np.arange(200) % 10
    for flags in ((), ("--partition", "19"), ("--fleet-size", "5", "--partition", "4", "--alpha", "0.5", "--seed", "3")):
        args = parse(*flags)
        check_partition(args)
        index, idx = device_partition(args, labels)
        expected = args.partition if args.partition is not None else device_index("d1", args.fleet_size)
        assert index == expected
        assert np.array_equal(idx, partition(labels, args.fleet_size, "dirichlet", alpha=args.alpha, seed=args.seed)[index])
        assert len(idx) > 0


def test_frames_with_boxes_are_split_iid_not_by_a_label_they_do_not_have() -> None:
    """`edgeci device --model detection` always asked for a Dirichlet split and stopped with the
    emulator's `[data] partition = "dirichlet"` error, naming a setting the command does not have."""
    import numpy as np

    from devices.headless import check_partition, device_partition
    from devices.partition import partition

    boxes = np.empty(256, dtype=object)
    for i in range(len(boxes)):
        boxes[i] = np.array([[i % 5, 1, 2, 10, 12]], np.float32)
    seen: list[np.ndarray] = []
    for index in range(4):
        args = parse("--model", "detection", "--fleet-size", "4", "--partition", str(index), "--alpha", "0.01", "--seed", "3")
        check_partition(args)
        got, idx = device_partition(args, boxes)
        assert got == index
        assert np.array_equal(idx, partition(boxes, 4, "iid", seed=3)[index]) and len(idx) == 64  # α is unused
        seen.append(idx)
    assert sorted(np.concatenate(seen).tolist()) == list(range(256))


def test_local_training_is_the_task_s_own_unless_given() -> None:
    """Both fleet commands trained with TrainConfig(epochs=2, lr=0.05) whatever the task: a YOLO
    got SGD's 0.05 (its own is 1e-3, 5 epochs; registry: "destroys a YOLO in one update")."""
    from devices.headless import fleet_train_config
    from edge_sdk.tasks.base import TrainConfig

    for task in ("digits", "gestures"):  # what they always had
        assert fleet_train_config(task, epochs=None, lr=None, seed=4) == TrainConfig(epochs=2, lr=0.05, seed=4)
        assert fleet_train_config(task, epochs=3, lr=0.1, seed=0) == TrainConfig(epochs=3, lr=0.1, seed=0)
    assert fleet_train_config("detection", epochs=None, lr=None, seed=1) == TrainConfig(epochs=5, batch_size=16, lr=1e-3, seed=1)
    assert fleet_train_config("detection", epochs=None, lr=2e-4, seed=1) == TrainConfig(epochs=5, batch_size=16, lr=2e-4, seed=1)
    assert fleet_train_config("detection", epochs=1, lr=None, seed=1) == TrainConfig(epochs=1, batch_size=16, lr=1e-3, seed=1)


@pytest.mark.parametrize("model", [
    "digits",
    pytest.param("detection", marks=pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None,
                                                       reason="needs the detection extra (ultralytics)")),
])
def test_a_device_labels_its_share_into_a_real_store(model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The whole `edgeci device` path short of the broker: its partition, its training config and
    its labels stored by a real EdgeClient (frames through add_frame with their boxes)."""
    import devices.headless
    from edge_sdk.client import EdgeClient
    from edge_sdk.tasks.base import TrainConfig

    monkeypatch.setenv("EDGECI_HOME", str(tmp_path / "home"))
    seen: dict[str, object] = {}

    class Offline(EdgeClient):
        """An EdgeClient that never connects: start() does nothing, stop() notes what was stored."""

        def start(self, timeout: float = 15.0) -> EdgeClient:
            seen["train"] = self.train_config
            return self

        def stop(self) -> None:
            seen["stored"] = self.store.stats().added
            super().stop()

    monkeypatch.setattr(devices.headless, "EdgeClient", Offline)
    monkeypatch.setattr(devices.headless, "auth_from_args", lambda args: None)
    assert device(tmp_path, "--model", model, "--fleet-size", "40", "--partition", "0", "--rate", "200",
                  "--min-samples", "1000", "--duration", "1") == 0
    out = capsys.readouterr().out
    assert "partition 0/40" in out and "not stored" not in out, out
    share = int(out.split("partition 0/40 (")[1].split(" samples")[0])
    assert share > 0 and seen["stored"] == share
    expected = TrainConfig(epochs=5, batch_size=16, lr=1e-3) if model == "detection" else TrainConfig(epochs=2, lr=0.05)
    assert seen["train"] == expected


@pytest.mark.parametrize("regions, given, expected", [
    (["eu"], [], "eu"),  # the bundle's one region: --region is not needed
    (["eu"], ["--region", "eu"], "eu"),
    (["eu", "us"], ["--region", "us"], "us"),
    (None, [], "default"),  # no bundle
    (["eu", "us"], [], None),  # several: --region must pick one
])
def test_the_region_defaults_to_the_bundle_s_one_region(regions: list[str] | None, given: list[str], expected: str | None,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`edgeci device --bundle PKI/bundles/headset-7` without --region was refused ("bundle … is
    for region(s) eu, not 'default'"): the region it was issued for is the one to use."""
    import json

    import devices.headless

    seen: dict[str, object] = {}

    class Stop(Exception):
        pass

    def client(**kwargs: object) -> None:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(devices.headless, "EdgeClient", client)
    monkeypatch.setattr(devices.headless, "auth_from_args", lambda args: None)
    flags = list(given)
    if regions is not None:
        (tmp_path / "bundle").mkdir()
        (tmp_path / "bundle" / "bundle.json").write_text(json.dumps({"identity": "d1", "role": "device", "regions": regions}))
        flags += ["--bundle", str(tmp_path / "bundle")]
    if expected is None:
        assert device(tmp_path, *flags) == 1 and not seen
        return
    with pytest.raises(Stop):
        device(tmp_path, *flags)
    assert seen["region"] == expected


@pytest.mark.parametrize("flags, shown", [([], True), (["--log-level", "warning"], False)])
def test_the_device_logs_at_info_unless_told_otherwise(flags: list[str], shown: bool, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """`edgeci device` forced its loggers to INFO, so `--log-level warning` (or error) changed
    nothing; INFO is now its default level, which the flag overrides."""
    assert device(tmp_path, "--duration", "1", *flags) == 1  # nothing listens on NOWHERE
    assert "cannot reach broker" in capsys.readouterr().err
    said = [r.getMessage() for r in caplog.records if r.name == "edgeci.device" and r.levelname == "INFO"]
    assert any("no provisioned coordinator keys" in m for m in said) is shown, said
