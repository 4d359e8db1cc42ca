"""The in-process transport (``codec.carry_decoded``): frames keep their exact bytes, receivers
in the same process skip parsing them, and an emulator run gives the same results with and
without it."""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_sdk.errors import MessageTooLarge
from edge_sdk.signing import Signer
from edge_sdk.wire import codec
from edge_sdk.wire.messages import Ack, Invite, Message, ModelMsg, Pull, Status, Update
from tests.test_emulator import simulate, small_scenario

W = np.linspace(-1, 1, 10, dtype=np.float32)
CARRIED: list[Message] = [
    Pull(device="d1", seq=1, model_id="m", have_version=2, n_samples=10),
    ModelMsg(model_id="m", version=4, reply_to=1, weights=W, hints={"lr": 0.1, "epochs": 2}),
    Update(device="d1", seq=7, model_id="m", base_version=3, n_samples=5, weights=W, loss=0.5, train_seconds=1.5, nonce=9),
    Ack(device="d1", seq=7, status="accepted", version=4),
    Invite(device="d1", round=3, version=4),
]


def _fields(msg: Message) -> dict[str, Any]:
    out = {name: getattr(msg, name) for name in msg.__dataclass_fields__}
    if "weights" in out:
        out["weights"] = out["weights"].tolist()
    return out


@pytest.mark.parametrize("msg", CARRIED, ids=lambda m: m.TYPE)
def test_a_carried_frame_has_the_exact_bytes_and_decodes_to_what_parsing_gives(msg: Message) -> None:
    plain = codec.encode(msg)
    with codec.carry_decoded():
        carried = codec.encode(msg)
    assert type(carried) is codec.CarriedFrame and type(plain) is bytes
    assert carried == plain, "the bytes on the (emulated) wire are the real frame"
    got, parsed = codec.decode_frame(carried), codec.decode_frame(plain)
    assert type(got.message) is type(parsed.message) and got.signature is None
    assert _fields(got.message) == _fields(parsed.message)
    weights = getattr(got.message, "weights", None)
    if weights is not None:
        assert weights.dtype == np.float32 and not weights.flags.writeable, "read-only, as a decoded view"
        assert weights is not getattr(msg, "weights", None), "never the sender's own array"
    if isinstance(msg, ModelMsg):
        assert isinstance(got.message, ModelMsg) and got.message.hints is not msg.hints


@pytest.mark.parametrize("msg", CARRIED, ids=lambda m: m.TYPE)
def test_a_carried_frame_has_the_exact_size_and_builds_its_bytes_only_on_demand(msg: Message) -> None:
    plain = codec.encode(msg)
    with codec.carry_decoded():
        carried = codec.encode(msg)
    assert len(carried) == len(plain), "the network model charges the real size"
    assert bytes(carried) == plain and hash(carried) == hash(plain)
    assert not isinstance(carried, bytes | bytearray | memoryview)
    with pytest.raises(TypeError):
        memoryview(carried)  # a reader that wants a buffer gets an error, never other bytes
    with pytest.raises(TypeError):
        carried[:4]


def test_an_immutable_sender_array_is_shared_and_any_other_is_copied_once() -> None:
    """A read-only vector over ``bytes`` cannot change: the receiver gets that very array
    (and, for an Update, the sender's message); a writeable one is copied for the receiver."""
    frozen = np.frombuffer(W.tobytes(), dtype=np.float32)
    update = Update(device="d1", seq=7, model_id="m", base_version=3, n_samples=5, weights=frozen, loss=0.5, nonce=9)
    model = ModelMsg(model_id="m", version=4, reply_to=1, weights=frozen, hints={"lr": 0.1})
    with codec.carry_decoded():
        carried_update, carried_model = codec.encode(update), codec.encode(model)
        copied = codec.encode(CARRIED[2])
    assert codec.decode(carried_update) is update
    got_model = codec.decode(carried_model)
    assert isinstance(got_model, ModelMsg) and got_model.weights is frozen and got_model.hints is not model.hints
    got_update = codec.decode(copied)
    assert isinstance(got_update, Update)
    weights = got_update.weights
    assert weights is not W and not weights.flags.writeable and type(weights.base) is bytes
    np.testing.assert_array_equal(weights, W)
    assert bytes(carried_update) == codec.encode(update) and bytes(carried_model) == codec.encode(model)


def test_the_size_cap_still_applies_and_other_frames_are_parsed_as_usual() -> None:
    with codec.carry_decoded():
        carried = codec.encode(CARRIED[2])
        signed = codec.encode(CARRIED[1], signer=Signer.generate(), scope="r/dev/model")
        half = codec.encode(CARRIED[2], encoding="f2")
        status = codec.encode(Status(region="r", coordinator="c", version=1, updates_accepted=1, updates_rejected=0,
                                     updates_duplicate=0, devices_seen=2, buffered=0))
    with pytest.raises(MessageTooLarge):
        codec.decode_frame(carried, max_bytes=len(carried) - 1)
    for payload in (signed, half, status):
        assert type(payload) is bytes, "signed, non-f4 and other message types are not carried"
    assert codec.decode_frame(signed).signature is not None
    assert type(codec.encode(CARRIED[0])) is bytes, "outside the block frames are plain bytes"


def test_only_the_thread_inside_the_block_carries() -> None:
    """The emulator switches the transport on for its run: a thread publishing to a real
    broker meanwhile must still get bytes (a CarriedFrame handed to a socket would fail)."""
    seen: list[type] = []
    with codec.carry_decoded():
        other = threading.Thread(target=lambda: seen.append(type(codec.encode(CARRIED[2]))))
        other.start()
        other.join()
        assert type(codec.encode(CARRIED[2])) is codec.CarriedFrame
    assert seen == [bytes]


def test_a_carried_frame_is_freed_by_reference_counting_alone() -> None:
    gc.collect()
    gc.disable()
    try:
        with codec.carry_decoded():
            payload = codec.encode(CARRIED[2])
        weights = codec.decode_frame(payload).message.weights  # type: ignore[union-attr]
        alive = weakref.ref(weights)
        del weights, payload
        assert alive() is None, "a reference cycle would keep every carried update until the next GC"
    finally:
        gc.enable()


def _comparable(result: Any) -> tuple[Any, Any]:
    """A run's rows and summary, without its wall-clock figures and the transport's name."""
    return result.rows, {k: v for k, v in result.summary.items() if k not in ("wall_s", "virtual_per_wall", "transport")}


def _result(carried: bool, strategy: str, **params: Any) -> tuple[Any, Any]:
    sim = simulate(small_scenario(), strategy, **params)
    return _comparable(sim.run(transport="in-process" if carried else "codec"))


@pytest.mark.parametrize(("strategy", "params"), [("spin", {"k": 3, "timeout_s": 10.0}), ("fedbuff", {"k": 3, "select": 4, "population": 12})])
def test_an_emulator_run_is_identical_with_the_in_process_transport(strategy: str, params: dict[str, Any]) -> None:
    codec_run = _result(False, strategy, **params)
    carried_run = _result(True, strategy, **params)
    assert codec_run[1]["updates_accepted"] > 5, "the run must actually do something"
    assert carried_run == codec_run


SHIPPED = [  # (scenario, run or method index): what the two small scenarios above do not reach
    ("staleness-gi.toml", 0),  # [delay]: the stragglers' link holds updates (it decodes their payloads)
    ("attacks-gate-delay.toml", 2),  # attackers, clipping, the gate's delayed verdicts
    ("digits-headline.toml", 3),  # FedBuff: sampled invites, devices joining late
]


@pytest.mark.parametrize(("path", "index"), SHIPPED, ids=[p for p, _ in SHIPPED])
def test_shipped_scenarios_give_the_same_results_on_both_transports(path: str, index: int) -> None:
    from coordinator.methods import make_method
    from devices.report import load_task
    from devices.scenario import load_scenario
    from devices.simulator import Simulation

    sc = load_scenario(Path(__file__).resolve().parents[1] / "demos" / "scenarios" / path).quick()
    spec = sc.runs[index]
    task = load_task(spec.settings.task, spec.settings.task_options)

    def run(transport: str) -> tuple[Any, Any]:
        method = make_method(spec.strategy, params=spec.params, coordinator_id="coordinator")
        sim = Simulation(task, spec.settings, method.strategy, peering=method.peering, seed=sc.settings.seeds[0],
                         label=spec.label, params=spec.params)
        return _comparable(sim.run(transport=transport))

    codec_run, carried_run = run("codec"), run("in-process")
    assert codec_run[1]["events"] > 100, "the run must actually do something"
    assert carried_run == codec_run


def test_regional_runs_give_the_same_results_on_both_transports() -> None:
    """Every regional method (Spyker, NebulaFL, one server, HierFAVG): signed models and peer
    messages beside the carried frames."""
    from devices.multiregion import parse_multiregion
    from devices.simulator import Simulation
    from edge_sdk.tasks import get_task
    from tests.test_multiregion import tiny

    sc = parse_multiregion(tiny())
    task = get_task("digits", device="cpu")
    for method in sc.methods:
        runs = [_comparable(Simulation.regional(task, sc, method, 8, 0).run(transport=transport)) for transport in ("codec", "in-process")]
        assert runs[0][1]["updates"] > 0, method.label
        assert runs[1] == runs[0], method.label


def test_edgeci_emulate_transport_option_gives_the_same_files(tmp_path: Path) -> None:
    """`edgeci emulate --transport codec` builds and parses every frame; the default carries
    them in-process: every output file that holds no wall-clock time is byte-identical."""
    import argparse
    import json

    from demos import emulate

    scenario = tmp_path / "t.toml"
    scenario.write_text('name = "t"\ntask = "digits"\nduration_s = 240\neval_every_s = 60\nseeds = [0]\n'
                        '[fleet]\ndevices = 6\nmix = { laptop = 1 }\n[data]\narrival_rate_per_h = 300\n'
                        '[device]\nmin_samples = 2\n[training]\nepochs = 1\n'
                        '[[runs]]\nstrategy = "spin"\nparams = { k = 2, timeout_s = 5.0 }\n', encoding="utf-8")
    parser = argparse.ArgumentParser()
    emulate.add_arguments(parser)
    for transport in ("codec", "in-process"):
        args = parser.parse_args([str(scenario), "--out", str(tmp_path / transport), "--no-progress", "--transport", transport])
        assert emulate.run(args) == 0
    for transport in ("codec", "in-process"):  # the option reached the run
        run = json.loads((tmp_path / transport / "runs" / "spin__seed0.json").read_text(encoding="utf-8"))
        assert run["summary"]["transport"] == transport
    csv = [(tmp_path / t / "runs" / "spin__seed0.csv").read_bytes() for t in ("codec", "in-process")]
    table = [(tmp_path / t / "time_to_target.md").read_bytes() for t in ("codec", "in-process")]
    assert csv[0] == csv[1] and len(csv[0].splitlines()) == 6 and table[0] == table[1]
    with pytest.raises(SystemExit):
        parser.parse_args([str(scenario), "--transport", "carrier-pigeon"])
