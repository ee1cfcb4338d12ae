"""``python -m dsmoe.train OUT [--steps N] …``: train the minimoe model (:mod:`dsmoe.train.loop`)."""

from __future__ import annotations

import argparse
import json

from dsmoe.train.loop import TrainOptions, train


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dsmoe.train", description=__doc__)
    p.add_argument("out")
    p.add_argument("--log", default=None, help="append JSON lines here as well (copied into each checkpoint)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--set", dest="overrides", default="{}", help="config fields as a JSON object")
    for name, f in TrainOptions.__dataclass_fields__.items():
        if name != "overrides":
            p.add_argument("--" + name.replace("_", "-"), type=type(f.default), default=f.default)
    a = vars(p.parse_args(argv))
    out, log, force, overrides = a.pop("out"), a.pop("log"), a.pop("force"), json.loads(a.pop("overrides"))
    train(out=out, options=TrainOptions(**a, overrides=overrides), force=force, log_path=log)


if __name__ == "__main__":
    main()
