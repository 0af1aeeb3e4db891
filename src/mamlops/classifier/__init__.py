"""The product: an adapted classifier (weights, frozen support BatchNorm statistics, labels),
its ONNX export, onnxruntime inference, teaching from uploads, and the MLflow model registry.
Imports the meta-learning core, the data layer and the base. Importing the package imports
nothing heavy: ``onnx_predict`` runs without torch.
"""
