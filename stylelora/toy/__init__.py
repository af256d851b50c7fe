"""Demo, benchmark and test support — never imported by the core package.

``world``: the procedural toy world the built-in ``tiny`` base was pretrained on, and the styles the examples teach.
``classifiers``: a small CNN that reads a toy picture's shape, colour and styles (the quality benchmark's judge).
``reference``: random-weight SD1.5 / SDXL pipelines for speed and memory benchmarks.
"""
