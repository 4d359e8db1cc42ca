"""ACME's task as edgeci sees it. Importable without torch: a device with the lean install
(``pip install edgeci``, no ``[train]``) names ``acme_vision.info:TASK`` and serves with the
ONNX graph in ``graphs/``."""

from pathlib import Path

from edge_sdk.tasks.base import TrainConfig
from edge_sdk.tasks.registry import InputContract, TaskInfo

SIDE = 12
CLASSES = ("bar", "ring", "cross")

TASK = TaskInfo(
    name="acme-parts",                   # a name of its own (not a built-in task's)
    factory="acme_vision.tasks:AcmeCnn",  # the torch half: imported only where it trains
    task_name="acme-parts",               # the task object's `name`
    model_id="acme-parts-cnn",            # its spec's model id (what models on the wire carry)
    sample_kind="array",
    n_classes=len(CLASSES),
    min_samples=12,                       # D_min: labels before a device's first training round
    contract=InputContract(task="acme-parts", shape=(1, SIDE, SIDE), value_range=(0.0, 1.0),
                           hint="grey pixels divided by 255"),
    class_names=CLASSES,
    train=TrainConfig(epochs=3, batch_size=8, lr=0.05),  # local fine-tuning defaults
    graphs=Path(__file__).resolve().parent / "graphs",   # python -m edge_sdk.tasks.registry --write-graphs ...
)
