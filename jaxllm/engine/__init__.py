"""The serving engine: KV memory, scheduler, runner, sampler, detokenizer and the loop that ties them."""
