"""Developer tools: what measures the project (the benchmark and its naive yardstick, the GPU check,
the cache timing) and retakes its pictures (the dashboard screenshot), run as `python -m tools.<name>`
from the repository root. What users run stays at the root."""
