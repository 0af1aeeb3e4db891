"""mamlops: MAML few-shot image classification as a DVC + MLflow pipeline, served through ONNX.

Importing the package imports nothing heavy: the serving path (``onnx_predict``, ``serve``) must
run without torch.
"""

__version__ = "0.1.0"
