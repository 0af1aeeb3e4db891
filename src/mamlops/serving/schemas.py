"""The API's JSON: every body the server answers with, as pydantic models, and the OpenAPI
descriptions of its errors and of the teaching form.

Apart from the routes so that the published shape of the API reads in one place: the field
names here are the JSON a client gets and what ``/openapi.json`` publishes, so a change here is
a change of the API.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, Field


def bad(status: int, message: str) -> HTTPException:
    """The 4xx to raise for a bad request: FastAPI answers it as an ``ErrorResponse``."""
    return HTTPException(status_code=status, detail=message)


class ErrorResponse(BaseModel):
    """Every 4xx body: one line naming the problem and, where there is one, the fix."""

    detail: str = Field(examples=["q0.png: not a readable image (UnidentifiedImageError)"])


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    models: list[str] = Field(description="names of the served models (file stems)")
    teaching: bool = Field(description="whether POST /classifiers teaches (a meta-model is loaded)")


class ClassProbability(BaseModel):
    label: str
    probability: float


class Prediction(BaseModel):
    filename: str = Field(description="the upload's file name, as sent")
    label: str = Field(description="the most likely class")
    probability: float = Field(description="its probability")
    probabilities: dict[str, float] = Field(description="every class's probability, by label")
    top_k: list[ClassProbability] = Field(description="the k most likely, most likely first")


class PredictResponse(BaseModel):
    model: str = Field(description="the model that answered")
    model_sha256: str = Field(description="SHA-256 of its ONNX file")
    predictions: list[Prediction] = Field(description="one per uploaded image, in upload order")


class InputSpec(BaseModel):
    name: str
    shape: list[str | int] = Field(examples=[["batch", 1, 28, 28]])
    dtype: str
    normalisation: dict[str, Any]


class OutputSpec(BaseModel):
    name: str
    shape: list[str | int] = Field(examples=[["batch", 5]])


class ModelMetadata(BaseModel):
    """``OnnxClassifier.metadata()``: labels, input spec and provenance of one served file."""

    name: str
    labels: list[str]
    dataset: str
    input: InputSpec
    output: OutputSpec
    model_sha256: str
    meta_model_sha256: str | None
    params: dict[str, Any]
    mamlops_version: str | None
    opset: str | None


class ModelList(BaseModel):
    models: list[ModelMetadata]
    default: str | None = Field(description="the model /predict uses without ?model=, if one")


class MetaModelInfo(BaseModel):
    """The meta-model the server teaches from, and what one teaching request may carry."""

    name: str = Field(description="its file name")
    sha256: str
    setting: str | None = Field(description="the DVC setting it was trained as")
    dataset: str
    ways: int = Field(description="the most classes one classifier can have")
    image_size: int
    channels: int
    steps: int = Field(description="inner steps of each adaptation")
    lr: float = Field(description="their learning rate")
    max_shots: int = Field(description="images per class, at most")
    max_upload_bytes: int
    max_pixels: int = Field(description="pixels per image, at most")


class SupportClass(BaseModel):
    label: str
    images: list[str] = Field(description="URLs of the support images, as the network saw them")


class ClassifierInfo(BaseModel):
    id: str = Field(description="first 16 hex digits of the ONNX file's SHA-256")
    labels: list[str]
    created: str = Field(description="when it was stored (UTC, ISO 8601)")
    predict_url: str
    model_sha256: str
    meta_model_sha256: str | None
    support: list[SupportClass]
    provenance: dict[str, Any] = Field(description="how it was adapted: steps, lr, shots, ...")
    damaged: str | None = Field(
        None,
        description="why it cannot predict (its stored model was changed or damaged; predict "
        "answers 409): delete it and teach it again. null when healthy",
    )


class TaughtClassifier(ClassifierInfo):
    new: bool = Field(description="false when the same classifier had been taught before")
    teach_ms: float = Field(description="adaptation and ONNX export, in milliseconds")


class ClassifierList(BaseModel):
    classifiers: list[ClassifierInfo] = Field(description="the most recently taught first")
    total: int = Field(description="how many the store holds")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in [
        (400, "bad upload or parameters (not an image, no 'files' field, top_k < 1, ...)"),
        (404, "unknown model"),
        (413, "upload, file count or image dimensions over the limit"),
        (415, "not a multipart/form-data request"),
        (422, "a query or path parameter of the wrong type"),
    ]
}
TEACH_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"model": ErrorResponse, "description": "unknown classifier, or teaching is off"},
    409: {"model": ErrorResponse, "description": "the classifier's stored model is damaged"},
    429: {"model": ErrorResponse, "description": "busy teaching: retry after Retry-After s"},
}
# POST /classifiers has one form field per class, named by its label: OpenAPI says so here
TEACH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "description": "one field per class, named by the label, with its images; "
                    "or a single field holding a zip of class folders (label/image.png)",
                    "additionalProperties": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                    },
                }
            }
        },
    }
}
