"""Vision towers of vision-language models and the interface the multimodal pipeline uses
(`interface.py`; `registry.py` finds a family by `VisionConfig.family`)."""
