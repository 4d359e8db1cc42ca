"""The ``edgeci`` command line's rough edges a newcomer met: a closed stdout, the status's
release history, ``pretrain --out`` and ``run``'s numbers, help texts."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from demos.cli import main

ROOT = Path(__file__).resolve().parents[1]


def cli_into_closed_pipe(*argv: str) -> subprocess.CompletedProcess[str]:
    """``edgeci ARGV | head`` after head has exited: stdout is a pipe nobody reads."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "demos.cli", *argv], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    finally:
        os.close(write)


# ---------------------------------------------------------------------- a closed stdout


def test_closed_stdout_ends_quietly_with_141(tmp_path: Path) -> None:
    (tmp_path / "versions").mkdir()  # an empty state dir: `versions` prints a header
    out = cli_into_closed_pipe("versions", "--state-dir", str(tmp_path))
    assert (out.returncode, out.stderr) == (141, "")
    out = cli_into_closed_pipe("--help")
    # Later 3.11 releases' argparse swallows the failed write of the help (exit 0); 3.11.2's
    # (Debian's, the venv's interpreter where it is there) raises it, and main ends with 141.
    assert out.returncode == (0 if _argparse_swallows_write_errors() else 141) and out.stderr == ""


def _argparse_swallows_write_errors() -> bool:
    """What this interpreter's argparse does when printing the help fails (the subprocess
    above runs the same interpreter)."""

    class ClosedPipe:
        def write(self, text: str) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    try:
        argparse.ArgumentParser()._print_message("usage", ClosedPipe())  # type: ignore[arg-type]
    except BrokenPipeError:
        return False
    return True


def test_a_broken_pipe_that_is_not_stdout_is_not_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator import cli_control

    def broker_socket_broke(args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli_control, "run", broker_socket_broke)
    with pytest.raises(BrokenPipeError):
        main(["versions", "--state-dir", str(tmp_path)])


# ---------------------------------------------------------------------- status: the release history


def test_status_release_history_is_readable() -> None:
    from coordinator.cli_status import render

    now = 1796330000.0
    status = {"type": "status", "coordinator": "coord-eu", "region": "eu", "alive": True, "published_at": now,
              "version": 11, "extra": {"recent_versions": [  # as CoordinatorCore._record writes them
                  {"at": now - 400.0, "action": "promote", "version": 9, "release": 9, "candidate_metric": 0.91234,
                   "release_metric": 0.9, "paired": [5, 2, 200]},
                  {"at": now - 300.0, "action": "reject", "version": 10, "release": 9, "devices": 3},
                  {"at": now - 180.0, "action": "rollback", "version": 11, "release": 11, "of": 3,
                   "operator": "coord-eu", "nonce": 3215590913792989245, "kid": "471206175629d76e"}]}}
    text = render(status, now)
    history = text.split("release history", 1)[1].splitlines()
    assert "recent versions" not in text and "gate's verdicts on candidates, operators' commands" in history[0]
    assert history[1].split() == ["when", "event", "version", "release", "details"]
    assert "6 min ago" in history[2] and "promoted" in history[2] and "validation 0.912 vs release 0.900" in history[2]
    assert "rejected" in history[3] and "v10" in history[3] and "from the updates of 3 devices" in history[3]
    assert "3 min ago" in history[4] and "copy of v3" in history[4] and "by coord-eu (key 471206175629d76e)" in history[4]
    assert "3215590913792989245" not in text and "e+09" not in text and "1796" not in text


def test_status_lists_rejection_reasons_on_their_own_line() -> None:
    """The reasons (updates' and other messages' alike) used to follow "other messages rejected", as
    if every rejected update had been some other message (operator trial)."""
    from coordinator.cli_status import render

    status = {"type": "status", "coordinator": "c", "region": "eu", "alive": True, "published_at": 0.0, "version": 2,
              "updates_rejected": 3, "extra": {"messages_rejected": 1, "rejected_by_reason": {"base_rejected": 3, "malformed": 1}}}
    lines = render(status, 0.0).splitlines()
    (updates,) = [ln for ln in lines if ln.startswith("updates ")]
    assert updates.endswith("other messages rejected 1") and "base_rejected" not in updates
    assert "rejected  by reason: base_rejected 3, malformed 1" in lines


# ---------------------------------------------------------------------- pretrain --out


def test_pretrain_says_what_it_does_and_names_a_detectors_score(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """helper-92: `edgeci pretrain --model detection` was silent for the minutes of a first
    pretraining (its one progress line is an INFO log) and called the mAP50 'accuracy'."""
    import types

    from demos import pretrain
    from edge_sdk.tasks import get_task

    assert main(["pretrain", "--model", "gestures", "--out", str(tmp_path / "g.npz")]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("pretraining gesture-cnn1d (seed 0)") and "held-out accuracy" in out
    digits = get_task("digits")
    detector_like = types.SimpleNamespace(name="detection", spec=digits.spec, pretrained=digits.pretrained,
                                          evaluate=lambda w: {"accuracy": 0.5, "mAP50": 0.5, "mAP50_95": 0.25})
    monkeypatch.setattr(pretrain, "get_task", lambda name: detector_like)
    assert main(["pretrain", "--model", "detection", "--out", str(tmp_path / "d.npz")]) == 0
    out = capsys.readouterr().out
    assert "held-out mAP50 50.0%" in out and "accuracy" not in out


@pytest.mark.parametrize("out, needle", [
    ("missing/dir/x.npz", "missing/dir does not exist (create it first)"),
    ("a-file/x.npz", "a-file is not a directory"),
    ("a-dir", "is a directory: give a file name"),
    ("/proc/x.npz", "cannot create a file in /proc"),
])
def test_pretrain_refuses_an_unwritable_out_before_pretraining(out: str, needle: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    if out.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    from demos import pretrain
    from edge_sdk.tasks import get_task

    task = get_task("digits")

    def no_pretraining(seed: int) -> None:
        raise AssertionError("pretrained before --out was checked")

    monkeypatch.setattr(task, "pretrained", no_pretraining)
    monkeypatch.setattr(pretrain, "get_task", lambda name: task)
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-dir").mkdir()
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert main(["pretrain", "--out", out]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edgeci pretrain: error: ") and needle in err and "Traceback" not in err, err
    assert sorted(tmp_path.rglob("*")) == before  # no directory made, no probe left


@pytest.mark.parametrize("argv", [
    ["emulate", "demos/scenarios/digits-headline.toml", "--quick"],
    ["emulate", "demos/scenarios/multiregion/digits-4regions.toml", "--quick"],
    ["scc-stream", "--quick"],
    ["run", "--devices", "1", "--duration", "1"],
], ids=["emulate", "regions", "scc-stream", "run"])
def test_an_out_that_cannot_be_a_folder_is_one_line_before_any_run(argv: list[str], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """An existing file as ``--out`` (or a path under one) was a NotADirectoryError or
    FileExistsError traceback; for scc-stream, only after every run."""
    import demos.run
    import devices.scc_fleet
    import devices.simulator

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(devices.simulator.Simulation, "run", no_work)
    monkeypatch.setattr(devices.scc_fleet, "run_scenario", no_work)
    monkeypatch.setattr(demos.run, "EmbeddedBroker", no_work)
    a_file = tmp_path / "deployed.npz"
    a_file.write_text("")
    for out in (a_file, a_file / "sub"):
        assert main([*argv, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"error: --out {out}" in err and "cannot make it a folder for the outputs" in err, err
        assert "Traceback" not in err
    assert a_file.read_text() == ""


def test_scc_stream_refuses_a_scenario_without_a_stream_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`edgeci scc-stream --scenario demos/scenarios/attacks.toml` ran the attacks emulation (77 s
    here), though its help asks for a scenario with a [stream] table."""
    import devices.simulator

    def no_work(*_: object, **__: object) -> None:
        raise AssertionError("ran the scenario")

    monkeypatch.setattr(devices.simulator.Simulation, "run", no_work)
    code = main(["scc-stream", "--scenario", str(ROOT / "demos/scenarios/attacks.toml"), "--quick", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "attacks.toml has no [stream] table" in err and "edgeci emulate" in err, err


def test_replot_without_runs_says_which_options_must_match(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["emulate", "demos/scenarios/digits-headline.toml", "--replot", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "lacks" in err and "the same --quick, --seeds and --strategies" in err, err


# ---------------------------------------------------------------------- run: its numbers


@pytest.mark.parametrize("flag, value, needle", [
    ("--duration", "-5", "argument --duration: must be above 0, got -5"),
    ("--rate", "0", "argument --rate: must be above 0, got 0"),
    ("--devices", "0", "argument --devices: must be above 0, got 0"),
    ("--k", "two", "argument --k: expected an integer, got 'two'"),
    ("--validation-size", "0", "0 leaves the release gate no validation set: use --no-gate"),
    ("--validation-size", "-3", "argument --validation-size: must be above 0, got -3"),
    ("--min-samples", "0", "argument --min-samples: must be at least 1, got 0"),
    # (accepted before: --epochs 0 ran, --lr -1 failed every training job with a traceback and exit 0,
    # --gate-margin -1 failed as "need 0 <= margin <= rollback_margin < 1", --duration inf never ended)
    ("--epochs", "0", "argument --epochs: must be at least 1, got 0"),
    ("--lr", "-1", "argument --lr: must be above 0, got -1"),
    ("--lr", "inf", "argument --lr: must be a finite number, got inf"),
    ("--duration", "inf", "argument --duration: must be a finite number, got inf"),
    ("--gate-margin", "-1", "argument --gate-margin: must be at least 0, got -1"),
    ("--gate-margin", "nan", "argument --gate-margin: must be at least 0, got nan"),
    ("--gate-margin", "1", "argument --gate-margin: must be below 1, got 1"),
])
def test_run_refuses_nonsense_numbers_before_writing(flag: str, value: str, needle: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["run", flag, value, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "edgeci run: error: " in err and needle in err, err
    assert not (tmp_path / "out").exists()


def tiny_run(tmp_path: Path, *flags: str) -> tuple[int, str]:
    code = main(["run", "--devices", "2", "--duration", "1", "--timeout", "0.5", "--no-progress",
                 "--out", str(tmp_path / "out"), *flags])
    return code, (tmp_path / "out" / "metrics.json").read_text()


def test_run_says_when_the_gate_is_off_or_its_validation_set_capped(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = tiny_run(tmp_path, "--validation-size", "5000")
    out, err = capsys.readouterr()
    assert code == 0
    assert "note: --validation-size 5000 is more than a quarter of the " in err and "the gate validates on " in err, err
    line = out.strip().splitlines()[-1]  # the default summary format, gate counts included
    assert " | candidates promoted 0, held 0, rejected 0 | updates accepted " in line, line
    code, _ = tiny_run(tmp_path, "--no-gate")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and " | no gate: every aggregated version released | " in line and "promoted" not in line, line


# ---------------------------------------------------------------------- help and messages


def help_of(*argv: str) -> str:
    from demos.cli import build_parser

    parser = build_parser(list(argv))
    if not argv:
        return parser.format_help()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
    return str(sub.format_help())


def test_help_lists_every_command_and_shows_no_python_none() -> None:
    from demos.cli import COMMANDS

    epilog = help_of().split("Every subcommand takes", 1)[0]
    listed = " ".join(line.strip().split("  ")[0] for line in epilog.splitlines() if line.strip().startswith("edgeci "))
    assert all(name in listed.replace("/", " ").split() for name in COMMANDS), listed
    for command in ("emulate", "scc-stream"):
        text = " ".join(help_of(command).split())
        assert "None" not in text and "(default: runs/emulate/<scenario name>)" in text, text
    assert "random seed of the pretraining" in help_of("pretrain")


@pytest.mark.parametrize("argv, prog, unknown", [
    (["run", "--devcies", "3"], "edgeci run", "--devcies 3"),
    (["coordinator", "--state-dir", "s", "--kk", "3"], "edgeci coordinator", "--kk 3"),
    (["--bogus"], "edgeci", "--bogus"),
    (["--bogus", "run"], "edgeci", "--bogus"),  # before the command's name: the top level's
])
def test_a_mistyped_option_is_refused_by_its_command(argv: list[str], prog: str, unknown: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`edgeci run --devcies 3` printed the usage of `edgeci` (argparse leaves a subcommand's
    unknown options to the top parser); the user needs the command's."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{prog}: error: unrecognized arguments: {unknown}" in err and err.startswith(f"usage: {prog} "), err


def test_help_shows_no_empty_default_and_says_the_unstated_ones() -> None:
    for command in ("emulate", "scc-stream", "coordinator", "run", "device"):
        assert "(default: )" not in help_of(command), command
    coordinator = " ".join(help_of("coordinator").split())
    assert "(default: 10 s for spyker, 60 s for hierfavg)" in coordinator and "(default: none sent;" in coordinator
    assert "seed of the validation split" in " ".join(help_of("run").split())


@pytest.mark.parametrize("command", ["rollback", "pin", "unpin"])
def test_control_help_says_what_the_command_does_its_refusals_and_exit_status(command: str) -> None:
    """helper-105: `edgeci rollback --help` named neither the coordinator's refusals (gate_rejected,
    version_unavailable, ...) nor the exit status, nor that a rollback abandons the versions after N
    and keeps a pin."""
    text = help_of(command)
    for needed in ("unknown_version", "version_unavailable", "gate_rejected", "bad_signature", "operator_mismatch",
                   "replayed", "Exit status: 0 done", "rollback keeps a pin", "new version number"):
        assert needed in text, needed


def test_status_refuses_a_coordinator_bundle_without_doubled_quotes(tmp_path: Path) -> None:
    import json

    from coordinator.cli_status import operator_auth
    from edge_sdk.errors import ConfigError

    (tmp_path / "bundle.json").write_text(json.dumps({"identity": "coord-eu", "role": "coordinator"}))
    with pytest.raises(ConfigError) as refused:
        operator_auth(argparse.Namespace(bundle=tmp_path))
    assert "''" not in str(refused.value) and "the coordinator bundle of 'coord-eu'" in str(refused.value)


def test_versions_after_an_operator_command_on_an_ungated_coordinator(tmp_path: Path) -> None:
    """release.json holds only operator commands without a gate: after `unpin` every commit is the
    release, but `versions` kept printing the release the last command recorded (README trial)."""
    import numpy as np

    from coordinator.cli_control import version_rows
    from coordinator.core import CommitVersion
    from coordinator.registry import Registry
    from edge_sdk.tasks import get_task

    spec = get_task("digits").spec
    reg = Registry(tmp_path, spec)
    reg.initialise(np.zeros(spec.size, np.float32), now=0.0, source="test")
    for v in range(1, 6):
        reg.commit(CommitVersion(version=v, weights=np.full(spec.size, v, np.float32), applied_changed={}, consumed=(),
                                 metadata={"release": v}))
        if v == 2:
            reg.record_release(2, False, {"action": "unpin", "version": 2})
    rows, release = version_rows(tmp_path)
    assert release["release"] == 5 and [r["verdict"] for r in rows if r["version"] == 5] == ["release"]
    reg.record_release(5, True, {"action": "pin", "version": 5})  # a later record wins when it is the newer
    assert version_rows(tmp_path)[1]["release"] == 5


def test_versions_of_a_fresh_state_dir_name_its_release(tmp_path: Path) -> None:
    """Without a gate nothing is in release.json: `versions` printed "release: ?" while v0 was
    the release (`status` said 0). The commits record the release; a fresh dir's is v0."""
    import numpy as np

    from coordinator.cli_control import version_rows
    from coordinator.registry import Registry
    from edge_sdk.tasks import get_task

    spec = get_task("digits").spec
    Registry(tmp_path, spec).initialise(np.zeros(spec.size, np.float32), now=0.0, source="test")
    rows, release = version_rows(tmp_path)
    assert release["release"] == 0 and rows[0]["verdict"] == "release"


@pytest.mark.parametrize("argv, needle", [([], "one of the arguments N --to is required"),
                                          (["3", "--to", "4"], "argument --to: not allowed with argument N"),
                                          (["-1"], "versions start at 0")])
def test_rollback_takes_its_version_like_pin_or_with_to(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`pin N` but `rollback --to N` (README trial): rollback now takes N too; one of the two, not both."""
    with pytest.raises(SystemExit) as exit_:
        main(["rollback", *argv, "--broker", "mqtt://127.0.0.1:1"])
    assert exit_.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["status", "--timeout", "-1"], "edgeci status: error: argument --timeout: must be above 0, got -1"),
    (["status", "--stale-after", "0"], "edgeci status: error: argument --stale-after: must be above 0, got 0"),
    (["rollback", "3", "--wait", "-1"], "edgeci rollback: error: argument --wait: must be above 0, got -1"),
    (["pin", "3", "--wait", "inf"], "edgeci pin: error: argument --wait: must be a finite number, got inf"),
    (["unpin", "--wait", "0"], "edgeci unpin: error: argument --wait: must be above 0, got 0"),
    # helper-119: 1e10 passed as finite and ended in an OverflowError traceback (rollback: after sending)
    (["status", "--timeout", "1e10"], "edgeci status: error: argument --timeout: must be below 1e+09 seconds, got 1e10"),
    (["rollback", "3", "--wait", "1e10"], "edgeci rollback: error: argument --wait: must be below 1e+09 seconds, got 1e10"),
])
def test_a_wait_that_is_no_wait_is_a_usage_error(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`edgeci status --timeout -1` said "no connection to broker ... within -1 s" and `rollback
    --wait -1` "no coordinator status on region 'eu': is it running?", of a broker and a
    coordinator that were there."""
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--broker", "mqtt://127.0.0.1:1"])
    assert exit_.value.code == 2 and needle in capsys.readouterr().err


def test_run_takes_the_tasks_d_min_unless_told() -> None:
    """`edgeci run --model gestures` used D_min 8, not the gesture task's 16 (helper-85): the
    default is now the task's, as for `edgeci device` and `edgeci label`."""
    from demos.run import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args([]).min_samples is None and p.parse_args(["--min-samples", "5"]).min_samples == 5


def run_args(*flags: str) -> argparse.Namespace:
    from demos.run import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(flags))


def test_run_plans_a_classifier_fleet_as_it_always_did() -> None:
    """`make run` (digits): the same validation slice, Dirichlet shares and TrainConfig(2, 0.05) as
    before the plan took the task's partition and training defaults."""
    import numpy as np

    from demos.run import plan_fleet, validation_count
    from devices.partition import partition
    from edge_sdk.tasks import get_task
    from edge_sdk.tasks.base import TrainConfig

    task = get_task("digits")
    data = task.data()
    args = run_args("--devices", "7", "--alpha", "0.5", "--seed", "2")
    plan = plan_fleet(args, task, data)
    order = np.random.default_rng(2).permutation(len(data.pool.y))
    n_val = validation_count(200, len(order))
    assert np.array_equal(plan.validation, order[:n_val])
    label_idx = order[n_val:]
    old = [label_idx[p] for p in partition(data.pool.y[label_idx], 7, "dirichlet", alpha=0.5, seed=2)]
    assert len(plan.parts) == 7 and all(np.array_equal(a, b) for a, b in zip(plan.parts, old))
    assert plan.train == TrainConfig(epochs=2, lr=0.05, seed=2)
    assert plan_fleet(run_args("--epochs", "1", "--lr", "0.2"), task, data).train == TrainConfig(epochs=1, lr=0.2, seed=0)


@pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None, reason="needs the detection extra (ultralytics)")
def test_run_starts_a_detection_fleet_with_a_gate_its_coordinator_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`edgeci run --model detection` stopped at the emulator's `[data] partition = "dirichlet"`
    error; behind it, its devices trained with SGD's lr 0.05 and its validation file was a pickled
    object array the coordinator refused. Up to the coordinator's start (no broker, no training)."""
    import numpy as np

    import demos.run
    from coordinator.validation import load_validation
    from edge_sdk.tasks.base import TrainConfig

    monkeypatch.setenv("EDGECI_HOME", str(tmp_path / "home"))
    seen: dict[str, object] = {}

    class Started(Exception):
        pass

    def coordinator(options: object, *, task: object, **_: object) -> None:
        split = load_validation(options.validation, task)  # type: ignore[attr-defined]
        seen.update(frames=len(split), boxes=sum(len(b) for b in split.y), task=task)
        raise Started

    monkeypatch.setattr(demos.run, "CoordinatorDaemon", coordinator)
    with pytest.raises(Started):
        main(["run", "--model", "detection", "--devices", "3", "--duration", "1", "--no-progress", "--broker",
              "mqtt://127.0.0.1:1", "--out", str(tmp_path / "out")])
    assert seen["frames"] == 64 and int(seen["boxes"]) > 0  # a quarter of the 256-frame pool, boxes and all
    plan = demos.run.plan_fleet(run_args("--model", "detection", "--devices", "3"), seen["task"], seen["task"].data())  # type: ignore[attr-defined]
    assert [len(p) for p in plan.parts] == [64, 64, 64]  # IID: the rest of the pool, evenly
    assert sorted(np.concatenate([plan.validation, *plan.parts]).tolist()) == list(range(256))
    assert plan.train == TrainConfig(epochs=5, batch_size=16, lr=1e-3)
    assert "partition" not in capsys.readouterr().err


def test_a_detection_run_names_its_plot_for_its_metric(tmp_path: Path) -> None:
    """A detection run's plot of mAP50 was written as accuracy.png."""
    import demos.run

    assert demos.run.plot_path(tmp_path, "mAP50") == tmp_path / "map50.png"
    assert demos.run.plot_path(tmp_path, "accuracy") == tmp_path / "accuracy.png"


def test_shares_below_d_min_are_said() -> None:
    """helper-94: with detection's D_min of 64, `edgeci run`'s default 20 devices got ~10 frames
    each: they labelled them all and never trained, without a word."""
    from devices.headless import below_d_min

    assert below_d_min([64, 64, 64], 64) is None
    note = below_d_min([10, 9, 70], 64)
    assert note is not None and note.startswith("2 of 3 devices' shares of the pool (9-10 samples) are below D_min 64")
    one = below_d_min([13], 64)
    assert one is not None and one.startswith("this device's share of the pool (13 samples) is below D_min 64")


@pytest.mark.parametrize("argv", [["pretrain", "--seed", "-1"],
                                  ["coordinator", "--seed", "-1", "--broker", "mqtt://127.0.0.1:1"]])
def test_a_negative_seed_is_a_usage_error_not_a_numpy_traceback(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """helper-89: numpy's `ValueError: expected non-negative integer` traceback from deep inside."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "argument --seed: must be at least 0, got -1" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "flag"), [(["run", "--model", "digitz"], "--model"),
                                            (["pretrain", "--model", "digitz"], "--model"),
                                            (["device", "--device-id", "d1", "--model", "digitz"], "--dataset/--model")])
def test_an_unknown_task_is_a_usage_error_in_every_command(argv: list[str], flag: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """helper-107: `run`, `pretrain` and `device` found an unknown task only when they first
    built it (exit 1, which the systemd unit retries), `coordinator` at parse time (exit 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {flag}: unknown task 'digitz'; known tasks: detection, digits" in err


def test_status_shows_the_peering_in_the_readable_form() -> None:
    """helper-88: ring, token, ages and merges were only in `edgeci status --json` (extra.peering),
    which is what an operator checks to see that models are exchanged."""
    from coordinator.cli_status import render

    now = 1796330000.0
    peering = {"name": "spyker", "ring": ["eu", "us", "ap"], "holds_token": True, "token": ["eu", "us"], "age": 12.5,
               "ages": {"us": 11.0}, "merges": 40, "syncs_timed_out": 1}
    text = render({"type": "status", "coordinator": "eu", "region": "eu", "alive": True, "published_at": now, "version": 3,
                   "extra": {"peering": peering}}, now)
    (line,) = [ln for ln in text.splitlines() if ln.startswith("peering")]
    assert "spyker · ring eu, us, ap" in line and "holds token yes" in line and "merges 40" in line
    assert "syncs timed out 1" in line and "ages" not in line  # (nested values: --json)
    plain = render({"type": "status", "coordinator": "eu", "region": "eu", "alive": True, "published_at": now, "version": 3,
                    "extra": {"peering": {"name": "none"}}}, now)
    assert not any(ln.startswith("peering") for ln in plain.splitlines())


def test_status_says_how_many_devices_vote_for_the_conversion_switch() -> None:
    """helper-112: the switch is decided by the median device (more than half of the window's
    devices with E1 > E2 on both metrics), but the status showed only the means, which can say
    "worse" while no switch comes."""
    from coordinator.cli_status import render

    now = 1796330000.0
    conv = {"policy": "gradient-inversion", "mode": "converting", "observations": 3, "e1_l1": 2.5, "e2_l1": 1.0,
            "e1_cos": 0.4, "e2_cos": 0.2, "worse_l1": 1, "worse_cos": 1}
    text = render({"type": "status", "coordinator": "eu", "region": "eu", "alive": True, "published_at": now, "version": 3,
                   "extra": {"conversion": conv}}, now)
    (line,) = [ln for ln in text.splitlines() if ln.startswith("stale")]
    assert "over 3 devices, worse in 1 (L1) / 1 (cosine): more than half on both switch" in line, line


@pytest.mark.parametrize("module", ["demos.emulate", "demos.scc_stream", "devices.paper_spyker", "devices.multiregion"])
def test_experiment_modules_run_with_python_m(module: str) -> None:
    """helper-90: `python -m demos.emulate …` printed nothing and exited 0 (no __main__ block)."""
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.startswith("usage: "), (done.stdout[:200], done.stderr[-500:])
