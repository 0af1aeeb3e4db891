"""The routes over the fixed ONNX classifiers: liveness, their metadata, and predictions.

One onnxruntime session per model, created when the app is built, shared by all requests
(``InferenceSession.run`` is thread-safe; inference runs in the thread pool so the event loop
keeps answering ``/health``). Given a folder, every ``*.onnx`` in it is served, by file stem.

``classify`` is also what a taught classifier's ``/classifiers/{id}/predict`` answers with
(``teach.py``), so both kinds of model give the same JSON for the same images.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from mamlops.classifier.onnx_predict import OnnxClassifier
from mamlops.serving.schemas import (
    ERRORS,
    Health,
    ModelList,
    ModelMetadata,
    Prediction,
    PredictResponse,
    bad,
)
from mamlops.serving.state import MaybeTeacher, ServedModels, ServerSettings, pick
from mamlops.serving.uploads import FORM_LIMITS, Files, decode_images

TopK = Annotated[
    int | None, Query(description="classes listed per image, most likely first (default 5)")
]

router = APIRouter()


async def classify(
    files: list[UploadFile],
    clf: OnnxClassifier,
    top_k: int | None,
    default_top_k: int,
    name: str | None = None,
) -> PredictResponse:
    """The answer of ``clf`` for the uploaded images, ``top_k`` (or ``default_top_k``) classes
    each; decoding and inference run in the thread pool, off the event loop."""
    k = default_top_k if top_k is None else top_k
    if k < 1:
        raise bad(400, "top_k must be at least 1")
    uploads = [(f.filename or "upload", await f.read()) for f in files]
    x = await run_in_threadpool(lambda: clf.to_input(decode_images(uploads, clf.dataset)))
    preds = clf.describe(await run_in_threadpool(clf.predict_array, x), k)
    return PredictResponse(
        model=name or clf.name,
        model_sha256=clf.sha256,
        predictions=[
            Prediction(filename=filename, **pred)
            for (filename, _), pred in zip(uploads, preds, strict=True)
        ],
    )


@router.get("/health")
def health(served: ServedModels, teacher: MaybeTeacher) -> Health:
    """Liveness, which models this server answers for, and whether it teaches."""
    return Health(status="ok", models=sorted(served.models), teaching=teacher is not None)


@router.get("/models")
def list_models(served: ServedModels) -> ModelList:
    """Metadata of every served model, and the one /predict uses by default."""
    return ModelList(models=[m.metadata() for m in served.models.values()], default=served.default)


@router.get("/metadata", responses=ERRORS)
def metadata(served: ServedModels, model: str | None = None) -> ModelMetadata:
    """Labels, input spec and provenance of ``model`` (or of the only one served)."""
    return ModelMetadata(**pick(served, model).metadata())


@router.get("/models/{name}/metadata", responses=ERRORS)
def model_metadata(served: ServedModels, name: str) -> ModelMetadata:
    """Labels, input spec and provenance of the model ``name``."""
    return ModelMetadata(**pick(served, name).metadata())


@router.post("/predict", responses=ERRORS, form_limits=FORM_LIMITS)
async def predict_default(
    served: ServedModels,
    settings: ServerSettings,
    files: Files,
    model: str | None = None,
    top_k: TopK = None,
) -> PredictResponse:
    """Classify one or more uploaded images with ``model`` (or the only one served)."""
    return await classify(files, pick(served, model), top_k, settings.default_top_k)


@router.post("/models/{name}/predict", responses=ERRORS, form_limits=FORM_LIMITS)
async def predict_named(
    served: ServedModels, settings: ServerSettings, files: Files, name: str, top_k: TopK = None
) -> PredictResponse:
    """Classify one or more uploaded images with the model ``name``."""
    return await classify(files, pick(served, name), top_k, settings.default_top_k)
