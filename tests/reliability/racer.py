"""One side of a race, run as a script by tests/reliability/test_concurrency.py:

    python racer.py flow PARAMS READY GO      # the data stages as a Prefect flow (real tasks)
    python racer.py register PARAMS READY GO  # the register stage

It imports everything, touches READY, waits for GO (so both sides start within milliseconds of each other),
runs, and prints ``RESULT <json>``: ``{"ok": true, ...}`` or ``{"ok": false, "type": ..., "error": ...}``.
For ``register``, ``$RACE_ARRIVED``/``$RACE_OTHER`` widen the race: having read the current champion, a
side waits (up to 10 s) until the other has read it too, as two slow registrations would.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _data_flow(params: str) -> dict:
    from prefect import flow

    from visiontune.config import load_params
    from visiontune.tasks.stages import TASKS

    @flow(name="racing-data-stages")
    def data_flow() -> dict:
        cfg = load_params(params, [])
        return {name: TASKS[name](cfg) for name in ("validate", "normalize", "convert")}

    return data_flow


def _register(params: str):
    from visiontune.config import load_params
    from visiontune.pipeline import register

    real = register._champion

    def champion_then_wait(*args, **kwargs):
        found = real(*args, **kwargs)
        Path(os.environ["RACE_ARRIVED"]).touch()
        deadline = time.monotonic() + 10
        while not Path(os.environ["RACE_OTHER"]).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return found

    register._champion = champion_then_wait
    return lambda: register.register_stage(load_params(params, []))


def main(kind: str, params: str, ready: str, go: str) -> None:
    run = _data_flow(params) if kind == "flow" else _register(params)
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.005)
    try:
        result = {"ok": True, "result": run()}
    except Exception as e:  # noqa: BLE001 - reported to the test, which judges it
        result = {"ok": False, "type": type(e).__name__, "error": str(e)}
    print("RESULT " + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
