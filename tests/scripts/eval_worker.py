"""Run by the evaluation tests in real processes (alone or under torchrun with gloo).

usage: eval_worker.py OUT.json DATA [DATA ...] -- key=value ...
Evaluates the model on each DATA with the EvalConfig overrides after ``--`` (``out=DIR`` becomes
``DIR/0``, ``DIR/1``, ... per DATA) and writes, from rank 0, ``{DATA: metrics}`` to OUT.json.
"""

import json
import sys

from signscale import config
from signscale.evaluation.evaluate import EvalConfig, evaluate
from signscale.training import distributed


def main() -> None:
    args = sys.argv[1:]
    split = args.index("--")
    out, datas, overrides = args[0], args[1:split], args[split + 1:]
    base = next((o.split("=", 1)[1] for o in overrides if o.startswith("out=")), "")
    overrides = [o for o in overrides if not o.startswith("out=")]
    results = {}
    for i, data in enumerate(datas):
        extra = [f"out={base}/{i}"] if base else []
        cfg = config.load(EvalConfig, None, [*overrides, *extra, f"data={data}"])
        results[data] = evaluate(cfg).metrics
    if distributed.rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    distributed.shutdown()


if __name__ == "__main__":
    main()
