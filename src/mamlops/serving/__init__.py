"""The HTTP server over taught and exported classifiers (FastAPI, no torch). Imports the
classifier layer and the base.
"""
