"""Train (or import) the dense base model and evaluate it.

Builds `model.name` with weights from `model.checkpoint`, timm's hub, or random
initialisation, trains it for `pretrain.epochs` (0: import only), evaluates it and
writes `results/pretrain/`:

- `model.safetensors` + `model.json`: the base model artifact
- `metrics.json`: val and test top-1/top-5, MACs and parameters
- `predictions.csv`: every test image's label and predicted class (empty without data),
  which the report pairs with the compressed models' predictions
- `history.csv`: per epoch, train loss, lr, optimizer steps and images so far, val top-1 and loss
- `log.txt`

Training keeps `checkpoint.pt` after every epoch and resumes from it after a kill;
the file is removed once the stage has finished.
"""

from __future__ import annotations

import logging

import pandas as pd
from torch import nn

from ..core import trace_costs
from ..runtime.artifacts import ModelSpec, save_model, write_csv, write_json
from ..runtime.context import StageContext, run_as_program, stage_main
from ..runtime.data import build_splits, make_loader
from ..runtime.models import create_base_model, data_config, input_shape
from ..runtime.training import HISTORY_COLUMNS, PREDICTION_COLUMNS, evaluate, finish, fit, prediction_table, validation

log = logging.getLogger(__name__)
HISTORY = [*HISTORY_COLUMNS, "val_top1", "val_loss"]


def run(context: StageContext) -> None:
    params, device = context.params, context.device
    source = params.model.checkpoint or ("timm hub" if params.model.hub else "random initialisation")
    log.info("model %s, weights from %s", params.model.name, source)
    model = create_base_model(
        params.model.name, params.model.num_classes, params.model.checkpoint, params.model.hub, params.model.kwargs
    )
    costs = trace_costs(model, input_shape(model))
    model.to(device)

    has_data = params.data.dataset == "digits" or (params.data.root is not None and params.data.root.is_dir())
    history: list[dict] = []
    metrics: dict = {"top1": None, "top5": None, "val_top1": None}
    predictions = pd.DataFrame(columns=PREDICTION_COLUMNS)
    if params.pretrain.epochs > 0 or has_data:
        splits = build_splits(params.data, data_config(model), model.num_classes)
        log.info(
            "data %s: %d train, %d val, %d test images",
            params.data.dataset,
            *map(len, (splits.train, splits.val, splits.test)),
        )
        batch, amp, workers = params.data.eval_batch_size, params.compute.amp, context.workers
        val_loader = make_loader(splits.val, batch, device, workers, splits.on_device)
        if params.pretrain.epochs > 0:
            criterion = nn.CrossEntropyLoss(label_smoothing=params.pretrain.label_smoothing)

            def loss(network, images, labels, rng):
                return criterion(network(images), labels)

            validate = validation(val_loader, device, amp)
            history = fit(
                model,
                splits.train,
                loss,
                validate,
                params.pretrain,
                section="pretrain",
                on_device=splits.on_device,
                **context.fit_arguments(),
            )
        val = evaluate(model, val_loader, device, amp, "val")
        test_loader = make_loader(splits.test, batch, device, workers, splits.on_device)
        test = evaluate(model, test_loader, device, amp, "test", True)
        metrics = {"top1": test["top1"], "top5": test["top5"], "val_top1": val["top1"]}
        predictions = prediction_table(test)
        log.info("test top-1 %.2f%%, val top-1 %.2f%%", 100 * test["top1"], 100 * val["top1"])
    else:
        log.warning("data.root %s not found: imported the weights without evaluating them", params.data.root)

    metrics.update(macs=costs.dense_macs, params=costs.dense_params, seconds=context.seconds())
    spec = ModelSpec(
        model=params.model.name, model_kwargs={**params.model.kwargs, "num_classes": params.model.num_classes}
    )
    save_model(context.output("model"), model.cpu(), spec)
    write_csv(context.output("history"), pd.DataFrame(history, columns=HISTORY))
    write_json(context.output("metrics"), metrics)
    write_csv(context.output("predictions"), predictions)
    finish(context.out)


def main(argv: list[str] | None = None) -> int:
    return stage_main("pretrain", __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    run_as_program(main)
