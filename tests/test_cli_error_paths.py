"""The operator's error paths (helper-152's audit): a flag's bad value is a usage error
(exit 2) in every command, an output that cannot be written is one line (exit 1) rather than
a traceback after the runs, and Ctrl-C says what was kept (exit 130)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from coordinator.broker import MosquittoProcess
from demos.cli import main

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = str(ROOT / "demos" / "scenarios" / "digits-headline.toml")
TINY = """
name = "tiny"
task = "digits"
duration_s = 120
eval_every_s = 60
target_accuracy = 0.5
seeds = [0]
[fleet]
devices = 4
mix = { laptop = 1 }
[data]
arrival_rate_per_h = 300
[device]
min_samples = 2
[training]
epochs = 1
[[runs]]
strategy = "spin"
params = { k = 2, timeout_s = 5.0 }
"""


def exit_code(argv: Sequence[str]) -> int:
    """``edgeci ARGV``'s exit status, whether argparse exits or main() returns it."""
    try:
        return main(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.mark.parametrize(("argv", "needle"), [
    (["emulate", HEADLINE, "--seeds", "x"], "argument --seeds: 'x' is not a seed or a range like 0-4"),
    (["emulate", HEADLINE, "--seeds", "0,0-2"], "argument --seeds: seed 0 given more than once"),
    (["emulate", HEADLINE, "--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (["emulate", HEADLINE, "--time-scale", "0", "--broker", "mqtt://127.0.0.1:1"], "argument --time-scale: must be above 0, got 0"),
    (["emulate", HEADLINE, "--transport", "codec", "--broker", "mqtt://127.0.0.1:1"], "--transport is the emulator's"),
    (["scc-stream", "--seeds", "3-1"], "argument --seeds: empty range '3-1'"),
    (["scc-stream", "--threads", "-1"], "argument --threads: must be at least 1, got -1"),
])
def test_a_bad_flag_of_emulate_or_scc_stream_is_a_usage_error(argv: list[str], needle: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """They exited 1, the status of a runtime failure, where every other command's bad flag
    value exits 2; --seeds and --threads were checked only after the scenario was loaded."""
    out = tmp_path / "out"
    assert exit_code([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"edgeci {argv[0]}: error: " in err and needle in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("in_the_way", ["runs/spin__seed0.json", "summary.json"])
def test_emulate_that_cannot_write_its_results_says_so_in_one_line(in_the_way: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A full disk (or a folder where a result file goes) after the runs raised an OSError
    traceback from write_run / write_text."""
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY, encoding="utf-8")
    out = tmp_path / "out"
    (out / in_the_way).mkdir(parents=True)
    assert main(["emulate", str(scenario), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"edgeci emulate: error: cannot write --out {out}: Is a directory ({out / in_the_way})" in err, err


def test_run_that_cannot_write_its_plot_says_so_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    (out / "accuracy.png").mkdir(parents=True)
    code = main(["run", "--devices", "2", "--duration", "1", "--timeout", "0.5", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and f"edgeci run: error: cannot write --out {out}: " in err, err


def _interrupt_when(argv: list[str], ready: Path, tmp_path: Path) -> tuple[int, str]:
    """Start ``edgeci ARGV``, SIGINT it (Ctrl-C) once ``ready`` exists; its status and stderr."""
    env = {**os.environ, "EDGECI_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "demos.cli", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.exists(), f"{ready} never appeared"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_ctrl_c_in_emulate_says_which_runs_are_kept(tmp_path: Path) -> None:
    """Ctrl-C exited 130 without a word: which runs were on disk, and that no table was written,
    the user had to find out."""
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY.replace("seeds = [0]", "seeds = [0, 1, 2, 3, 4, 5, 6, 7]"), encoding="utf-8")
    out = tmp_path / "out"
    code, err = _interrupt_when(["emulate", str(scenario), "--out", str(out), "--no-progress"],
                                out / "runs" / "spin__seed0.json", tmp_path)
    assert code == 130, err
    assert "edgeci emulate: interrupted: " in err and f"of 8 run(s) finished, kept in {out / 'runs'}; no tables or plots written" in err, err
    assert "Traceback" not in err and not (out / "summary.json").exists()


def test_ctrl_c_in_run_says_nothing_was_written_and_where_the_state_is(tmp_path: Path) -> None:
    out, state = tmp_path / "out", tmp_path / "state"
    code, err = _interrupt_when(["run", "--devices", "2", "--duration", "120", "--no-progress", "--out", str(out),
                                 "--state-dir", str(state)], state / "spec.json", tmp_path)
    assert code == 130, err
    assert f"edgeci run: interrupted: no plot or metrics written to {out}; the coordinator's state is in --state-dir {state}" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(("argv", "needle"), [
    (["device", "--device-id", "a/b"], "edgeci device: error: argument --device-id: invalid id 'a/b': use 1-64 characters"),
    (["device", "--device-id", "d1", "--region", "eu/+"], "edgeci device: error: argument --region: invalid id 'eu/+'"),
    (["status", "--region", "a/#"], "edgeci status: error: argument --region: invalid id 'a/#'"),
    (["rollback", "3", "--region", "a/#"], "edgeci rollback: error: argument --region: invalid id 'a/#'"),
])
def test_an_id_that_cannot_be_a_topic_level_is_a_usage_error(argv: list[str], needle: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """They exited 1 (and said "invalid region", not the flag) once the client started, where
    the coordinator refuses its own bad --region / --id at parse time with 2."""
    assert exit_code([*argv, "--broker", "mqtt://127.0.0.1:1", *(["--data-dir", str(tmp_path / "d")] if argv[0] == "device" else [])]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(("argv", "needle"), [
    (["device", "--device-id", "d1", "--key", "{file}"], "--cert and --key go together"),
    (["status", "--cert", "{file}"], "--cert and --key go together"),
    (["status", "--ca", "{missing}"], "--ca {missing}: no such file"),
    (["device", "--device-id", "d1", "--cert", "{missing}", "--key", "{file}"], "--cert {missing}: no such file"),
    (["status", "--ca", "{folder}"], "--ca {folder}: is a directory, not a file\n"),
    (["status", "--ca", "{bundle}"], "--ca {bundle}: is a directory, not a file (a bundle: pass it as --bundle)"),
    (["device", "--device-id", "d1", "--cert", "{folder}", "--key", "{file}"], "--cert {folder}: is a directory, not a file"),
])
def test_broker_credential_flags_are_named_in_their_errors(argv: list[str], needle: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """They said "a client certificate needs both cert_file and key_file" (BrokerAuth's fields)
    and "/x does not exist" (which flag?), and exited 1 where `edgeci coordinator` exits 2. A folder
    given for a file said "no such file" (helper-152)."""
    file, missing, folder, bundle = tmp_path / "some.pem", tmp_path / "missing.pem", tmp_path / "folder", tmp_path / "bundle"
    file.write_text("not used")
    folder.mkdir()
    bundle.mkdir()
    (bundle / "bundle.json").write_text("{}")
    names = {"file": file, "missing": missing, "folder": folder, "bundle": bundle}
    argv = [a.format(**names) for a in argv]
    assert exit_code([*argv, "--broker", "mqtts://127.0.0.1:1", *(["--data-dir", str(tmp_path / "d")] if argv[0] == "device" else [])]) == 2
    err = capsys.readouterr().err
    assert f"edgeci {argv[0]}: error: {needle.format(**names)}" in err and "Traceback" not in err, err


@pytest.mark.broker
def test_tls_to_a_plain_listener_says_which_url_to_use(mosquitto: MosquittoProcess, capsys: pytest.CaptureFixture[str]) -> None:
    """mqtts:// to a plain port said only "[Errno 104] Connection reset by peer"; the reverse
    mistake (mqtt:// to a TLS port) already said "is port N a TLS listener?"."""
    tls_url = mosquitto.url.replace("mqtt://", "mqtts://")
    assert main(["status", "--broker", tls_url, "--timeout", "3"]) == 1
    err = capsys.readouterr().err
    plain = mosquitto.url
    assert f"is port {plain.rsplit(':', 1)[1]} a plain MQTT listener? then {plain})" in err, err


def test_pki_on_a_full_disk_names_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    """A full disk (here: a file-size limit, the same failing write() without root) said only
    "edgeci pki: error: [Errno 28] No space left on device" and left a 0-byte .ca.key.tmp."""
    import resource

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))

    pki = tmp_path / "pki"
    proc = subprocess.run([sys.executable, "-m", "demos.cli", "pki", "init", "--dir", str(pki)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
                          capture_output=True, text=True, timeout=120, preexec_fn=small_files)
    assert proc.returncode == 1 and proc.stderr == f"edgeci pki: error: {pki / 'ca.key'}: File too large\n", proc.stderr
    assert list(pki.iterdir()) == []


def _small_files(limit: int) -> Callable[[], None]:
    """A subprocess's ``preexec_fn``: files of at most ``limit`` bytes, as on a disk that fills up
    (the same failing write(), without root or a real full disk)."""
    import resource

    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def _edgeci_on_a_small_disk(argv: list[str], limit: int, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "EDGECI_HOME": str(tmp_path / "home"),
           "MPLCONFIGDIR": str(tmp_path / "mpl")}
    return subprocess.run([sys.executable, "-m", "demos.cli", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=_small_files(limit))


def test_emulate_on_a_full_disk_leaves_no_partial_run_file(tmp_path: Path) -> None:
    """write_run wrote in place: a full disk left a truncated (or 0-byte) run file in runs/, which
    a later --replot read as a run. Now each file is written aside and renamed: the run's 3 KB
    JSON does not fit in 1,000 bytes, and nothing of it is left."""
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY, encoding="utf-8")
    out = tmp_path / "out"
    proc = _edgeci_on_a_small_disk(["emulate", str(scenario), "--out", str(out), "--no-progress"], 1000, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert [(p.name, p.stat().st_size) for p in (out / "runs").iterdir()] == []
    assert proc.stderr.endswith(f"edgeci emulate: error: cannot write --out {out}: File too large "
                                f"({out / 'runs' / 'spin__seed0.json'})\n"), proc.stderr


PLOT_ON_A_SMALL_DISK = """
import sys
from pathlib import Path
from demos.run import Timeline, plot
timeline = Timeline(t0=0.0, points=[(0.0, 0, 0.1), (5.0, 1, 0.5), (9.0, 2, 0.8)])
try:
    plot(timeline, Path(sys.argv[1]), "a run", timeline)
except OSError as exc:
    print(f"{type(exc).__name__}: {exc.strerror} ({exc.filename})")
"""


def test_run_on_a_full_disk_keeps_the_previous_plot(tmp_path: Path) -> None:
    """`edgeci run` drew its plot straight into accuracy.png: on a full disk the previous run's
    plot (--out runs/latest is every run's default) became a truncated file. Now it is kept.
    (The plot itself, as the command draws it: the command's coordinator writes a 39 KB model
    before it, so no file-size limit fails the 30 KB plot alone.)"""
    png = tmp_path / "out" / "accuracy.png"
    png.parent.mkdir()
    png.write_bytes(b"the previous run's plot")
    proc = subprocess.run([sys.executable, "-c", PLOT_ON_A_SMALL_DISK, str(png)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "MPLCONFIGDIR": str(tmp_path / "mpl")},
                          timeout=120, preexec_fn=_small_files(10_000))
    assert [p.name for p in png.parent.iterdir()] == ["accuracy.png"] and png.read_bytes() == b"the previous run's plot"
    assert proc.stdout == f"OSError: File too large ({png})\n", proc.stdout + proc.stderr


def test_pki_init_where_no_folder_can_be_made_names_the_flag_and_the_folder(capsys: pytest.CaptureFixture[str]) -> None:
    """`pki init --dir /proc/x` said only "/proc/x: No such file or directory": of what, doing what?"""
    assert Path("/proc/self").is_dir(), "needs Linux's /proc, where no folder can be made"
    assert main(["pki", "init", "--dir", "/proc/edgeci-pki"]) == 1
    err = capsys.readouterr().err  # (the reason is the kernel's: Linux says "No such file or directory")
    assert err.startswith("edgeci pki: error: --dir /proc/edgeci-pki: cannot create the folder: ") and err.count("\n") == 1, err
