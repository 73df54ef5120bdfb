"""The profile bench's reading of a trace: device events only, busy time with overlaps counted once, kernels
per step."""

from jaxllm.bench.profile import busy_us, device_events, kernel_table


def _trace():
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}}]
    host = [{"ph": "X", "pid": 1, "tid": 1, "name": "PjitFunction(step)", "ts": 0.0, "dur": 900.0}]
    device = [  # two steps: a matmul and an attention kernel each, the second step's overlapping on a 2nd stream
        {"ph": "X", "pid": 7, "tid": 1, "name": "gemm", "ts": 10.0, "dur": 40.0},
        {"ph": "X", "pid": 7, "tid": 1, "name": "attention", "ts": 55.0, "dur": 15.0},
        {"ph": "X", "pid": 7, "tid": 1, "name": "gemm", "ts": 200.0, "dur": 44.0},
        {"ph": "X", "pid": 7, "tid": 2, "name": "attention", "ts": 230.0, "dur": 21.0},
        {"ph": "i", "pid": 7, "tid": 1, "name": "marker", "ts": 5.0},
    ]
    return {"traceEvents": meta + host + device}


def test_device_events_busy_time_and_kernel_table():
    events = device_events(_trace())
    assert sorted(e["name"] for e in events) == ["attention", "attention", "gemm", "gemm"]
    assert busy_us(events) == 40.0 + 15.0 + (251.0 - 200.0)  # the overlap of the last two counted once
    table = kernel_table(events, steps=2, top=5)
    assert [row[0] for row in table] == ["gemm", "attention"]
    name, calls, us, share = table[0]
    assert (calls, us) == (1.0, 42.0) and abs(share - 84.0 / 120.0) < 1e-12
