"""gptforge stages as plain Python: no Ray, no MLflow (see ../shared/DESIGN.md)."""
