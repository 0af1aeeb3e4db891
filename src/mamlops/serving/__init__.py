"""The HTTP server over taught and exported classifiers (FastAPI, no torch). Imports the
classifier layer and the base.

Split by concern, bottom up: ``schemas`` (the JSON of every answer), ``uploads`` (upload limits
and image decoding), ``state`` (what the app loads once, and the dependencies that read it),
the routers ``predict`` (fixed ONNX models) and ``teach`` (taught classifiers, the page), and
``serve`` (builds the app from them and runs it).
"""
