"""Fine-tuning a CCLD teacher, distilling a student from it, and measuring the student.

`ccld encode-dataset`, `ccld autoencoder-scale`, `ccld train`, `ccld distill` and
`ccld evaluate` (see `commands.py`) are thin layers over the modules here; `engine.py` holds the
one training loop that both training and distillation run.
"""
