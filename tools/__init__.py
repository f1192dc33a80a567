"""Developer tools: what measures the project (benchmarks, the naive yardstick, the GPU check), run as
`python -m tools.<name>` from the repository root. What users run stays at the root."""
