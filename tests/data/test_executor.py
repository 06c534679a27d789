"""The data stages on Dask (data.executor: dask): the same bytes as on this machine's cores, quarantine included."""

from __future__ import annotations

import json
import shutil

import pytest

from datafixtures import gradient, jpeg, make_cfg, png
from visiontune.data.executor import DataExecutor, chunk_by_record
from visiontune.data.normalize import SourceChangedError, normalize_stage
from visiontune.data.validate import validate_stage


def test_chunks_hold_whole_records_in_order():
    items = list("abcdefg")
    records = [0, 0, 1, 2, 2, 2, 3]  # record 2 has three images: they stay in one chunk
    assert chunk_by_record(items, records, 2) == [["a", "b", "c"], ["d", "e", "f", "g"]]
    assert chunk_by_record(items, None, 3) == [["a", "b", "c"], ["d", "e", "f"], ["g"]]
    assert chunk_by_record([], None, 3) == []
    with pytest.raises(ValueError, match="2 group keys for 7 items"):
        chunk_by_record(items, [0, 1], 2)


def test_executor_reads_every_setting_of_the_data_section(tmp_path):
    cfg = make_cfg(tmp_path, tmp_path / "w", executor="dask", dask_address="tcp://10.0.0.5:8786", dask_workers=3,
                   dask_chunk=7)
    assert DataExecutor.of(cfg.data) == DataExecutor("dask", "tcp://10.0.0.5:8786", 3, 7)
    local = DataExecutor.of(make_cfg(tmp_path, tmp_path / "w").data)
    assert local.kind == "local" and local.map(abs, [-1, 2], local=lambda xs: [x * 10 for x in xs]) == [-10, 20]


def _outputs(work) -> dict[str, bytes]:
    return {str(p.relative_to(work)): p.read_bytes() for p in sorted(work.rglob("*"))
            if p.is_file() and p.name != ".visiontune.lock"}


@pytest.mark.slow  # two 2-worker LocalClusters start (spawned workers import Prefect): ~30 s on 2 idle cores
def test_dask_outputs_are_byte_identical_to_local_quarantine_included(bad_raw, prefect_harness):
    raw, _ = bad_raw
    # Records with several images (one chunk must hold all of a record's images) and more images to resize.
    lines = (raw / "annotations.jsonl").read_bytes()
    for i in range(6):
        (raw / f"multi{i}a.png").write_bytes(png(gradient(1200 + 40 * i, 500)))
        (raw / f"multi{i}b.jpg").write_bytes(jpeg(gradient(200, 150 + 10 * i).convert("L")))
    extra = [{"image": [f"multi{i}a.png", f"multi{i}b.jpg"], "text": f"m{i}"} for i in range(6)]
    (raw / "annotations.jsonl").write_bytes(lines + "".join(json.dumps(r) + "\n" for r in extra).encode())
    work = raw.parent / "work"

    local_cfg = make_cfg(raw, work, max_failure_ratio=0.9)
    validate_stage(local_cfg)
    normalize_stage(local_cfg)
    local = _outputs(work)
    shutil.rmtree(work)

    # validate as the retrain flow runs it (its Prefect task, inside a flow: the Dask flow nests in that task),
    # on the temporary LocalCluster the stage starts; normalize on a running cluster, by its address
    from prefect import flow

    from visiontune.tasks.stages import TASKS

    @flow(name="validate-on-dask")
    def validate_in_a_flow() -> dict:
        return TASKS["validate"](make_cfg(raw, work, max_failure_ratio=0.9, executor="dask", dask_workers=2,
                                          dask_chunk=4))

    v = validate_in_a_flow()
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        on_cluster = make_cfg(raw, work, executor="dask", dask_address=cluster.scheduler_address, dask_chunk=4)
        n = normalize_stage(on_cluster)
        on_dask = _outputs(work)
        # A worker's error reaches the stage as itself (the task retry policy classifies it by type).
        shutil.rmtree(work / "normalized")
        (raw / "multi0a.png").write_bytes(png(gradient(900, 500)))
        with pytest.raises(SourceChangedError, match=r"multi0a\.png changed after validation"):
            normalize_stage(on_cluster)

    assert v["quarantined"] > 5 and n["written"] == n["images"] > 12  # bad rows quarantined, chunks of 4
    assert sorted(on_dask) == sorted(local)
    assert [k for k in local if on_dask[k] != local[k]] == []  # quarantine.jsonl, gx_result.json, images ...
