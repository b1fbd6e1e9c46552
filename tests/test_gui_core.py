"""The GUI's Qt-free machinery: the asyncio thread, ring buffers, telemetry points, the preview."""
from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest

from app.devices.inventory import Device
from app.workspace.loop import AsyncLoop, LoopError
from app.workspace.preview import compute_preview
from app.workspace.series import Ring, SeriesStore, record_points
from workers.config import RunSettings


def test_loop_runs_coroutines_on_its_own_thread():
    loop = AsyncLoop("t-loop").start()
    try:
        async def where():
            await asyncio.sleep(0)
            return threading.current_thread().name
        assert loop.submit(where()).result(5) == "t-loop"
        assert loop.call(lambda x: x * 2, 21).result(5) == 42
        fut = loop.call(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            fut.result(5)
    finally:
        assert loop.stop()
    assert not any(t.name == "t-loop" for t in threading.enumerate())
    with pytest.raises(LoopError):
        loop.submit(asyncio.sleep(0))


def test_loop_stop_lets_cancelled_tasks_clean_up():
    loop = AsyncLoop().start()
    cleaned, started = threading.Event(), threading.Event()

    async def forever():
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.01)     # cleanup that awaits (the launcher kills workers here)
            cleaned.set()
    loop.submit(forever())
    assert started.wait(5)
    assert loop.stop(10)
    assert cleaned.is_set()


def test_ring_keeps_newest_in_order():
    r = Ring(4)
    assert len(r) == 0 and r.last() is None
    for i in range(6):
        r.append(i, i * 10)
    xs, ys = r.arrays()
    assert xs.tolist() == [2, 3, 4, 5] and ys.tolist() == [20, 30, 40, 50]
    xs[0] = 99                                  # a copy: the ring is unaffected
    assert r.arrays()[0][0] == 2 and r.last() == (5.0, 50.0)
    r.clear()
    assert len(r) == 0


def test_store_versions_and_csv():
    st = SeriesStore(capacity=8)
    v0 = st.version
    st.append("latency", "a", 0.0, 1.0)
    st.append("latency", "b", 0.0, 2.0)
    v1 = st.version
    st.append("energy", "a", 1.0, 0.5)
    assert {(k.series, k.device) for k in st.changed_since(v0)} == {("latency", "a"), ("latency", "b"),
                                                                    ("energy", "a")}
    assert [(k.series, k.device) for k in st.changed_since(v1)] == [("energy", "a")]
    assert st.devices("latency") == ["a", "b"] and st.count("latency") == 2
    buf = io.StringIO()
    assert st.write_csv(buf) == 3
    assert buf.getvalue().splitlines()[0] == "series,device,t_s,value"
    st.drop_device("a")
    assert st.devices() == ["b"]


def test_record_points():
    rec = {"type": "step", "device": "d", "t": 110.0, "samples": 32, "local_samples": 16, "latency_s": 0.5,
           "latency_per_sample_s": 0.002, "energy_j": 3.2, "rss_bytes": 2**30}
    pts = {s: (x, y) for s, _d, x, y in record_points(rec, 100.0)}
    assert pts["latency"] == (10.0, pytest.approx(2.0))
    assert pts["energy"][1] == pytest.approx(0.1)
    assert pts["throughput"][1] == pytest.approx(32.0)
    assert pts["memory"][1] == pytest.approx(1024.0)
    assert record_points({"type": "event", "device": "d", "t": 1}, 0) == []
    oom = record_points({"type": "oom", "device": "d", "t": 5, "peak_mem_bytes": 2**20}, 0)
    assert oom == [("memory", "d", 5.0, 1.0)]


def test_preview_orders_and_flags():
    devs = [Device("a", "127.0.0.1", labels={"preset": "jetson-nano"}),
            Device("b", "127.0.0.2", labels={"preset": "laptop"})]
    pv = compute_preview(RunSettings(model="gpt2-s", parallelism="dp"), ["a", "b"], devs, devs)
    assert [d.name for d in pv.devices] == ["a", "b"]
    a = pv.device("a")
    assert a.limit_bytes == 4 * 2**30 and a.capped_peak_bytes > 0
    assert pv.recommendation
    pp = compute_preview(RunSettings(model="gpt2-s", parallelism="pp"), ["b", "a"])
    assert pp.stages and [s["ranks"] for s in pp.stages] == [[0], [1]]
    assert sorted(pp.suggested_order) == ["a", "b"]
    empty = compute_preview(RunSettings(), [])
    assert not empty.devices and "Tick" in empty.recommendation
    assert np.isfinite(pv.total("latency_per_sample_s"))
