"""gptforge wiring: the only package that talks to Ray and MLflow."""
