"""The HTTP server: one Quart app, one module per wire format (LightLLM, TGI, OpenAI)."""
