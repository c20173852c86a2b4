"""gptforge stages as plain Python: no Ray, no MLflow (tests/test_layering.py checks it)."""
