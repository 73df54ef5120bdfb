"""The start-up heap frozen out of the collector's scans while an engine runs, and returned when it stops."""

import gc

from jaxllm import LLM, SamplingParams, heap


class Cycle:
    def __init__(self):
        self.me = self


def test_freeze_moves_the_heap_out_of_collections_and_thaw_returns_it():
    keep = Cycle()
    heap.freeze_startup_heap()
    try:
        assert gc.get_freeze_count() > 0
        assert not any(o is keep for o in gc.get_objects())  # no generation holds it: collections skip it
    finally:
        heap.thaw()
    assert gc.get_freeze_count() == 0 and any(o is keep for o in gc.get_objects())


def test_an_engine_freezes_while_it_runs(tiny_served_model):
    flags = dict(load_format="dummy", data_type="float32", max_total_token_num=512, max_req_input_len=32,
                 max_req_total_len=64, warmup=0, disable_log_stats=True)
    with LLM(str(tiny_served_model.path), **flags) as llm:
        assert gc.get_freeze_count() > 0
        out = llm.generate(["Hi"], SamplingParams(max_new_tokens=2), use_tqdm=False)
        assert len(out[0].token_ids) == 2
    assert gc.get_freeze_count() == 0  # a stopped engine's cycles can be collected again
